//! The raft poll round: every replica with work in the batch is handled,
//! then the round's raft-engine writes go to disk in ONE synced write, then
//! each replica sends what waited for that write and advances.
//!
//! ```text
//! begin ─► handle_control(NodeFsm) ─► handle_normal(ReplicaFsm)* ─► end
//!                                      │ step, propose, read_index,        │ flush leader msgs
//!                                      │ stage entries + hard state        │ ONE LogBatch write (fsync)
//!                                      ▼ into the round's LogBatch         ▼ persisted msgs, advance
//! ```
//!
//! The leader's own messages (appends, heartbeats) are flushed before the
//! fsync so followers write in parallel with the leader (Raft thesis
//! 10.2.1); acknowledgements and votes leave only after it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use flotilla_batch_system::{BasicMailbox, Fsm, HandleResult, HandlerBuilder, PollHandler, Router};
use flotilla_storage::{KvEngine, RaftLogEngine, SnapManager};

use crate::apply::{ApplyControlFsm, ApplyFsm};
use crate::config::Config;
use crate::liveness::NodeLiveness;
use crate::meta::StoreMeta;
use crate::msg::{ControlMsg, ReplicaMsg};
use crate::replica::fsm::{ReplicaFsm, RoundCtx};
use crate::transport::RaftMessage;
use crate::transport::Transport;
use flotilla_proto::meta::ShardDescriptor;

use crate::{metrics, NodeId, ReplicaId, ShardId};

pub type RaftRouter = Router<ReplicaFsm, NodeFsm>;
pub type ApplyRouter = Router<ApplyFsm, ApplyControlFsm>;

/// What every raft poller shares.
pub struct PollContext {
    pub node_id: NodeId,
    pub cfg: Config,
    pub raft_engine: Arc<RaftLogEngine>,
    pub kv: KvEngine,
    pub transport: Arc<dyn Transport>,
    pub apply_router: ApplyRouter,
    pub raft_router: RaftRouter,
    pub meta: Arc<StoreMeta>,
    pub snap_mgr: Arc<SnapManager>,
    pub gc_tasks: crossbeam_channel::Sender<crate::worker::GcTask>,
    /// None when size-based splitting is off.
    pub split_checks: Option<crossbeam_channel::Sender<crate::worker::SplitCheckTask>>,
    pub liveness: Arc<NodeLiveness>,
}

/// How long vote requests for a shard not hosted here are kept, in case a
/// split applied here is about to create it.
const PARK_FOR: Duration = Duration::from_secs(2);
const PARKED_PER_SHARD: usize = 8;
const PARKED_SHARDS: usize = 1024;

/// The node's control FSM on the raft pollers: messages for shards the node
/// does not host and replicas created by splits.
/// It is the only place replicas are created after start-up, so creation
/// by a message and creation by a split never race.
pub struct NodeFsm {
    receiver: Receiver<ControlMsg>,
    /// Messages for unknown shards that may not create a replica (vote
    /// requests): the new shard of a split that the leader's node applied
    /// first campaigns at once, and its votes arrive here before this node
    /// applied the split. Delivered if a split creates the shard soon.
    parked: HashMap<ShardId, Vec<(Instant, RaftMessage)>>,
}

impl NodeFsm {
    pub fn new(receiver: Receiver<ControlMsg>) -> Self {
        NodeFsm {
            receiver,
            parked: HashMap::new(),
        }
    }

    fn handle(&mut self, ctx: &PollContext) {
        while let Ok(msg) = self.receiver.try_recv() {
            match msg {
                ControlMsg::UnknownShard(m) => {
                    if let Some(m) = maybe_create_replica(*m, ctx) {
                        self.park(m);
                    }
                }
                ControlMsg::SplitCreated {
                    shard,
                    replica_id,
                    campaign,
                } => {
                    let id = shard.id;
                    create_split_replica(shard, replica_id, campaign, ctx);
                    for (_, m) in self.parked.remove(&id).unwrap_or_default() {
                        let _ = ctx.raft_router.send(id, ReplicaMsg::Raft(Box::new(m)));
                    }
                }
                ControlMsg::Tick => {
                    self.parked.retain(|_, msgs| {
                        msgs.retain(|(at, _)| at.elapsed() < PARK_FOR);
                        !msgs.is_empty()
                    });
                }
            }
        }
    }

