//! What the gRPC services share, and how raftstore outcomes become
//! responses.
//!
//! A handler returns `Result<Response, HandlerError>`. A raftstore routing
//! error becomes the response's structured `error` field (the client fixes
//! its route and retries); bad input and internal failures become a gRPC
//! status. Every request is counted and timed by method and outcome.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use flotilla_proto::error as pb;
use flotilla_proto::kv::ShardContext;
use flotilla_proto::raftcmd::WriteCommand;
use flotilla_raftstore::{
    Error as StoreError, KeySpan, ReadMode, ReadRequest, StoreRouter, WriteCallback, WriteRequest,
    WriteResult,
};
use flotilla_storage::kv::KvSnapshot;
use flotilla_storage::{DiskStatus, KvEngine, RaftLogEngine};
use flotilla_transport::AddressBook;
use tokio::sync::oneshot;
use tonic::{Response, Status};

use crate::config::Config;
use crate::directory::Directory;
use crate::metrics;

/// State shared by the Kv, Admin and status services of one node.
pub struct NodeContext {
    pub node_id: u64,
    pub addr: String,
    pub cfg: Config,
    pub router: StoreRouter,
    pub kv: KvEngine,
    pub raft: Arc<RaftLogEngine>,
    pub directory: Arc<Directory>,
    pub addresses: AddressBook,
    pub started: Instant,
    pub disk: Arc<DiskStatus>,
    /// The node registry says this node was removed from the cluster: it
    /// serves no more requests.
    pub removed: std::sync::atomic::AtomicBool,
}

pub enum HandlerError {
    Status(Status),
    Store(StoreError),
}

impl From<Status> for HandlerError {
    fn from(s: Status) -> Self {
        HandlerError::Status(s)
    }
}

impl From<StoreError> for HandlerError {
    fn from(e: StoreError) -> Self {
        HandlerError::Store(e)
    }
}

/// A response type with a structured `error` field.
pub trait WithError: Default {
    fn set_error(&mut self, e: pb::Error);
}

macro_rules! with_error {
    ($($t:ty),*) => {$(
        impl WithError for $t {
            fn set_error(&mut self, e: pb::Error) {
                self.error = Some(e);
            }
        }
    )*};
}

use flotilla_proto::kv::*;
with_error!(
    GetResponse,
    BatchGetResponse,
    PutResponse,
    BatchPutResponse,
    DeleteResponse,
    DeleteRangeResponse,
    ScanResponse,
    CompareAndSwapResponse
);

impl NodeContext {
    pub fn request_timeout(&self) -> Duration {
        self.cfg.request_timeout()
    }

    /// Runs a handler body, turning its outcome into a response and metrics.
    pub async fn run<R: WithError>(
        &self,
        method: &'static str,
        body: impl Future<Output = Result<R, HandlerError>>,
    ) -> Result<Response<R>, Status> {
        let started = Instant::now();
        let out = match self.refuse_if_removed() {
            Err(s) => Err(s.into()),
            Ok(()) => body.await,
        };
        self.conclude(method, started, out)
    }

