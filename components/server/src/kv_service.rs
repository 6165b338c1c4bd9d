//! The Kv gRPC service. Each handler validates its input against the limits
//! (nothing reaches Raft otherwise), sends the command or read to the
//! shard's replica, and answers with the result or a structured error.
//!
//! Reads follow the request's read mode (linearizable unless STALE): a read
//! waits until the replica allows it (leader lease, or a ReadIndex
//! confirmation and the replica applied up to it; see
//! `flotilla_raftstore::replica::read`), then reads a RocksDB snapshot taken
//! at that moment.
//!
//! `BatchCommands` carries many of these requests over one stream, each
//! checked, counted and answered as its unary RPC would be (same limits,
//! metrics and errors); answers that finish together leave in one message.
//! A client with many requests in flight then pays HTTP/2 framing and a
//! handler wake-up per batch, not per request: unary calls cost ~30 µs of
//! server CPU each on the 2-core bench machine, as much as the Raft work of
//! a write.
//!
//! ```text
//!  stream ─► read_commands ─┬─ write ─► router ─► … apply poller: callback ─┐
//!                           │    └─ StreamWrites (timeout: expire_writes) ──┤
//!                           └─ read/scan ─► task ─► unary handler ──────────┼─► answers ─► answer_stream
//! ```
//!
//! A write on a stream has no task of its own: its callback, run by the
//! apply poller that applied it, builds the answer and puts it on the
//! stream; one task per stream answers the writes still waiting at
//! `server.request-timeout-ms` (Indeterminate, as the unary RPC would), and
//! whichever of the two takes a write's slot first answers it. That saves a
//! task, a oneshot and a timer per write, and the answer stream wakes once
//! per apply round instead of once per write (5 % more put throughput at
//! 256 clients, gRPC threads 14 -> 12 µs per write). Reads and scans run as
//! their unary handler in a task each, so a stream's reads use every
//! worker thread.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use flotilla_proto::kv::kv_server::Kv;
use flotilla_proto::kv::*;
use flotilla_proto::raftcmd::{self, op, Op, WriteCommand};
use flotilla_raftstore::{Error as StoreError, KeySpan, WriteResult};
use flotilla_storage::CF_DEFAULT;
use futures::{Stream, StreamExt};
use parking_lot::Mutex;
use prost::Message;
use std::pin::Pin;
use tokio::sync::{mpsc, watch, Notify, OwnedSemaphorePermit, Semaphore};
use tonic::{Request, Response, Status, Streaming};

use crate::config::Limits;
use crate::limits;
use crate::metrics;
use crate::service::{require_context, HandlerError, NodeContext, WithError};

#[derive(Clone)]
pub struct KvService {
    ctx: Arc<NodeContext>,
    /// Set when the node stops: command streams end (they would otherwise
    /// hold the server's graceful shutdown open for as long as the client
    /// keeps them).
    shutdown: watch::Receiver<bool>,
}

type Reply<T> = Result<Response<T>, Status>;

impl KvService {
    pub fn new(ctx: Arc<NodeContext>, shutdown: watch::Receiver<bool>) -> Self {
        KvService { ctx, shutdown }
    }
}

fn one_op(op: op::Op) -> WriteCommand {
    WriteCommand {
        ops: vec![Op { op: Some(op) }],
    }
}

fn internal(e: impl std::fmt::Display) -> HandlerError {
    HandlerError::Status(Status::internal(e.to_string()))
}

/// The unary handlers, shared by the unary RPCs and `BatchCommands`.
impl KvService {
    async fn handle_get(&self, r: GetRequest) -> Reply<GetResponse> {
        let c = &self.ctx;
        c.run("Get", async move {
            let l = &c.cfg.limits;
            limits::check_key(l, "key", &r.key)?;
            let ctx = require_context(r.context)?;
            let (snap, _) = c
                .read_barrier(&ctx, vec![KeySpan::Point(r.key.clone())])
                .await?;
            let value = snap.get(CF_DEFAULT, &r.key).map_err(internal)?;
            Ok(GetResponse {
                error: None,
                found: value.is_some(),
                value: value.map(Bytes::from).unwrap_or_default(),
            })
        })
        .await
    }

