//! The sending side of the transport: per-peer queues and streams.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use flotilla_proto::raft::raft_client::RaftClient as GrpcRaftClient;
use flotilla_proto::raft::{RaftBatch, RaftEnvelope};
use flotilla_raftstore::{NodeId, RaftMessage, StoreRouter, Transport};
use parking_lot::{Mutex, RwLock};
use protobuf::Message as _;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

use crate::filter::{Filter, FilterDecision};
use crate::metrics;
use crate::snapshot::{self, SnapshotConfig};
use flotilla_raftstore::metrics as store_metrics;
use flotilla_storage::SnapManager;

/// Node id → gRPC address of every node this one may talk to.
#[derive(Clone, Default)]
pub struct AddressBook {
    inner: Arc<RwLock<HashMap<NodeId, String>>>,
}

impl AddressBook {
    pub fn get(&self, node_id: NodeId) -> Option<String> {
        self.inner.read().get(&node_id).cloned()
    }

    pub fn set(&self, node_id: NodeId, addr: String) {
        self.inner.write().insert(node_id, addr);
    }

    pub fn all(&self) -> Vec<(NodeId, String)> {
        let mut v: Vec<_> = self
            .inner
            .read()
            .iter()
            .map(|(k, v)| (*k, v.clone()))
            .collect();
        v.sort();
        v
    }
}

#[derive(Clone, Debug)]
pub struct RaftClientConfig {
    /// Flushed batches queued per peer before new ones are dropped.
    pub queue_batches: usize,
    /// Most messages coalesced into one RaftBatch.
    pub max_batch_messages: usize,
    pub connect_timeout: Duration,
    /// How long a batch may wait for an open stream to take it before the
    /// stream counts as stalled and is replaced by a new connection.
    pub stall_timeout: Duration,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// Largest gRPC message sent or received on the raft service, bytes.
    pub max_message_bytes: usize,
    pub snapshot: SnapshotConfig,
}

impl Default for RaftClientConfig {
    fn default() -> Self {
        RaftClientConfig {
            queue_batches: 4096,
            max_batch_messages: 4096,
            connect_timeout: Duration::from_secs(2),
            stall_timeout: Duration::from_secs(5),
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            max_message_bytes: 64 << 20,
            snapshot: SnapshotConfig::default(),
        }
    }
}

struct Inner {
    node_id: NodeId,
    cfg: RaftClientConfig,
    addresses: AddressBook,
    runtime: tokio::runtime::Handle,
    pending: Mutex<HashMap<NodeId, Vec<RaftMessage>>>,
    peers: Mutex<HashMap<NodeId, Peer>>,
    router: OnceLock<StoreRouter>,
    filters: RwLock<Vec<Arc<dyn Filter>>>,
    has_filters: AtomicBool,
    snap_mgr: Arc<SnapManager>,
    snap_sends: Arc<tokio::sync::Semaphore>,
}

/// One peer's task, as the senders see it.
struct Peer {
    queue: mpsc::Sender<Vec<RaftMessage>>,
    /// Bumped when the peer opens a stream to this node: proof that it is
    /// up, which cuts short the task's reconnect back-off.
    heard: watch::Sender<()>,
}

/// Sends raft messages to peer nodes. Cheap to clone.
#[derive(Clone)]
pub struct RaftClient {
    inner: Arc<Inner>,
}

impl RaftClient {
    /// `runtime` runs the peer tasks; `send` and `flush` may be called from
    /// any thread.
    pub fn new(
        node_id: NodeId,
        cfg: RaftClientConfig,
        addresses: AddressBook,
        snap_mgr: Arc<SnapManager>,
        runtime: tokio::runtime::Handle,
    ) -> Self {
        let snap_sends = Arc::new(tokio::sync::Semaphore::new(
            cfg.snapshot.max_concurrent_send.max(1),
        ));
        RaftClient {
            inner: Arc::new(Inner {
                node_id,
                cfg,
                addresses,
                runtime,
                pending: Mutex::default(),
                peers: Mutex::default(),
                router: OnceLock::new(),
                filters: RwLock::default(),
                has_filters: AtomicBool::new(false),
                snap_mgr,
                snap_sends,
            }),
        }
    }

    /// Where unreachable peers are reported. Set once, after the store
    /// starts.
    pub fn set_router(&self, router: StoreRouter) {
        let _ = self.inner.router.set(router);
    }

    pub fn addresses(&self) -> &AddressBook {
        &self.inner.addresses
    }