    /// A node the registry removed serves no more requests.
    pub fn refuse_if_removed(&self) -> Result<(), Status> {
        if self.removed.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(Status::failed_precondition(format!(
                "node {} was removed from the cluster",
                self.node_id
            )));
        }
        Ok(())
    }

    /// Turns a handler's outcome into its response (a routing error into
    /// the response's `error` field), counting and timing it.
    pub fn conclude<R: WithError>(
        &self,
        method: &'static str,
        started: Instant,
        out: Result<R, HandlerError>,
    ) -> Result<Response<R>, Status> {
        let (code, out) = match out {
            Ok(r) => ("ok", Ok(Response::new(r))),
            Err(HandlerError::Status(s)) => (status_label(&s), Err(s)),
            Err(HandlerError::Store(e)) => match self.to_pb_error(e) {
                Ok((kind, err)) => {
                    let mut r = R::default();
                    r.set_error(err);
                    (kind, Ok(Response::new(r)))
                }
                Err(s) => (status_label(&s), Err(s)),
            },
        };
        metrics::GRPC_REQUESTS
            .with_label_values(&[method, code])
            .inc();
        if flotilla_storage::metrics::detailed() {
            metrics::GRPC_DURATION
                .with_label_values(&[method])
                .observe(started.elapsed().as_secs_f64());
        }
        out
    }

    /// Maps a raftstore error to a structured error (with its metric label),
    /// or to a gRPC status for errors that are not about routing.
    pub fn to_pb_error(&self, e: StoreError) -> Result<(&'static str, pb::Error), Status> {
        use pb::error::Kind;
        let message = e.to_string();
        let (label, kind) = match e {
            StoreError::NotLeader { shard_id, leader } => {
                let leader_address = leader
                    .as_ref()
                    .and_then(|l| self.addresses.get(l.node_id))
                    .unwrap_or_default();
                (
                    "not_leader",
                    Kind::NotLeader(pb::NotLeader {
                        shard_id,
                        leader,
                        leader_address,
                    }),
                )
            }
            StoreError::EpochNotMatch { current, .. } => {
                for d in &current {
                    self.directory.update(d.clone());
                }
                (
                    "epoch_not_match",
                    Kind::EpochNotMatch(pb::EpochNotMatch {
                        current_shards: current,
                    }),
                )
            }
            StoreError::ShardNotFound(shard_id) => (
                "shard_not_found",
                Kind::ShardNotFound(pb::ShardNotFound { shard_id }),
            ),
            StoreError::KeyNotInShard {
                key,
                shard_id,
                start,
                end,
            } => (
                "key_not_in_shard",
                Kind::KeyNotInShard(pb::KeyNotInShard {
                    key: key.into(),
                    shard_id,
                    start_key: start.into(),
                    end_key: end.into(),
                }),
            ),
            StoreError::ServerIsBusy(reason) => (
                "server_is_busy",
                Kind::ServerIsBusy(pb::ServerIsBusy { reason }),
            ),
            StoreError::StaleCommand(_) => {
                ("stale_command", Kind::StaleCommand(pb::StaleCommand {}))
            }
            StoreError::Indeterminate(_) => {
                ("indeterminate", Kind::Indeterminate(pb::Indeterminate {}))
            }
            StoreError::Shutdown => {
                return Err(Status::unavailable(
                    "node is shutting down; a write's outcome is unknown",
                ))
            }
            StoreError::Storage(s) => return Err(Status::internal(s)),
            StoreError::Rejected(s) => return Err(Status::failed_precondition(s)),
        };
        Ok((
            label,
            pb::Error {
                message,
                kind: Some(kind),
            },
        ))
    }

    /// Proposes a client's write and waits for it to apply.
    pub async fn propose(
        &self,
        ctx: Option<ShardContext>,
        command: WriteCommand,
    ) -> Result<WriteResult, HandlerError> {
        self.propose_in(require_context(ctx)?, command).await
    }

    /// Proposes a write to any shard (the meta shard included) and waits
    /// for it to apply.
    pub async fn propose_in(
        &self,
        ctx: ShardContext,
        command: WriteCommand,
    ) -> Result<WriteResult, HandlerError> {
        self.propose_in_then(ctx, command, || {}).await
    }

    /// [`Self::propose_in`], and `on_outcome` runs on the apply poller
    /// when the write's outcome is known, even if this call timed out or
    /// was dropped by then (a proposal that commits after its caller gave
    /// up still takes effect).
    pub async fn propose_in_then(
        &self,
        ctx: ShardContext,
        command: WriteCommand,
        on_outcome: impl FnOnce() + Send + 'static,
    ) -> Result<WriteResult, HandlerError> {
        let (tx, rx) = oneshot::channel();
        self.submit(
            ctx,
            command,
            Box::new(move |r| {
                on_outcome();
                let _ = tx.send(r);
            }),
        )?;
        match tokio::time::timeout(self.request_timeout(), rx).await {
            Err(_) => Err(self.timed_out().into()),
            Ok(Err(_)) => Err(StoreError::Shutdown.into()),
            Ok(Ok(r)) => Ok(r?),
        }
    }

    /// Hands a write to its shard's replica; `cb` gets its outcome (always,
    /// once) unless this returns an error. The caller bounds the wait by
    /// `request_timeout` and answers [`NodeContext::timed_out`] past it.
    pub fn submit(
        &self,
        ctx: ShardContext,
        command: WriteCommand,
        cb: WriteCallback,
    ) -> Result<(), HandlerError> {
        if let Some(why) = self.disk.refusal() {
            return Err(Status::resource_exhausted(why).into());
        }
        self.router.write(WriteRequest {
            shard_id: ctx.shard_id,
            epoch: ctx.epoch.unwrap_or_default(),
            command,
            cb,
        });
        Ok(())
    }

    /// The answer to a write not applied within `request_timeout`: it may
    /// still apply.
    pub fn timed_out(&self) -> StoreError {
        StoreError::Indeterminate(format!(
            "the command did not apply within server.request-timeout-ms = {}",
            self.cfg.server.request_timeout_ms
        ))
    }

    /// Waits until this replica may serve a read of `spans` from its applied
    /// state under the context's read mode (linearizable for every mode but
    /// STALE). Returns a snapshot of the data taken the moment the replica
    /// allowed the read (later changes, such as a snapshot install on a
    /// follower, do not show), and the shard's end key (for scans that run
    /// to its end).
    pub async fn read_barrier(
        &self,
        ctx: &ShardContext,
        spans: Vec<KeySpan>,
    ) -> Result<(KvSnapshot, bytes::Bytes), HandlerError> {
        let mode = ReadMode::try_from(ctx.read_mode).map_err(|_| {
            HandlerError::Status(Status::invalid_argument(format!(
                "context.read_mode: unknown value {} (0 leader, 1 leader-read-index, 2 follower, 3 stale)",
                ctx.read_mode
            )))
        })?;
        let (tx, rx) = oneshot::channel();
        let kv = self.kv.clone();
        self.router.read(ReadRequest {
            shard_id: ctx.shard_id,
            epoch: ctx.epoch.unwrap_or_default(),
            spans,
            mode,
            cb: Box::new(move |r| {
                let _ = tx.send(r.map(|()| kv.snapshot()));
            }),
        });
        match tokio::time::timeout(self.request_timeout(), rx).await {
            Err(_) => Err(StoreError::ServerIsBusy(format!(
                "shard {} could not confirm leadership for a read within server.request-timeout-ms = {}",
                ctx.shard_id, self.cfg.server.request_timeout_ms
            ))
            .into()),
            Ok(Err(_)) => Err(StoreError::Shutdown.into()),
            Ok(Ok(r)) => {
                let snap = r?;
                let end = self
                    .router
                    .meta()
                    .get(ctx.shard_id)
                    .map(|m| m.descriptor.end_key)
                    .unwrap_or_default();
                Ok((snap, end))
            }
        }
    }
}

/// The context of a request for user data: present, and not naming the
/// meta shard (id 0), whose data only the node's meta service touches.
pub fn require_context(ctx: Option<ShardContext>) -> Result<ShardContext, Status> {
    let ctx =
        ctx.ok_or_else(|| Status::invalid_argument("context (shard id and epoch) is required"))?;
    if ctx.shard_id == flotilla_storage::META_SHARD_ID {
        return Err(Status::invalid_argument(
            "context.shard_id: 0 is the cluster's meta shard, not a data shard",
        ));
    }
    Ok(ctx)
}

fn status_label(s: &Status) -> &'static str {
    use tonic::Code::*;
    match s.code() {
        InvalidArgument => "invalid_argument",
        Unavailable => "unavailable",
        Internal => "internal",
        DeadlineExceeded => "deadline_exceeded",
        ResourceExhausted => "resource_exhausted",
        OutOfRange => "out_of_range",
        NotFound => "not_found",
        _ => "other",
    }
}