    async fn handle_batch_get(&self, r: BatchGetRequest) -> Reply<BatchGetResponse> {
        let c = &self.ctx;
        c.run("BatchGet", async move {
            let l = &c.cfg.limits;
            limits::check_request_size(l, &r)?;
            limits::check_batch(l, "keys", r.keys.len())?;
            for k in &r.keys {
                limits::check_key(l, "keys[]", k)?;
            }
            let ctx = require_context(r.context)?;
            let spans = r.keys.iter().cloned().map(KeySpan::Point).collect();
            let (snap, _) = c.read_barrier(&ctx, spans).await?;
            let pairs = tokio::task::spawn_blocking(move || {
                let mut pairs = Vec::new();
                for k in r.keys {
                    if let Some(v) = snap.get(CF_DEFAULT, &k)? {
                        pairs.push(KvPair {
                            key: k,
                            value: v.into(),
                        });
                    }
                }
                Ok::<_, flotilla_storage::Error>(pairs)
            })
            .await
            .map_err(internal)?
            .map_err(internal)?;
            Ok(BatchGetResponse { error: None, pairs })
        })
        .await
    }

    async fn handle_scan(&self, r: ScanRequest) -> Reply<ScanResponse> {
        let c = &self.ctx;
        c.run("Scan", async move {
            let l = &c.cfg.limits;
            limits::check_bound(l, "start_key", &r.start_key)?;
            limits::check_bound(l, "end_key", &r.end_key)?;
            limits::check_range(&r.start_key, &r.end_key)?;
            let ctx = require_context(r.context)?;
            let span = KeySpan::Range {
                start: r.start_key.clone(),
                end: r.end_key.clone(),
            };
            let (snap, shard_end) = c.read_barrier(&ctx, vec![span]).await?;
            let end = if r.end_key.is_empty() {
                shard_end
            } else {
                r.end_key
            };
            let limit = match r.limit {
                0 => l.max_scan_limit,
                n => n.min(l.max_scan_limit),
            } as usize;
            let (pairs, more) = tokio::task::spawn_blocking(move || {
                snap.scan(CF_DEFAULT, &r.start_key, &end, limit, r.reverse)
            })
            .await
            .map_err(internal)?
            .map_err(internal)?;
            Ok(ScanResponse {
                error: None,
                pairs: pairs
                    .into_iter()
                    .map(|(k, v)| KvPair {
                        key: k.into(),
                        value: v.into(),
                    })
                    .collect(),
                more,
            })
        })
        .await
    }

    /// A write: checked, proposed, and answered once it applied.
    async fn handle_write<W: WriteRpc>(&self, r: W) -> Reply<W::Response> {
        let c = &self.ctx;
        c.run(W::METHOD, async move {
            let (ctx, cmd) = r.into_command(&c.cfg.limits)?;
            let result = c.propose(ctx, cmd).await?;
            Ok(W::answer(result))
        })
        .await
    }
}

/// A write RPC: how its request becomes one Raft command (after its
/// limits are checked) and how the command's result becomes its response.
/// The unary handlers and `BatchCommands` share these.
trait WriteRpc: Send + Sized + 'static {
    type Response: WithError + Send + 'static;
    const METHOD: &'static str;
    fn into_command(self, l: &Limits) -> Result<(Option<ShardContext>, WriteCommand), Status>;
    fn answer(result: WriteResult) -> Self::Response;
    fn into_resp(r: Self::Response) -> command_response::Resp;
}