    fn park(&mut self, m: RaftMessage) {
        use raft::eraftpb::MessageType::*;
        if !matches!(m.msg.get_msg_type(), MsgRequestVote | MsgRequestPreVote) {
            return;
        }
        if self.parked.len() >= PARKED_SHARDS && !self.parked.contains_key(&m.shard_id) {
            return;
        }
        let msgs = self.parked.entry(m.shard_id).or_default();
        if msgs.len() < PARKED_PER_SHARD {
            msgs.push((Instant::now(), m));
        }
    }
}

/// Starts this node's replica of a shard a split just created (its shard
/// and apply states are on disk). An uninitialized replica a message
/// created first becomes it; otherwise a new one starts, and campaigns at
/// once if the split shard's replica here led (its peers then follow
/// without waiting out an election timeout).
fn create_split_replica(
    shard: ShardDescriptor,
    replica_id: ReplicaId,
    campaign: bool,
    ctx: &PollContext,
) {
    let shard_id = shard.id;
    let (atx, arx) = crossbeam_channel::unbounded();
    let apply = ApplyFsm::new(
        shard.clone(),
        replica_id,
        flotilla_storage::replica_storage::initial_apply_state(),
        arx,
    );
    if ctx.raft_router.mailbox(shard_id).is_some() {
        ctx.apply_router
            .register(shard_id, BasicMailbox::new(atx, Box::new(apply)));
        let _ = ctx
            .raft_router
            .force_send(shard_id, ReplicaMsg::InitBySplit(shard));
        return;
    }
    let (tx, rx) = crossbeam_channel::unbounded();
    let mut replica = match ReplicaFsm::create_by_split(ctx, shard.clone(), replica_id, rx) {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(shard_id, error = %e, "creating a replica of a split shard failed; stopping the node");
            panic!("creating replica {replica_id} of split shard {shard_id} failed: {e}");
        }
    };
    if campaign {
        replica.campaign();
    }
    register_replica(ctx, replica, tx, apply, atx);
    let _ = ctx.raft_router.force_send(shard_id, ReplicaMsg::Wake);
    tracing::info!(
        shard_id,
        replica_id,
        campaign,
        "created a replica of a split shard"
    );
}

impl Fsm for NodeFsm {
    type Message = ControlMsg;
    fn is_stopped(&self) -> bool {
        false
    }
}

/// A leader talks to a replica this node does not host: it was added to the
/// shard. Create it uninitialized (it catches up by snapshot), unless it is
/// a replica this node already removed (a tombstone with that id or a newer
/// one) or the message cannot come from a leader. A replica created by an
/// earlier message of the same batch simply gets the message. Returns a
/// message that created nothing.
fn maybe_create_replica(m: RaftMessage, ctx: &PollContext) -> Option<RaftMessage> {
    let shard_id = m.shard_id;
    if ctx.raft_router.mailbox(shard_id).is_none() {
        if let Some(why) = creation_refusal(&m, ctx) {
            metrics::RAFT_MESSAGES_RECEIVED
                .with_label_values(&["unknown_shard"])
                .inc();
            tracing::debug!(
                shard_id,
                from_node = m.from_node,
                to_replica = m.to_replica,
                why,
                "dropping a raft message for a shard not hosted here"
            );
            return Some(m);
        }
        if let Err(e) = create_replica(&m, ctx) {
            tracing::error!(shard_id, error = %e, "creating a replica failed");
            return None;
        }
    }
    let _ = ctx
        .raft_router
        .send(shard_id, ReplicaMsg::Raft(Box::new(m)));
    None
}

/// Why a message for an unknown shard must not create a replica.
fn creation_refusal(m: &RaftMessage, ctx: &PollContext) -> Option<&'static str> {
    use flotilla_proto::local::ShardState;
    use raft::eraftpb::MessageType::*;
    if !matches!(m.msg.get_msg_type(), MsgAppend | MsgHeartbeat | MsgSnapshot) {
        return Some("not from a leader");
    }
    match ctx.kv.shard_state(m.shard_id) {
        Ok(Some(s)) if s.state == ShardState::Tombstone as i32 && s.replica_id >= m.to_replica => {
            Some("the replica was removed from this node")
        }
        Ok(Some(s)) if s.state != ShardState::Tombstone as i32 => {
            Some("the shard is on disk but not running")
        }
        Ok(_) => None,
        Err(_) => Some("reading the shard state failed"),
    }
}