    pub fn add_filter(&self, f: Arc<dyn Filter>) {
        self.inner.filters.write().push(f);
        self.inner.has_filters.store(true, Ordering::SeqCst);
    }

    /// `node` opened a stream to this node, so it is up now: if the task
    /// sending to it is waiting out a reconnect back-off, it connects at
    /// once. A restarted node otherwise heard nothing from a peer that had
    /// backed off to `backoff_max` (5 s) while it was down, and its
    /// replicas waited that long to learn their leaders.
    pub fn peer_is_up(&self, node: NodeId) {
        if let Some(p) = self.inner.peers.lock().get(&node) {
            p.heard.send_replace(());
        }
    }

    /// Ends every peer task (their queues close).
    pub fn shutdown(&self) {
        self.inner.peers.lock().clear();
    }

    pub fn clear_filters(&self) {
        self.inner.filters.write().clear();
        self.inner.has_filters.store(false, Ordering::SeqCst);
    }
}

impl Inner {
    fn decide(&self, msg: &RaftMessage) -> FilterDecision {
        if !self.has_filters.load(Ordering::Relaxed) {
            return FilterDecision::Pass;
        }
        self.filters
            .read()
            .iter()
            .map(|f| f.decide(msg))
            .find(|d| *d != FilterDecision::Pass)
            .unwrap_or(FilterDecision::Pass)
    }
}

impl Transport for RaftClient {
    fn send_snapshot(&self, msg: RaftMessage) {
        let inner = self.inner.clone();
        self.inner.runtime.spawn(async move {
            let (shard_id, to_replica) = (msg.shard_id, msg.to_replica);
            let ok = inner.send_snapshot(&msg).await;
            if let Some(router) = inner.router.get() {
                router.report_snapshot(shard_id, to_replica, ok);
            }
        });
    }

    fn send(&self, msg: RaftMessage) {
        let inner = &self.inner;
        match inner.decide(&msg) {
            FilterDecision::Pass => {}
            FilterDecision::Drop => {
                drop_metric(msg.to_node, "filtered", 1);
                return;
            }
            FilterDecision::Delay(d) => {
                let inner = self.inner.clone();
                self.inner.runtime.spawn(async move {
                    tokio::time::sleep(d).await;
                    let to = msg.to_node;
                    inner.dispatch(to, vec![msg]);
                });
                return;
            }
        }
        inner
            .pending
            .lock()
            .entry(msg.to_node)
            .or_default()
            .push(msg);
    }

    fn flush(&self) {
        let batches: Vec<(NodeId, Vec<RaftMessage>)> = {
            let mut pending = self.inner.pending.lock();
            pending
                .iter_mut()
                .filter(|(_, v)| !v.is_empty())
                .map(|(k, v)| (*k, std::mem::take(v)))
                .collect()
        };
        for (to, msgs) in batches {
            self.inner.dispatch(to, msgs);
        }
    }
}

fn drop_metric(to: NodeId, reason: &str, n: usize) {
    metrics::MESSAGES_DROPPED
        .with_label_values(&[&to.to_string(), reason])
        .inc_by(n as u64);
}

impl Inner {
    fn dispatch(self: &Arc<Self>, to: NodeId, msgs: Vec<RaftMessage>) {
        if to == self.node_id {
            tracing::warn!(to, "refusing to send raft messages to self");
            return;
        }
        let sender = {
            let mut peers = self.peers.lock();
            peers
                .entry(to)
                .or_insert_with(|| {
                    let (queue, rx) = mpsc::channel(self.cfg.queue_batches);
                    let (heard, heard_rx) = watch::channel(());
                    let inner = self.clone();
                    self.runtime
                        .spawn(async move { inner.run_peer(to, rx, heard_rx).await });
                    Peer { queue, heard }
                })
                .queue
                .clone()
        };
        if let Err(e) = sender.try_send(msgs) {
            let msgs = match e {
                mpsc::error::TrySendError::Full(m) => m,
                mpsc::error::TrySendError::Closed(m) => m,
            };
            drop_metric(to, "queue_full", msgs.len());
            self.report_unreachable(&msgs);
        }
    }