impl WriteRpc for PutRequest {
    type Response = PutResponse;
    const METHOD: &'static str = "Put";
    fn into_command(self, l: &Limits) -> Result<(Option<ShardContext>, WriteCommand), Status> {
        limits::check_request_size(l, &self)?;
        limits::check_key(l, "key", &self.key)?;
        limits::check_value(l, "value", &self.value)?;
        let cmd = one_op(op::Op::Put(raftcmd::Put {
            key: self.key,
            value: self.value,
        }));
        Ok((self.context, cmd))
    }
    fn answer(_: WriteResult) -> PutResponse {
        PutResponse::default()
    }
    fn into_resp(r: PutResponse) -> command_response::Resp {
        command_response::Resp::Put(r)
    }
}

impl WriteRpc for BatchPutRequest {
    type Response = BatchPutResponse;
    const METHOD: &'static str = "BatchPut";
    fn into_command(self, l: &Limits) -> Result<(Option<ShardContext>, WriteCommand), Status> {
        limits::check_request_size(l, &self)?;
        limits::check_batch(l, "pairs", self.pairs.len())?;
        for p in &self.pairs {
            limits::check_key(l, "pairs[].key", &p.key)?;
            limits::check_value(l, "pairs[].value", &p.value)?;
        }
        let ops = self
            .pairs
            .into_iter()
            .map(|p| Op {
                op: Some(op::Op::Put(raftcmd::Put {
                    key: p.key,
                    value: p.value,
                })),
            })
            .collect();
        Ok((self.context, WriteCommand { ops }))
    }
    fn answer(_: WriteResult) -> BatchPutResponse {
        BatchPutResponse::default()
    }
    fn into_resp(r: BatchPutResponse) -> command_response::Resp {
        command_response::Resp::BatchPut(r)
    }
}

impl WriteRpc for DeleteRequest {
    type Response = DeleteResponse;
    const METHOD: &'static str = "Delete";
    fn into_command(self, l: &Limits) -> Result<(Option<ShardContext>, WriteCommand), Status> {
        limits::check_key(l, "key", &self.key)?;
        let cmd = one_op(op::Op::Delete(raftcmd::Delete { key: self.key }));
        Ok((self.context, cmd))
    }
    fn answer(_: WriteResult) -> DeleteResponse {
        DeleteResponse::default()
    }
    fn into_resp(r: DeleteResponse) -> command_response::Resp {
        command_response::Resp::Delete(r)
    }
}

impl WriteRpc for DeleteRangeRequest {
    type Response = DeleteRangeResponse;
    const METHOD: &'static str = "DeleteRange";
    fn into_command(self, l: &Limits) -> Result<(Option<ShardContext>, WriteCommand), Status> {
        limits::check_bound(l, "start_key", &self.start_key)?;
        limits::check_bound(l, "end_key", &self.end_key)?;
        limits::check_range(&self.start_key, &self.end_key)?;
        let cmd = one_op(op::Op::DeleteRange(raftcmd::DeleteRange {
            start_key: self.start_key,
            end_key: self.end_key,
        }));
        Ok((self.context, cmd))
    }
    fn answer(_: WriteResult) -> DeleteRangeResponse {
        DeleteRangeResponse::default()
    }
    fn into_resp(r: DeleteRangeResponse) -> command_response::Resp {
        command_response::Resp::DeleteRange(r)
    }
}

impl WriteRpc for CompareAndSwapRequest {
    type Response = CompareAndSwapResponse;
    const METHOD: &'static str = "CompareAndSwap";
    fn into_command(self, l: &Limits) -> Result<(Option<ShardContext>, WriteCommand), Status> {
        limits::check_request_size(l, &self)?;
        limits::check_key(l, "key", &self.key)?;
        limits::check_value(l, "expected_value", &self.expected_value)?;
        limits::check_value(l, "new_value", &self.new_value)?;
        let cmd = one_op(op::Op::Cas(raftcmd::Cas {
            key: self.key,
            expected_exists: self.expected_exists,
            expected_value: self.expected_value,
            new_value: self.new_value,
            delete: self.delete,
        }));
        Ok((self.context, cmd))
    }
    fn answer(result: WriteResult) -> CompareAndSwapResponse {
        let outcome = result.cas.into_iter().next().unwrap_or_default();
        CompareAndSwapResponse {
            error: None,
            succeeded: outcome.succeeded,
            previous_exists: outcome.previous.is_some(),
            previous_value: outcome.previous.unwrap_or_default(),
        }
    }
    fn into_resp(r: CompareAndSwapResponse) -> command_response::Resp {
        command_response::Resp::CompareAndSwap(r)
    }
}