/// Puts a replica created after start-up to work: its apply FSM, its entry
/// in the node's meta, then its raft mailbox (last, so whatever reaches it
/// finds the rest in place).
fn register_replica(
    ctx: &PollContext,
    replica: ReplicaFsm,
    tx: crossbeam_channel::Sender<ReplicaMsg>,
    apply: ApplyFsm,
    atx: crossbeam_channel::Sender<crate::msg::ApplyMsg>,
) {
    let shard_id = replica.shard_id();
    ctx.apply_router
        .register(shard_id, BasicMailbox::new(atx, Box::new(apply)));
    ctx.meta.insert(crate::meta::ShardMeta {
        descriptor: replica.descriptor().clone(),
        replica_id: replica.replica_id(),
        leader_id: 0,
        term: replica.term(),
        down_replicas: 0,
    });
    ctx.raft_router
        .register(shard_id, BasicMailbox::new(tx, Box::new(replica)));
    metrics::SHARDS.inc();
    metrics::REPLICA_LIFECYCLE
        .with_label_values(&["created"])
        .inc();
}

/// Registers a new uninitialized replica and its apply FSM.
fn create_replica(m: &RaftMessage, ctx: &PollContext) -> crate::Result<()> {
    let shard_id = m.shard_id;
    let (tx, rx) = crossbeam_channel::unbounded();
    let replica = ReplicaFsm::create_uninitialized(ctx, shard_id, m.to_replica, rx)?;
    let (atx, arx) = crossbeam_channel::unbounded();
    let apply = ApplyFsm::new(
        replica.descriptor().clone(),
        m.to_replica,
        Default::default(),
        arx,
    );
    register_replica(ctx, replica, tx, apply, atx);
    tracing::info!(
        shard_id,
        replica_id = m.to_replica,
        from_node = m.from_node,
        "created a replica added by its leader; waiting for a snapshot"
    );
    Ok(())
}

pub struct RaftPoller {
    ctx: Arc<PollContext>,
    round: RoundCtx,
    started: Instant,
    batch_size: usize,
}

impl PollHandler<ReplicaFsm, NodeFsm> for RaftPoller {
    fn begin(&mut self, batch_size: usize) {
        self.started = Instant::now();
        self.batch_size = batch_size;
        self.round.sync = false;
        self.round.readies = 0;
    }

    fn handle_control(&mut self, control: &mut NodeFsm) -> Option<usize> {
        control.handle(&self.ctx);
        Some(0)
    }

    fn handle_normal(&mut self, fsm: &mut ReplicaFsm) -> HandleResult {
        fsm.handle_messages(&self.ctx, &mut self.round)
    }

    fn end(&mut self, normals: &mut [Box<ReplicaFsm>]) {
        let ctx = &*self.ctx;
        ctx.transport.flush();
        if !self.round.log_batch.is_empty() {
            if let Err(e) = ctx
                .raft_engine
                .write(&mut self.round.log_batch, self.round.sync)
            {
                // Continuing would acknowledge writes that are not on disk.
                tracing::error!(error = %e, "raft-engine write failed; stopping the node");
                panic!("raft-engine write failed: {e}");
            }
            fail::fail_point!("raft_after_log_write");
        }
        for fsm in normals.iter_mut() {
            if fsm.has_pending_ready() {
                fsm.post_persist(ctx);
            }
        }
        ctx.transport.flush();
        if !flotilla_storage::metrics::detailed() {
            return;
        }
        metrics::POLL_ROUND_DURATION
            .with_label_values(&["raft"])
            .observe(self.started.elapsed().as_secs_f64());
        metrics::POLL_ROUND_FSMS
            .with_label_values(&["raft"])
            .observe(self.batch_size as f64);
        if self.round.readies > 0 {
            metrics::POLL_ROUND_READIES.observe(self.round.readies as f64);
        }
    }
}

pub struct RaftPollerBuilder {
    pub ctx: Arc<PollContext>,
}

impl HandlerBuilder<ReplicaFsm, NodeFsm> for RaftPollerBuilder {
    type Handler = RaftPoller;
    fn build(&mut self) -> RaftPoller {
        RaftPoller {
            ctx: self.ctx.clone(),
            round: RoundCtx::default(),
            started: Instant::now(),
            batch_size: 0,
        }
    }
}
