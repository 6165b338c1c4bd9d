//! The apply poll round: every shard's committed entries go into one
//! RocksDB write batch; callbacks are answered after the write.

use std::time::Instant;

use crossbeam_channel::Receiver;
use flotilla_batch_system::{Fsm, HandleResult, HandlerBuilder, PollHandler};
use flotilla_storage::KvEngine;
use rocksdb::WriteBatch;

use super::fsm::ApplyFsm;
use super::overlay::Overlay;
use crate::msg::{ApplyResult, ReplicaMsg, WriteCallback, WriteResult};
use crate::replica::poller::RaftRouter;
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

/// What one apply round accumulates.
pub struct ApplyCtx {
    pub kv: KvEngine,
    pub wb: WriteBatch,
    pub overlay: Overlay,
    /// Callbacks to answer once the batch is written, with the proposal
    /// time for latency metrics.
    pub answers: Vec<(WriteCallback, Result<WriteResult>, Option<Instant>)>,
    pub results: Vec<(ShardId, ApplyResult)>,
    pub entries: u64,
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

    fn end(&mut self, _normals: &mut [Box<ApplyFsm>]) {
        let ctx = &mut self.ctx;
        if !ctx.wb.is_empty() {
            let wb = std::mem::take(&mut ctx.wb);
            if let Err(e) = ctx.kv.write(wb, false) {
                // The entries are committed; skipping them would diverge
                // this replica from the others.
                tracing::error!(error = %e, "applying committed entries to RocksDB failed; stopping the node");
                panic!("apply write failed: {e}");
            }
        }
        ctx.overlay.clear();
        metrics::APPLIED_ENTRIES.inc_by(ctx.entries);
        ctx.entries = 0;
        for (cb, result, proposed_at) in ctx.answers.drain(..) {
            if let Some(t) = proposed_at {
                metrics::APPLY_DURATION.observe(t.elapsed().as_secs_f64());
            }
            cb(result);
        }
        for (shard_id, res) in ctx.results.drain(..) {
            let _ = self
                .raft_router
                .force_send(shard_id, ReplicaMsg::Applied(res));
        }
        metrics::APPLY_ROUND_DURATION.observe(self.started.elapsed().as_secs_f64());
        metrics::POLL_ROUND_FSMS
            .with_label_values(&["apply"])
            .observe(self.batch_size as f64);
    }
}

pub struct ApplyPollerBuilder {
    pub kv: KvEngine,
    pub raft_router: RaftRouter,
}

impl HandlerBuilder<ApplyFsm, ApplyControlFsm> for ApplyPollerBuilder {
    type Handler = ApplyPoller;
    fn build(&mut self) -> ApplyPoller {
        ApplyPoller {
            ctx: ApplyCtx {
                kv: self.kv.clone(),
                wb: WriteBatch::default(),
                overlay: Overlay::default(),
                answers: Vec::new(),
                results: Vec::new(),
                entries: 0,
            },
            raft_router: self.raft_router.clone(),
            started: Instant::now(),
            batch_size: 0,
        }
    }
}