/// Commands of one `BatchCommands` stream being handled or answered but not
/// yet put in a response message; past it the stream is not read further
/// (HTTP/2 flow control then holds the client).
const BATCH_IN_FLIGHT: usize = 16384;
/// Most encoded bytes of answers put into one response message (one answer
/// larger than this still goes, alone).
const BATCH_RESPONSE_BYTES: usize = 1 << 20;

/// An answer on its way to a response message, with the in-flight permit it
/// holds until then (answers a slow reader leaves unread count against the
/// bound too).
type Answer = (CommandResponse, OwnedSemaphorePermit);

fn command_response(id: u64, resp: Result<command_response::Resp, Status>) -> CommandResponse {
    let resp = resp.unwrap_or_else(|s| {
        command_response::Resp::Status(CommandStatus {
            code: s.code() as i32,
            message: s.message().to_string(),
        })
    });
    CommandResponse {
        id,
        resp: Some(resp),
    }
}

impl KvService {
    /// Starts one command of a `BatchCommands` stream. A write is answered
    /// by its own callback on the apply poller (see [`StreamWrites`]); any
    /// other command runs as its unary RPC in a task of its own.
    fn start_command(
        &self,
        cmd: Command,
        permit: OwnedSemaphorePermit,
        answers: &mpsc::UnboundedSender<Answer>,
        writes: &Arc<StreamWrites>,
    ) {
        use command::Cmd;
        use command_response::Resp;
        let id = cmd.id;
        let cmd = match cmd.cmd {
            Some(Cmd::Put(r)) => return self.start_write(id, r, permit, answers, writes),
            Some(Cmd::BatchPut(r)) => return self.start_write(id, r, permit, answers, writes),
            Some(Cmd::Delete(r)) => return self.start_write(id, r, permit, answers, writes),
            Some(Cmd::DeleteRange(r)) => return self.start_write(id, r, permit, answers, writes),
            Some(Cmd::CompareAndSwap(r)) => {
                return self.start_write(id, r, permit, answers, writes)
            }
            other => other,
        };
        let (svc, answers) = (self.clone(), answers.clone());
        tokio::spawn(async move {
            let resp = match cmd {
                Some(Cmd::Get(r)) => svc.handle_get(r).await.map(|r| Resp::Get(r.into_inner())),
                Some(Cmd::BatchGet(r)) => svc
                    .handle_batch_get(r)
                    .await
                    .map(|r| Resp::BatchGet(r.into_inner())),
                Some(Cmd::Scan(r)) => svc.handle_scan(r).await.map(|r| Resp::Scan(r.into_inner())),
                None => Err(Status::invalid_argument(
                    "command: no request set (get, put, ...)",
                )),
                Some(_) => unreachable!("writes are started above"),
            };
            let _ = answers.send((command_response(id, resp), permit));
        });
    }

