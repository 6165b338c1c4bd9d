//! The apply poll round: every shard's committed entries go into one
//! RocksDB write batch; then what had to wait for the write (snapshots,
//! hashes), then callbacks, then results to the replica FSMs.

use std::sync::Arc;
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender};
use flotilla_batch_system::{Fsm, HandleResult, HandlerBuilder, PollHandler};
use flotilla_storage::{KvEngine, SnapManager};
use rocksdb::WriteBatch;

use super::fsm::ApplyFsm;
use super::overlay::Overlay;
use crate::msg::{AdminCallback, AdminResult, ApplyResult, ReplicaMsg, WriteCallback, WriteResult};
use crate::replica::poller::RaftRouter;
use crate::worker::SnapJob;
use crate::{metrics, Result, ShardId};

/// The apply pool's control FSM. It has nothing to do yet; the batch-system
/// requires one.
pub struct ApplyControlFsm {
    receiver: Receiver<()>,
}

impl ApplyControlFsm {
    pub fn new(receiver: Receiver<()>) -> Self {
        ApplyControlFsm { receiver }
    }
}

impl Fsm for ApplyControlFsm {
    type Message = ();
    fn is_stopped(&self) -> bool {
        false
    }
}

/// A callback to answer once the round's batch is written.
pub enum Answer {
    /// A client write, with its proposal time for latency metrics.
    Write(WriteCallback, Result<WriteResult>, Option<Instant>),
    Admin(AdminCallback, Result<AdminResult>),
}

/// What one apply round accumulates.
pub struct ApplyCtx {
    pub kv: KvEngine,
    pub snap_mgr: Arc<SnapManager>,
    pub snap_jobs: Sender<SnapJob>,
    pub wb: WriteBatch,
    /// Writes of this round to user data (`default`).
    pub overlay: Overlay,
    /// Writes of this round to the meta shard's data (`cluster`).
    pub cluster_overlay: Overlay,
    pub answers: Vec<Answer>,
    pub results: Vec<(ShardId, ApplyResult)>,
    pub entries: u64,
    /// The round applied a split or a membership change: its batch is
    /// written with sync. The raft side acts on those outside RocksDB (a new
    /// shard's raft state, a removed replica's destruction), so they must
    /// not be lost to a crash that keeps those effects: the WAL is buffered
    /// in memory between syncs (`manual_wal_flush`, see `KvEngine::open`).
    pub sync: bool,
}

pub struct ApplyPoller {
    ctx: ApplyCtx,
    raft_router: RaftRouter,
    started: Instant,
    batch_size: usize,
}

impl PollHandler<ApplyFsm, ApplyControlFsm> for ApplyPoller {
    fn begin(&mut self, batch_size: usize) {
        self.started = Instant::now();
        self.batch_size = batch_size;
    }

    fn handle_control(&mut self, control: &mut ApplyControlFsm) -> Option<usize> {
        while control.receiver.try_recv().is_ok() {}
        Some(0)
    }

    fn handle_normal(&mut self, fsm: &mut ApplyFsm) -> HandleResult {
        fsm.handle(&mut self.ctx)
    }

    fn end(&mut self, normals: &mut [Box<ApplyFsm>]) {
        let ctx = &mut self.ctx;
        if !ctx.wb.is_empty() {
            fail::fail_point!("apply_before_write");
            let wb = std::mem::take(&mut ctx.wb);
            if let Err(e) = ctx.kv.write(wb, std::mem::take(&mut ctx.sync)) {
                // The entries are committed; skipping them would diverge
                // this replica from the others.
                tracing::error!(error = %e, "applying committed entries to RocksDB failed; stopping the node");
                panic!("apply write failed: {e}");
            }
        }
        ctx.overlay.clear();
        ctx.cluster_overlay.clear();
        for fsm in normals.iter_mut() {
            fsm.finish_round(ctx);
        }
        metrics::APPLIED_ENTRIES.inc_by(ctx.entries);
        ctx.entries = 0;
        for answer in ctx.answers.drain(..) {
            match answer {
                Answer::Write(cb, result, proposed_at) => {
                    if let (Some(t), true) = (proposed_at, flotilla_storage::metrics::detailed()) {
                        metrics::APPLY_DURATION.observe(t.elapsed().as_secs_f64());
                    }
                    cb(result);
                }
                Answer::Admin(cb, result) => cb(result),
            }
        }
        for (shard_id, res) in ctx.results.drain(..) {
            let _ = self
                .raft_router
                .force_send(shard_id, ReplicaMsg::Applied(res));
        }
        if flotilla_storage::metrics::detailed() {
            metrics::APPLY_ROUND_DURATION.observe(self.started.elapsed().as_secs_f64());
            metrics::POLL_ROUND_FSMS
                .with_label_values(&["apply"])
                .observe(self.batch_size as f64);
        }
    }
}

pub struct ApplyPollerBuilder {
    pub kv: KvEngine,
    pub snap_mgr: Arc<SnapManager>,
    pub snap_jobs: Sender<SnapJob>,
    pub raft_router: RaftRouter,
}

impl HandlerBuilder<ApplyFsm, ApplyControlFsm> for ApplyPollerBuilder {
    type Handler = ApplyPoller;
    fn build(&mut self) -> ApplyPoller {
        ApplyPoller {
            ctx: ApplyCtx {
                kv: self.kv.clone(),
                snap_mgr: self.snap_mgr.clone(),
                snap_jobs: self.snap_jobs.clone(),
                wb: WriteBatch::default(),
                overlay: Overlay::default(),
                cluster_overlay: Overlay::default(),
                answers: Vec::new(),
                results: Vec::new(),
                entries: 0,
                sync: false,
            },
            raft_router: self.raft_router.clone(),
            started: Instant::now(),
            batch_size: 0,
        }
    }
}