    /// Sends one snapshot; true when the receiver stepped it.
    async fn send_snapshot(&self, msg: &RaftMessage) -> bool {
        let to = msg.to_node;
        match self.decide(msg) {
            FilterDecision::Drop => return false,
            FilterDecision::Delay(d) => tokio::time::sleep(d).await,
            FilterDecision::Pass => {}
        }
        let cfg = &self.cfg.snapshot;
        let started = std::time::Instant::now();
        let Ok(_permit) = self.snap_sends.acquire().await else {
            return false;
        };
        let result = async {
            let addr = self
                .addresses
                .get(to)
                .ok_or_else(|| format!("no address for node {to}"))?;
            let channel = self.connect(&addr).await?;
            snapshot::send(cfg, &self.snap_mgr, channel, msg, encode(msg)).await
        };
        let outcome = match tokio::time::timeout(cfg.send_timeout, result).await {
            Ok(r) => r,
            Err(_) => Err(format!("timed out after {:?}", cfg.send_timeout)),
        };
        match outcome {
            Ok(bytes) => {
                store_metrics::SNAPSHOTS.with_label_values(&["sent"]).inc();
                store_metrics::SNAPSHOT_BYTES
                    .with_label_values(&["sent"])
                    .inc_by(bytes);
                store_metrics::SNAPSHOT_DURATION
                    .with_label_values(&["send"])
                    .observe(started.elapsed().as_secs_f64());
                tracing::info!(
                    shard_id = msg.shard_id,
                    to_node = to,
                    bytes,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "snapshot sent"
                );
                true
            }
            Err(e) => {
                store_metrics::SNAPSHOTS
                    .with_label_values(&["send_failed"])
                    .inc();
                tracing::warn!(shard_id = msg.shard_id, to_node = to, error = %e, "sending a snapshot failed");
                false
            }
        }
    }

    fn report_unreachable(&self, msgs: &[RaftMessage]) {
        let Some(router) = self.router.get() else {
            return;
        };
        // Node heartbeats and wake-ups have no sending replica to tell.
        let targets: HashSet<_> = msgs
            .iter()
            .filter(|m| m.extra.is_none())
            .map(|m| (m.shard_id, m.to_replica))
            .collect();
        for (shard_id, to_replica) in targets {
            router.report_unreachable(shard_id, to_replica);
        }
    }

    /// Drops everything queued for a peer that cannot be reached.
    fn drain_unreachable(
        &self,
        to: NodeId,
        rx: &mut mpsc::Receiver<Vec<RaftMessage>>,
        first: Vec<RaftMessage>,
    ) {
        let mut dropped = first;
        while let Ok(mut more) = rx.try_recv() {
            dropped.append(&mut more);
        }
        drop_metric(to, "unreachable", dropped.len());
        self.report_unreachable(&dropped);
    }