    /// Proposes a write of a stream without a task of its own: its callback
    /// (on the apply poller) builds the answer as `handle_write` would, with
    /// the same metrics, and puts it on the stream, unless
    /// `request-timeout-ms` passed first and [`expire_writes`] answered it.
    fn start_write<W: WriteRpc>(
        &self,
        id: u64,
        r: W,
        permit: OwnedSemaphorePermit,
        answers: &mpsc::UnboundedSender<Answer>,
        writes: &Arc<StreamWrites>,
    ) {
        let c = &self.ctx;
        let started = Instant::now();
        let checked = c
            .refuse_if_removed()
            .map_err(HandlerError::from)
            .and_then(|()| {
                let (ctx, cmd) = r.into_command(&c.cfg.limits)?;
                Ok((require_context(ctx)?, cmd))
            });
        let (ctx, cmd) = match checked {
            Ok(checked) => checked,
            Err(e) => {
                let resp = write_answer::<W>(c, started, Err(e));
                let _ = answers.send((command_response(id, resp), permit));
                return;
            }
        };
        let slot = writes.add(Waiting {
            id,
            permit,
            started,
            expire: write_answer_timed_out::<W>,
        });
        let (taken, stream) = (slot.clone(), writes.clone());
        let (node, weak) = (self.ctx.clone(), answers.downgrade());
        let cb = Box::new(move |result: Result<WriteResult, StoreError>| {
            // Held before the slot is taken: `expire_writes` (which holds
            // the stream open) ends only after it saw every slot taken, so
            // the stream cannot end between the take and the send. None:
            // the stream ended already, nobody to answer.
            let answers = weak.upgrade();
            let Some(w) = taken.lock().take() else {
                return; // answered at the timeout already
            };
            let resp = write_answer::<W>(&node, started, result.map(W::answer).map_err(Into::into));
            if let Some(answers) = answers {
                let _ = answers.send((command_response(w.id, resp), w.permit));
            }
            if stream.reading_done.load(Ordering::SeqCst) {
                stream.changed.notify_one(); // maybe the last: end the stream now
            }
        });
        if let Err(e) = c.submit(ctx, cmd, cb) {
            // Refused before reaching the shard (the callback was dropped).
            if let Some(w) = slot.lock().take() {
                let resp = write_answer::<W>(c, started, Err(e));
                let _ = answers.send((command_response(w.id, resp), w.permit));
            }
        }
    }
}

/// A write's outcome as a stream answer, counted like its unary RPC.
fn write_answer<W: WriteRpc>(
    c: &NodeContext,
    started: Instant,
    out: Result<W::Response, HandlerError>,
) -> Result<command_response::Resp, Status> {
    c.conclude(W::METHOD, started, out)
        .map(|r| W::into_resp(r.into_inner()))
}

fn write_answer_timed_out<W: WriteRpc>(
    c: &NodeContext,
    started: Instant,
) -> Result<command_response::Resp, Status> {
    write_answer::<W>(c, started, Err(c.timed_out().into()))
}

/// A write of a stream waiting for its outcome.
struct Waiting {
    id: u64,
    permit: OwnedSemaphorePermit,
    started: Instant,
    /// Its answer when it did not apply within `request-timeout-ms`.
    expire: fn(&NodeContext, Instant) -> Result<command_response::Resp, Status>,
}

/// Taken once: by the write's callback or by the timeout, whichever comes
/// first answers.
type Slot = Arc<Mutex<Option<Waiting>>>;

/// The writes of one `BatchCommands` stream, oldest first, until answered
/// (a write's callback answers on the apply poller that applied it: no task
/// or timer per write, and one wake-up of the answer stream per apply round
/// instead of one per write).
#[derive(Default)]
struct StreamWrites {
    slots: Mutex<VecDeque<Slot>>,
    /// A write was added to an empty queue, reading ended, or a write was
    /// answered after reading ended (maybe the last: the stream may end).
    changed: Notify,
    reading_done: std::sync::atomic::AtomicBool,
}

impl StreamWrites {
    fn add(&self, w: Waiting) -> Slot {
        let slot = Arc::new(Mutex::new(Some(w)));
        let mut slots = self.slots.lock();
        slots.push_back(slot.clone());
        if slots.len() == 1 {
            self.changed.notify_one();
        }
        // Answered slots behind one that waits (a shard without quorum
        // holds its writes for the whole timeout) stay until it is answered;
        // at most BATCH_IN_FLIGHT wait, so past twice that most are
        // answered: forget them now (amortized O(1) per write).
        if slots.len() > 2 * BATCH_IN_FLIGHT {
            slots.retain(|s| s.lock().is_some());
        }
        slot
    }

    fn end_reading(&self) {
        self.reading_done.store(true, Ordering::SeqCst);
        self.changed.notify_one();
    }

    /// Forgets answered writes at the front, takes those waiting since
    /// before `expired_before`; returns when the oldest still waiting
    /// started (None: nothing waits).
    fn sweep(
        &self,
        expired_before: Option<Instant>,
        expired: &mut Vec<Waiting>,
    ) -> Option<Instant> {
        let mut slots = self.slots.lock();
        while let Some(front) = slots.front() {
            let mut w = front.lock();
            match w.as_ref() {
                Some(waiting) if expired_before.is_none_or(|t| waiting.started >= t) => {
                    return Some(waiting.started);
                }
                Some(_) => expired.extend(w.take()),
                None => {}
            }
            drop(w);
            slots.pop_front();
        }
        None
    }
}

/// How often the answered writes at a stream's front are forgotten while
/// some write waits (its queue otherwise grows until the oldest answers).
const SWEEP_EVERY: Duration = Duration::from_millis(100);

/// Answers the writes of a stream still waiting after `request-timeout-ms`
/// (Indeterminate, as their unary RPC would), and forgets the answered
/// ones. Ends when the response stream is gone, or when reading ended and
/// every write was answered.
async fn expire_writes(
    ctx: Arc<NodeContext>,
    writes: Arc<StreamWrites>,
    answers: mpsc::UnboundedSender<Answer>,
) {
    let timeout = ctx.request_timeout();
    let mut expired = Vec::new();
    loop {
        let now = Instant::now();
        let oldest = writes.sweep(now.checked_sub(timeout), &mut expired);
        for w in expired.drain(..) {
            let resp = (w.expire)(&ctx, w.started);
            let _ = answers.send((command_response(w.id, resp), w.permit));
        }
        match oldest {
            Some(started) => {
                let wake = (started + timeout).min(now + SWEEP_EVERY);
                tokio::select! {
                    _ = tokio::time::sleep_until(wake.into()) => {}
                    _ = answers.closed() => return,
                }
            }
            None if writes.reading_done.load(Ordering::SeqCst) => return,
            None => tokio::select! {
                _ = writes.changed.notified() => {}
                _ = answers.closed() => return,
            },
        }
    }
}

/// Reads a `BatchCommands` stream and starts its commands (see
/// [`KvService::start_command`]), each holding one of the stream's
/// in-flight permits until its answer is put in a response message.
async fn read_commands(
    svc: KvService,
    mut incoming: Streaming<BatchCommandsRequest>,
    answers: mpsc::UnboundedSender<Answer>,
) {
    let writes = Arc::new(StreamWrites::default());
    tokio::spawn(expire_writes(
        svc.ctx.clone(),
        writes.clone(),
        answers.clone(),
    ));
    read_commands_until_end(&svc, &mut incoming, &answers, &writes).await;
    writes.end_reading();
}

async fn read_commands_until_end(
    svc: &KvService,
    incoming: &mut Streaming<BatchCommandsRequest>,
    answers: &mpsc::UnboundedSender<Answer>,
    writes: &Arc<StreamWrites>,
) {
    let permits = Arc::new(Semaphore::new(BATCH_IN_FLIGHT));
    let mut shutdown = svc.shutdown.clone();
    loop {
        let next = tokio::select! {
            m = incoming.message() => m,
            _ = shutdown.wait_for(|stop| *stop) => return,
        };
        let msg = match next {
            Ok(Some(m)) => m,
            Ok(None) => return,
            Err(e) => {
                tracing::debug!(error = %e, "a BatchCommands stream broke");
                return;
            }
        };
        metrics::BATCH_COMMANDS.observe(msg.commands.len() as f64);
        for cmd in msg.commands {
            let permit = tokio::select! {
                p = permits.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => return,
                },
                _ = shutdown.wait_for(|stop| *stop) => return,
            };
            svc.start_command(cmd, permit, answers, writes);
        }
    }
}