    async fn connect(&self, addr: &str) -> Result<tonic::transport::Channel, String> {
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| e.to_string())?
            .connect_timeout(self.cfg.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5))
            .keep_alive_while_idle(true);
        // The connect timeout covers TCP; a peer (or a proxy) that accepts
        // and then says nothing must not hold the peer's task either.
        let limit = 2 * self.cfg.connect_timeout;
        match tokio::time::timeout(limit, endpoint.connect()).await {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(_) => Err(format!("no connection within {limit:?}")),
        }
    }

    /// Waits out the reconnect back-off, doubling it, unless the peer
    /// opened a stream to this node since the last attempt began: then it
    /// is up, and the back-off starts over.
    async fn back_off(&self, to: NodeId, backoff: &mut Duration, heard: &mut watch::Receiver<()>) {
        tokio::select! {
            _ = tokio::time::sleep(*backoff) => {
                *backoff = (*backoff * 2).min(self.cfg.backoff_max);
            }
            Ok(()) = heard.changed() => {
                metrics::BACKOFFS_CUT.with_label_values(&[&to.to_string()]).inc();
                tracing::debug!(to_node = to, "peer opened a stream to this node; reconnecting now");
                *backoff = self.cfg.backoff_base;
            }
        }
    }

    async fn run_peer(
        self: Arc<Self>,
        to: NodeId,
        mut rx: mpsc::Receiver<Vec<RaftMessage>>,
        mut heard: watch::Receiver<()>,
    ) {
        let to_label = to.to_string();
        // Every drop reason of this peer starts at zero, visible to rates.
        for reason in ["filtered", "queue_full", "unreachable", "stream_closed"] {
            metrics::MESSAGES_DROPPED.with_label_values(&[&to_label, reason]);
        }
        metrics::MESSAGES_SENT.with_label_values(&[&to_label]);
        let mut backoff = self.cfg.backoff_base;
        loop {
            // Connect lazily: only when there is something to send.
            let Some(first) = rx.recv().await else { return };
            let Some(addr) = self.addresses.get(to) else {
                tracing::warn!(to_node = to, "no address for peer node");
                self.drain_unreachable(to, &mut rx, first);
                continue;
            };
            // Only a stream the peer opens after this point cuts the
            // back-off that follows a failure.
            heard.mark_unchanged();
            let channel = match self.connect(&addr).await {
                Ok(c) => c,
                Err(e) => {
                    metrics::RECONNECTS
                        .with_label_values(&[&to_label, "failed"])
                        .inc();
                    tracing::debug!(to_node = to, addr = %addr, error = %e, "cannot reach peer");
                    self.drain_unreachable(to, &mut rx, first);
                    self.back_off(to, &mut backoff, &mut heard).await;
                    continue;
                }
            };
            metrics::RECONNECTS
                .with_label_values(&[&to_label, "connected"])
                .inc();
            tracing::info!(to_node = to, addr = %addr, "raft stream to peer open");
            backoff = self.cfg.backoff_base;
            let (tx, stream_rx) = mpsc::channel::<RaftBatch>(16);
            let mut client = GrpcRaftClient::new(channel)
                .max_encoding_message_size(self.cfg.max_message_bytes)
                .max_decoding_message_size(self.cfg.max_message_bytes);
            let mut call =
                tokio::spawn(async move { client.raft(ReceiverStream::new(stream_rx)).await });
            let mut next = Some(first);
            loop {
                let mut msgs = match next.take() {
                    Some(m) => m,
                    None => tokio::select! {
                        m = rx.recv() => match m {
                            Some(m) => m,
                            None => return,
                        },
                        r = &mut call => {
                            let why = why_call_ended(r);
                            tracing::info!(to_node = to, reason = %why, "raft stream to peer closed");
                            break;
                        }
                    },
                };
                while msgs.len() < self.cfg.max_batch_messages {
                    match rx.try_recv() {
                        Ok(mut more) => msgs.append(&mut more),
                        Err(_) => break,
                    }
                }
                let n = msgs.len();
                let envelopes: Vec<RaftEnvelope> = msgs.iter().map(encode).collect();
                let batch = RaftBatch {
                    messages: envelopes,
                };
                // A connection that stopped moving (a peer that vanished
                // behind a half-open TCP connection) stops pulling batches:
                // waiting on the queue alone would never notice the call
                // failing (keepalive) and the link would stay dead.
                let stall = tokio::time::sleep(self.cfg.stall_timeout);
                let sent = tokio::select! {
                    r = tx.send(batch) => r.is_ok(),
                    _ = stall => {
                        // Open, alive to keepalives, yet taking nothing: a
                        // peer whose handler never reads, a proxy that lost
                        // its upstream. A new connection is the way out.
                        tracing::warn!(
                            to_node = to,
                            stall = ?self.cfg.stall_timeout,
                            "raft stream to peer stalled; reconnecting"
                        );
                        false
                    }
                    r = &mut call => {
                        let why = why_call_ended(r);
                        tracing::info!(to_node = to, reason = %why, "raft stream to peer closed while sending");
                        false
                    }
                };
                if !sent {
                    drop_metric(to, "stream_closed", n);
                    self.report_unreachable(&msgs);
                    break;
                }
                if flotilla_storage::metrics::detailed() {
                    metrics::BATCH_SIZE.observe(n as f64);
                }
                metrics::MESSAGES_SENT
                    .with_label_values(&[&to_label])
                    .inc_by(n as u64);
            }
            drop(tx);
            call.abort();
            self.back_off(to, &mut backoff, &mut heard).await;
        }
    }
}

/// Why a peer's long-lived `Raft` call ended, for the log.
fn why_call_ended(
    r: Result<
        Result<tonic::Response<flotilla_proto::raft::Done>, tonic::Status>,
        tokio::task::JoinError,
    >,
) -> String {
    match r {
        Ok(Ok(_)) => "closed by peer".to_string(),
        Ok(Err(s)) => format!("{:?}: {}", s.code(), s.message()),
        Err(e) => e.to_string(),
    }
}

fn encode(m: &RaftMessage) -> RaftEnvelope {
    let (message, extra) = match m.extra {
        None => (
            Bytes::from(m.msg.write_to_bytes().expect("raft messages always encode")),
            None,
        ),
        Some(extra) => (Bytes::new(), Some(crate::extra::encode(extra))),
    };
    RaftEnvelope {
        shard_id: m.shard_id,
        from_node: m.from_node,
        to_node: m.to_node,
        from_replica: m.from_replica,
        to_replica: m.to_replica,
        epoch: Some(m.epoch),
        message,
        extra,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::time::Instant;

    use flotilla_proto::raft::raft_server::{Raft, RaftServer};
    use flotilla_proto::raft::{Done, RaftBatch, SnapshotChunk};
    use raft::eraftpb::{Entry, Message, MessageType};
    use tonic::{Request, Response, Status, Streaming};

    use super::*;

    /// A peer whose first raft call never reads its stream (as a handler
    /// stuck, or a proxy that lost its upstream); later calls read.
    #[derive(Default)]
    struct StuckOnce {
        calls: AtomicUsize,
        received: Arc<AtomicUsize>,
    }

    #[tonic::async_trait]
    impl Raft for StuckOnce {
        async fn raft(&self, req: Request<Streaming<RaftBatch>>) -> Result<Response<Done>, Status> {
            if self.calls.fetch_add(1, Ordering::SeqCst) == 0 {
                std::future::pending::<()>().await;
            }
            let mut s = req.into_inner();
            while let Some(b) = s.message().await? {
                self.received.fetch_add(b.messages.len(), Ordering::SeqCst);
            }
            Ok(Response::new(Done {}))
        }

        async fn snapshot(
            &self,
            _req: Request<Streaming<SnapshotChunk>>,
        ) -> Result<Response<Done>, Status> {
            Err(Status::unimplemented("no snapshots here"))
        }
    }

    /// Node 1's transport, with node 2 at `addr`.
    fn client_of_node_1(addr: String, cfg: RaftClientConfig, dir: &std::path::Path) -> RaftClient {
        let addresses = AddressBook::default();
        addresses.set(2, addr);
        RaftClient::new(
            1,
            cfg,
            addresses,
            Arc::new(SnapManager::open(dir).unwrap()),
            tokio::runtime::Handle::current(),
        )
    }

    fn big_append(i: u64) -> RaftMessage {
        let mut msg = Message::default();
        msg.set_msg_type(MessageType::MsgAppend);
        let e = Entry {
            index: i,
            data: vec![7u8; 256 << 10].into(),
            ..Default::default()
        };
        msg.entries = vec![e].into();
        RaftMessage {
            shard_id: 1,
            from_node: 1,
            to_node: 2,
            from_replica: 1,
            to_replica: 2,
            epoch: Default::default(),
            msg,
            extra: None,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stream_that_takes_nothing_is_replaced() {
        let peer = StuckOnce::default();
        let received = peer.received.clone();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(RaftServer::new(peer))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let dir = tempfile::tempdir().unwrap();
        let cfg = RaftClientConfig {
            stall_timeout: Duration::from_millis(300),
            ..Default::default()
        };
        let client = client_of_node_1(addr, cfg, dir.path());
        // The first stream's flow-control window and queue fill and stay
        // full; the stall is noticed and a new call delivers.
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut i = 0;
        while received.load(Ordering::SeqCst) == 0 {
            assert!(
                Instant::now() < deadline,
                "nothing delivered after the stall"
            );
            i += 1;
            client.send(big_append(i));
            client.flush();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A peer that comes back while its sender backs off is reached as soon
    /// as it opens a stream to this node, not when the back-off ends.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_peer_heard_again_is_reconnected_at_once() {
        // A port nobody listens on for now.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let backoff = Duration::from_secs(30);
        let cfg = RaftClientConfig {
            backoff_base: backoff,
            backoff_max: backoff,
            ..Default::default()
        };
        let client = client_of_node_1(addr.to_string(), cfg, dir.path());
        // The first attempt is refused; the task now waits out 30 s.
        client.send(big_append(1));
        client.flush();
        let refused = || {
            metrics::RECONNECTS
                .with_label_values(&["2", "failed"])
                .get()
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while refused() == 0 {
            assert!(Instant::now() < deadline, "the first connect never failed");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let peer = StuckOnce::default();
        peer.calls.store(1, Ordering::SeqCst);
        let received = peer.received.clone();
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(RaftServer::new(peer))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let up = Instant::now();
        client.peer_is_up(2);
        while received.load(Ordering::SeqCst) == 0 {
            assert!(
                up.elapsed() < backoff / 3,
                "the peer was reached only after the back-off"
            );
            client.send(big_append(2));
            client.flush();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