/// Groups the answers ready at one moment (after one turn of the scheduler)
/// into response messages of at most `BATCH_RESPONSE_BYTES` (an answer that
/// does not fit waits for the next message).
fn answer_stream(
    answers: mpsc::UnboundedReceiver<Answer>,
) -> impl Stream<Item = Result<BatchCommandsResponse, Status>> {
    futures::stream::unfold(
        (answers, None::<Answer>),
        |(mut answers, carried)| async move {
            let (first, _permit) = match carried {
                Some(a) => a,
                None => answers.recv().await?,
            };
            // One apply round answers many commands at once (callbacks on
            // the apply poller, or tasks woken by it): one turn of the
            // scheduler lets the rest queue theirs, which then leave in this
            // message.
            // Measured at 256 clients: ~20 answers per message with it, a
            // message for nearly every answer without.
            tokio::task::yield_now().await;
            let mut bytes = first.encoded_len();
            let mut responses = vec![first];
            let mut carried = None;
            while let Ok((a, permit)) = answers.try_recv() {
                bytes += a.encoded_len();
                if bytes > BATCH_RESPONSE_BYTES {
                    carried = Some((a, permit));
                    break;
                }
                responses.push(a);
            }
            metrics::BATCH_RESPONSES.observe(responses.len() as f64);
            Some((Ok(BatchCommandsResponse { responses }), (answers, carried)))
        },
    )
}

#[tonic::async_trait]
impl Kv for KvService {
    async fn get(&self, req: Request<GetRequest>) -> Reply<GetResponse> {
        self.handle_get(req.into_inner()).await
    }

    async fn batch_get(&self, req: Request<BatchGetRequest>) -> Reply<BatchGetResponse> {
        self.handle_batch_get(req.into_inner()).await
    }

    async fn put(&self, req: Request<PutRequest>) -> Reply<PutResponse> {
        self.handle_write(req.into_inner()).await
    }

    async fn batch_put(&self, req: Request<BatchPutRequest>) -> Reply<BatchPutResponse> {
        self.handle_write(req.into_inner()).await
    }

    async fn delete(&self, req: Request<DeleteRequest>) -> Reply<DeleteResponse> {
        self.handle_write(req.into_inner()).await
    }

    async fn delete_range(&self, req: Request<DeleteRangeRequest>) -> Reply<DeleteRangeResponse> {
        self.handle_write(req.into_inner()).await
    }

    async fn scan(&self, req: Request<ScanRequest>) -> Reply<ScanResponse> {
        self.handle_scan(req.into_inner()).await
    }

    async fn compare_and_swap(
        &self,
        req: Request<CompareAndSwapRequest>,
    ) -> Reply<CompareAndSwapResponse> {
        self.handle_write(req.into_inner()).await
    }

    type BatchCommandsStream =
        Pin<Box<dyn Stream<Item = Result<BatchCommandsResponse, Status>> + Send>>;

    async fn batch_commands(
        &self,
        req: Request<Streaming<BatchCommandsRequest>>,
    ) -> Reply<Self::BatchCommandsStream> {
        let (answers, answers_rx) = mpsc::unbounded_channel();
        tokio::spawn(read_commands(self.clone(), req.into_inner(), answers));
        // On shutdown the answers end at once; commands still running are
        // then unanswered, which the client reports as it would a broken
        // connection (writes Indeterminate).
        let mut shutdown = self.shutdown.clone();
        let stopped = async move {
            let _ = shutdown.wait_for(|stop| *stop).await;
        };
        Ok(Response::new(Box::pin(
            answer_stream(answers_rx).take_until(stopped),
        )))
    }
}
