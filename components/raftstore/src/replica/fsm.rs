//! The replica FSM: one per shard replica, holding its raft-rs `RawNode`.
//!
//! It is I/O-free: everything it does to disks and sockets is staged into the
//! poll round ([`RoundCtx`]) and flushed by the poller's `end`:
//!
//! 1. `handle_messages` steps raft messages, queues client writes and reads,
//!    ticks, and takes apply results; then it proposes the round's writes as
//!    one entry and issues the round's reads as one ReadIndex.
//! 2. `collect_ready` takes the `Ready`: the leader's messages go out at once
//!    (replication overlaps the leader's own fsync), committed entries go to
//!    the apply poller, new entries and the hard state are staged into the
//!    round's single raft-engine `LogBatch`.
//! 3. after the round's one synced write, `post_persist` sends the messages
//!    that had to wait for it (votes, append acks) and advances raft.
//!
//! # Invariants
//! - A follower never proposes: a write or leader read on a non-leader is
//!   answered `NotLeader` with the leader it knows. Follower and stale
//!   reads are served by any initialized replica (`replica::read`); lease
//!   reads only by a leader holding a lease (`replica::lease`).
//! - Every callback is answered exactly once: on apply (success, or
//!   StaleCommand when its index committed with another term), at proposal
//!   time (an error), Indeterminate when its index is passed over any other
//!   way (abandoned, covered by a snapshot, reused by a later term, replica
//!   removed), or when the node shuts down (dropped, which the caller sees
//!   as cancellation).
//! - A leader that lost leadership keeps its proposals for
//!   `abandon_proposals_after_ticks`: if their entries commit (kept by the new
//!   leader) or are replaced, apply answers them exactly. Only the ones still
//!   unresolved after that are answered Indeterminate.
//!
//! # Membership
//! A `ChangeReplicas` becomes one `ConfChangeV2` entry (joint consensus when
//! it carries several changes, left automatically). Apply validates it
//! against the descriptor and writes the new descriptor with it; this FSM
//! then has raft apply it and checks raft's configuration equals the
//! descriptor's. A replica that finds itself removed destroys itself:
//! answers every waiter, deletes its data and log, leaves a tombstone.
//! Replica ids allocated here (`(conf_ver + 1) << 32 | node_id`) are unique
//! within the shard and only grow; a cluster-wide id allocator comes with
//! the meta shard.

use std::collections::HashMap;
use std::time::Instant;

use crossbeam_channel::{Receiver, TryRecvError};
use flotilla_batch_system::{Fsm, HandleResult};
use flotilla_proto::admin::ReplicaChange;
use flotilla_proto::local::{ApplyState, ShardLocalState, SnapshotData};
use flotilla_proto::meta::{Replica, ReplicaRole, ShardDescriptor};
use flotilla_proto::raftcmd::{
    admin_command, AdminCommand, CmdHeader, CompactLog, ComputeHash, ConfChangeContext,
    RaftCommand, WriteCommand,
};
use flotilla_proto::Message as _;
use flotilla_storage::replica_storage::conf_state_of;
use flotilla_storage::{ReplicaStorage, RAFT_INIT_INDEX, RAFT_INIT_TERM};
use raft::eraftpb::{
    ConfChangeSingle, ConfChangeTransition, ConfChangeType, ConfChangeV2, Entry, Message,
    MessageType,
};
use raft::{RawNode, Ready, SnapshotStatus, StateRole, Storage as _};
use raft_engine::LogBatch;

use crate::msg::{
    AdminCallback, AdminResult, ApplyMsg, ApplyResult, ApplyTask, ControlMsg, ExecResult, KeySpan,
    Proposal, ProposalCallbacks, ReadMode, ReadRequest, ReplicaMsg, ReplicaStatus, SnapshotInstall,
    WriteCallback, WriteRequest,
};
use crate::replica::lease::Lease;
use crate::replica::poller::PollContext;
use crate::replica::proposal::ProposalQueue;
use crate::replica::read::ReadQueue;
use crate::transport::RaftMessage;
use crate::worker::GcTask;
use crate::{metrics, Error, Index, NodeId, ReplicaId, Result, ShardId};

mod hibernate;

/// What a proposal appends to the log.
enum Payload {
    Command(RaftCommand),
    ConfChange(ConfChangeContext, ConfChangeV2),
}

/// What one poll round accumulates across replicas.
#[derive(Default)]
pub struct RoundCtx {
    pub log_batch: LogBatch,
    pub sync: bool,
    pub readies: usize,
}

pub struct ReplicaFsm {
    shard_id: ShardId,
    replica_id: ReplicaId,
    descriptor: ShardDescriptor,
    raw_node: RawNode<ReplicaStorage>,
    receiver: Receiver<ReplicaMsg>,
    proposals: ProposalQueue,
    reads: ReadQueue,
    lease: Lease,
    /// Unanswered read batches go out again (through the new leader) once
    /// one is known and, on a leader, has committed in its term.
    resend_reads: bool,
    /// A replica loaded from disk ignores vote requests for this many ticks
    /// after it starts: it may have acknowledged a leader's lease just
    /// before it stopped.
    vote_guard_ticks: u64,
    /// Writes received this round, proposed together at its end.
    pending_writes: Vec<(WriteCommand, WriteCallback)>,
    pending_write_bytes: usize,
    /// The ready taken this round, advanced after the round's write.
    pending_ready: Option<Ready>,
    /// A received snapshot to hand to apply once its raft state is durable.
    pending_install: Option<SnapshotInstall>,
    was_leader: bool,
    /// Ticks since this replica stopped leading with proposals pending.
    ticks_since_stepdown: Option<usize>,
    ticks: u64,
    stopped: bool,
    /// Nodes of replicas learned from their messages: an uninitialized
    /// replica has no descriptor to find its leader's node in.
    peer_nodes: HashMap<ReplicaId, NodeId>,
    /// On a leader: the tick each other replica was last heard from (since
    /// it became leader or last woke: ticks stand still while asleep).
    last_heard: HashMap<ReplicaId, u64>,
    /// On a leader: the tick it became leader or last woke; silence is
    /// counted from there at most.
    watch_from: u64,
    /// The down count last published to the node's meta.
    reported_down: u32,
    /// The shard the last split of this shard created (named in
    /// EpochNotMatch errors, with this shard).
    split_off: Option<ShardDescriptor>,
    /// Bytes and keys written since the last split check: a check scans
    /// only after 1/16 of a threshold was written. They start full, so a
    /// replica's first check as leader scans.
    split_hint_bytes: u64,
    split_hint_keys: u64,
    /// Keys of the requests led since the last split check (load split).
    load: super::load::LoadSampler,
    /// Hibernating: left out of the node's ticks (`hibernate`).
    asleep: bool,
    /// The last leader this replica knew, with its term. A follower whose
    /// own pre-vote failed knows no leader, yet its leader's node going
    /// down concerns it (`hibernate::on_peer_node`).
    last_leader: (ReplicaId, u64),
    /// A follower woken while its leader slept, until it hears from whoever
    /// leads: raft's election clock stood still while it slept, so it says
    /// nothing of whether the leader is still heard.
    awaiting_leader: bool,
    /// On a leader: ticks in a row with nothing to do.
    idle_ticks: usize,
    /// On a leader: its request to hibernate, waiting for answers.
    announced: Option<hibernate::Announcement>,
}

impl Fsm for ReplicaFsm {
    type Message = ReplicaMsg;
    fn is_stopped(&self) -> bool {
        self.stopped
    }
}

impl ReplicaFsm {
    /// Rebuilds a replica from its on-disk state.
    pub fn recover(
        ctx: &PollContext,
        state: ShardLocalState,
        apply_state: ApplyState,
        receiver: Receiver<ReplicaMsg>,
    ) -> Result<Self> {
        let descriptor = state.shard.unwrap_or_default();
        let shard_id = descriptor.id;
        let replica_id = state.replica_id;
        let applied = apply_state.applied_index;
        let storage = ReplicaStorage::recover(
            shard_id,
            replica_id,
            ctx.raft_engine.clone(),
            apply_state,
            conf_state_of(&descriptor),
        )?;
        Self::build(ctx, descriptor, replica_id, applied, storage, receiver)
    }

    /// A replica its leader added to the shard: it has no state yet and
    /// waits for a snapshot (see `ReplicaStorage::new_uninitialized`).
    pub fn create_uninitialized(
        ctx: &PollContext,
        shard_id: ShardId,
        replica_id: ReplicaId,
        receiver: Receiver<ReplicaMsg>,
    ) -> Result<Self> {
        let storage =
            ReplicaStorage::new_uninitialized(shard_id, replica_id, ctx.raft_engine.clone())?;
        let descriptor = ShardDescriptor {
            id: shard_id,
            ..Default::default()
        };
        Self::build(ctx, descriptor, replica_id, 0, storage, receiver)
    }

    /// This node's replica of a shard a split created: its states are on
    /// disk; its raft state is written now.
    pub fn create_by_split(
        ctx: &PollContext,
        shard: ShardDescriptor,
        replica_id: ReplicaId,
        receiver: Receiver<ReplicaMsg>,
    ) -> Result<Self> {
        let previous = ctx.raft_engine.raft_state(shard.id)?;
        let storage = ReplicaStorage::for_split(
            shard.id,
            replica_id,
            ctx.raft_engine.clone(),
            previous.as_ref(),
            conf_state_of(&shard),
        )?;
        Self::build(ctx, shard, replica_id, RAFT_INIT_INDEX, storage, receiver)
    }

    /// Starts an election now.
    pub fn campaign(&mut self) {
        let _ = self.raw_node.campaign();
    }

    fn build(
        ctx: &PollContext,
        descriptor: ShardDescriptor,
        replica_id: ReplicaId,
        applied: Index,
        storage: ReplicaStorage,
        receiver: Receiver<ReplicaMsg>,
    ) -> Result<Self> {
        let shard_id = descriptor.id;
        let cfg = &ctx.cfg;
        let raft_cfg = raft::Config {
            id: replica_id,
            election_tick: cfg.election_ticks,
            heartbeat_tick: cfg.heartbeat_ticks,
            applied,
            max_size_per_msg: cfg.max_size_per_msg,
            max_inflight_msgs: cfg.max_inflight_msgs,
            check_quorum: true,
            pre_vote: true,
            read_only_option: raft::ReadOnlyOption::Safe,
            max_uncommitted_size: cfg.max_uncommitted_size,
            // Off: raft-rs 0.7 merges new entries into a queued MsgAppend
            // without checking that the queued message's index still
            // precedes them; when a follower's next index drops back in the
            // same round (a rejection, an Unreachable report), the merged
            // message makes the follower acknowledge one entry it does not
            // have, and the next heartbeat panics it ("to_commit N is out of
            // range [last_index N-1]"). Found by the chaos test. Messages to
            // a node are batched per round by the transport anyway.
            batch_append: false,
            ..Default::default()
        };
        let logger = crate::logger::replica_logger(shard_id, replica_id);
        let raw_node =
            RawNode::new(&raft_cfg, storage, &logger).map_err(|e| Error::Storage(e.to_string()))?;
        let mut fsm = ReplicaFsm {
            shard_id,
            replica_id,
            descriptor,
            raw_node,
            receiver,
            proposals: ProposalQueue::default(),
            reads: ReadQueue::new(replica_id),
            lease: Lease::new(cfg.leader_lease),
            resend_reads: false,
            vote_guard_ticks: 0,
            pending_writes: Vec::new(),
            pending_write_bytes: 0,
            pending_ready: None,
            pending_install: None,
            was_leader: false,
            ticks_since_stepdown: None,
            ticks: 0,
            stopped: false,
            peer_nodes: HashMap::new(),
            last_heard: HashMap::new(),
            watch_from: 0,
            reported_down: 0,
            split_off: None,
            split_hint_bytes: cfg.split_size,
            split_hint_keys: cfg.split_keys,
            load: Default::default(),
            asleep: false,
            last_leader: (raft::INVALID_ID, 0),
            awaiting_leader: false,
            idle_ticks: 0,
            announced: None,
        };
        ctx.meta.set_asleep(shard_id, false);
        // Nobody ever led a pristine shard, and an empty new replica (term 0)
        // acknowledged nothing, so neither has a lease to respect.
        if fsm.raw_node.raft.term != 0 && !fsm.is_pristine() {
            fsm.vote_guard_ticks = cfg.election_ticks as u64;
            fsm.stagger_first_election();
        }
        Ok(fsm)
    }

    /// After a restart the shard may have nobody to hear from: the whole
    /// cluster restarted. Left to raft's random timers, replicas of the
    /// same shard campaigned within one round trip of each other on two
    /// busy cores and split their votes, or their requests were dropped by
    /// peers still in their vote guard. The chosen voter (as node liveness
    /// picks one) campaigns first, two ticks after the vote guard of
    /// replicas started with it ends; the others wait at least one and a
    /// half election timeouts, as its fallback. A/B on `make bench-scale`'s
    /// whole-cluster restart (10,000 shards, 4 runs each, alternating):
    /// 5.05-5.65 s to ready without, 2.89-4.60 s with. A replica that hears
    /// a leader first (only its node restarted) never campaigns at all.
    fn stagger_first_election(&mut self) {
        if self.chosen_voter(None) == Some(self.replica_id) {
            let raft = &mut self.raw_node.raft;
            let timeout = raft.election_timeout();
            // Within raft's range [timeout, 2 * timeout).
            raft.set_randomized_election_timeout((timeout + 2).min(2 * timeout - 1));
        } else {
            self.hold_own_campaign();
        }
    }

    pub fn shard_id(&self) -> ShardId {
        self.shard_id
    }

    pub fn descriptor(&self) -> &ShardDescriptor {
        &self.descriptor
    }

    pub fn replica_id(&self) -> ReplicaId {
        self.replica_id
    }

    pub fn leader_id(&self) -> ReplicaId {
        self.raw_node.raft.leader_id
    }

    pub fn term(&self) -> u64 {
        self.raw_node.raft.term
    }

    fn is_leader(&self) -> bool {
        self.raw_node.raft.state == StateRole::Leader
    }

    /// A freshly bootstrapped shard: nobody has voted or written yet.
    fn is_pristine(&self) -> bool {
        let hs = &self.raw_node.raft;
        hs.term == RAFT_INIT_TERM
            && hs.vote == 0
            && self.raw_node.store().last_index() == RAFT_INIT_INDEX
    }

    /// Starts an election at once on a pristine shard whose first replica is
    /// this one, so a new cluster gets leaders (spread over nodes by the
    /// bootstrap layout) without waiting out an election timeout.
    pub fn maybe_campaign_on_start(&mut self) {
        if self.is_pristine()
            && self.descriptor.replicas.first().map(|r| r.id) == Some(self.replica_id)
        {
            let _ = self.raw_node.campaign();
        }
    }

    fn not_leader(&self) -> Error {
        Error::NotLeader {
            shard_id: self.shard_id,
            leader: self.descriptor.replica(self.leader_id()).cloned(),
        }
    }

    /// Checks a client request against leadership, epoch and range.
    fn check_request(
        &self,
        epoch: &flotilla_proto::meta::Epoch,
        spans: impl IntoIterator<Item = KeySpan>,
    ) -> Result<()> {
        if !self.is_leader() {
            return Err(self.not_leader());
        }
        if self.raw_node.raft.lead_transferee.is_some() {
            return Err(Error::ServerIsBusy(format!(
                "shard {} is transferring leadership",
                self.shard_id
            )));
        }
        self.check_epoch_and_range(epoch, spans)
    }

    /// Checks a follower or stale read: any replica with data may serve it.
    fn check_replica_read(
        &self,
        epoch: &flotilla_proto::meta::Epoch,
        spans: impl IntoIterator<Item = KeySpan>,
    ) -> Result<()> {
        if !self.raw_node.store().is_initialized() {
            return Err(self.not_leader());
        }
        if self.data_in_flux() {
            return Err(Error::ServerIsBusy(format!(
                "replica {} of shard {} is installing a snapshot",
                self.replica_id, self.shard_id
            )));
        }
        self.check_epoch_and_range(epoch, spans)
    }

    fn epoch_not_match(&self) -> Error {
        Error::epoch_not_match(&self.descriptor, self.split_off.as_ref())
    }

    fn check_epoch_and_range(
        &self,
        epoch: &flotilla_proto::meta::Epoch,
        spans: impl IntoIterator<Item = KeySpan>,
    ) -> Result<()> {
        let current = self.descriptor.epoch();
        if epoch.version != current.version {
            return Err(self.epoch_not_match());
        }
        for span in spans {
            if let Some(key) = span.outside(&self.descriptor) {
                return Err(Error::key_not_in_shard(key, &self.descriptor));
            }
        }
        Ok(())
    }

    /// Handles up to `messages_per_tick` messages, then proposes and issues
    /// what the round gathered and collects the ready.
    pub fn handle_messages(&mut self, ctx: &PollContext, round: &mut RoundCtx) -> HandleResult {
        let limit = ctx.cfg.messages_per_tick;
        let mut handled = 0;
        while handled < limit {
            match self.receiver.try_recv() {
                Ok(msg) => self.on_message(msg, ctx),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    self.stopped = true;
                    break;
                }
            }
            handled += 1;
        }
        if self.stopped {
            return HandleResult::drained();
        }
        self.propose_pending_writes();
        self.issue_pending_reads();
        self.maybe_request_snapshot(ctx);
        if self.raw_node.has_ready() {
            self.collect_ready(ctx, round);
        }
        if handled == limit && !self.receiver.is_empty() {
            HandleResult::KeepProcessing
        } else {
            HandleResult::drained()
        }
    }

    fn on_message(&mut self, msg: ReplicaMsg, ctx: &PollContext) {
        self.note_activity(&msg, ctx);
        match msg {
            ReplicaMsg::Raft(m) => self.on_raft_message(*m, ctx),
            ReplicaMsg::ChangeReplicas { changes, cb } => self.change_replicas(changes, cb),
            ReplicaMsg::Write(req) => self.on_write(req, ctx),
            ReplicaMsg::Read(req) => self.on_read(req, ctx),
            // A tick queued before the replica fell asleep.
            ReplicaMsg::Tick if self.asleep => {}
            ReplicaMsg::Tick => self.on_tick(ctx),
            ReplicaMsg::PeerNode { node, event } => self.on_peer_node(node, event, ctx),
            ReplicaMsg::Applied(res) => self.on_applied(res, ctx),
            ReplicaMsg::Unreachable { to_replica } => self.raw_node.report_unreachable(to_replica),
            ReplicaMsg::Status(cb) => cb(self.status()),
            ReplicaMsg::TransferLeader { to_replica, cb } => {
                cb(self.transfer_leader(to_replica, ctx))
            }
            ReplicaMsg::SnapshotGenerated(snap) => {
                self.raw_node
                    .store()
                    .on_snapshot_generated(snap.map(|s| *s));
            }
            ReplicaMsg::SnapshotStatus { to_replica, ok } => {
                let status = if ok {
                    SnapshotStatus::Finish
                } else {
                    SnapshotStatus::Failure
                };
                self.raw_node.report_snapshot(to_replica, status);
            }
            ReplicaMsg::CompactLog(cb) => self.compact_log(ctx, true, cb),
            ReplicaMsg::ComputeHash(cb) => {
                let cmd = admin_command::Cmd::ComputeHash(ComputeHash {});
                self.propose_admin(cmd, Some(cb));
            }
            ReplicaMsg::Split {
                key,
                new_shard_id,
                new_replica_ids,
                cb,
            } => self.propose_split(key, new_shard_id, new_replica_ids, cb),
            ReplicaMsg::InitBySplit(shard) => self.init_by_split(shard, ctx),
            ReplicaMsg::Tombstone(shard) => {
                // Uninitialized replicas are left alone: the directory may
                // not show yet the change that is adding them.
                if self.raw_node.store().is_initialized()
                    && shard.epoch().conf_ver > self.descriptor.epoch().conf_ver
                    && shard.replica(self.replica_id).is_none()
                {
                    tracing::info!(
                        shard_id = self.shard_id,
                        replica_id = self.replica_id,
                        conf_ver = shard.epoch().conf_ver,
                        "the directory says this replica was removed while it was away"
                    );
                    self.destroy(ctx);
                }
            }
            ReplicaMsg::Wake => {}
        }
    }

    /// Proposes a split; checks here give clear errors, apply re-checks.
    fn propose_split(
        &mut self,
        key: bytes::Bytes,
        new_shard_id: ShardId,
        new_replica_ids: Vec<ReplicaId>,
        cb: AdminCallback,
    ) {
        if !self.is_leader() {
            cb(Err(self.not_leader()));
            return;
        }
        let d = &self.descriptor;
        if self.shard_id == flotilla_storage::META_SHARD_ID {
            cb(Err(Error::Rejected("the meta shard does not split".into())));
            return;
        }
        if key <= d.start_key || (!d.end_key.is_empty() && key >= d.end_key) {
            cb(Err(Error::Rejected(format!(
                "split key {} is not strictly inside shard {}'s range [{}, {})",
                crate::fmt_key(&key),
                self.shard_id,
                crate::fmt_key(&d.start_key),
                crate::fmt_key(&d.end_key)
            ))));
            return;
        }
        if new_replica_ids.len() != d.replicas.len() {
            cb(Err(Error::Rejected(format!(
                "{} new replica ids for {} replicas",
                new_replica_ids.len(),
                d.replicas.len()
            ))));
            return;
        }
        let cmd = admin_command::Cmd::Split(flotilla_proto::raftcmd::Split {
            split_key: key,
            new_shard_id,
            new_replica_ids,
        });
        self.propose_admin(cmd, Some(cb));
    }

    /// An uninitialized replica (created by a message from the new shard's
    /// leader before this node applied the split) becomes the replica the
    /// split created: log at the initial index, keeping its term and vote.
    fn init_by_split(&mut self, shard: ShardDescriptor, ctx: &PollContext) {
        if self.raw_node.store().is_initialized() {
            tracing::warn!(
                shard_id = self.shard_id,
                replica_id = self.replica_id,
                "already initialized; ignoring the split's state"
            );
            return;
        }
        // An uninitialized replica persists every change of its hard state
        // before it speaks: this is what raft-engine holds.
        let previous = flotilla_storage::RaftLocalState {
            hard_state: self.raw_node.raft.hard_state(),
            ..Default::default()
        };
        let storage = match ReplicaStorage::for_split(
            self.shard_id,
            self.replica_id,
            ctx.raft_engine.clone(),
            Some(&previous),
            conf_state_of(&shard),
        ) {
            Ok(s) => s,
            Err(e) => panic!(
                "shard {}: writing the raft state of a split replica failed: {e}",
                self.shard_id
            ),
        };
        let (_, receiver) = crossbeam_channel::unbounded();
        let receiver = std::mem::replace(&mut self.receiver, receiver);
        let replica_id = self.replica_id;
        let mut fresh = Self::build(
            ctx,
            shard.clone(),
            replica_id,
            flotilla_storage::RAFT_INIT_INDEX,
            storage,
            receiver,
        )
        .unwrap_or_else(|e| panic!("shard {}: rebuilding a split replica: {e}", self.shard_id));
        // (A term kept from the uninitialized replica makes `build` hold
        // off votes for an election timeout: what it acknowledged may have
        // counted toward a leader's lease.)
        fresh.peer_nodes = std::mem::take(&mut self.peer_nodes);
        *self = fresh;
        ctx.meta.set_descriptor(shard);
        tracing::info!(
            shard_id = self.shard_id,
            replica_id,
            term = self.term(),
            "uninitialized replica initialized by a split"
        );
    }

    /// Hands a snapshot request from raft to the apply FSM, which builds it
    /// from what it has applied.
    fn maybe_request_snapshot(&mut self, ctx: &PollContext) {
        if self.raw_node.store().take_snapshot_request() {
            tracing::info!(
                shard_id = self.shard_id,
                replica_id = self.replica_id,
                "a follower needs a snapshot; building one"
            );
            if ctx
                .apply_router
                .force_send(self.shard_id, ApplyMsg::GenerateSnapshot)
                .is_err()
            {
                self.raw_node.store().on_snapshot_generated(None);
            }
        }
    }

    /// Proposes an admin command; `cb` gets the entry's index once applied.
    fn propose_admin(&mut self, cmd: admin_command::Cmd, cb: Option<AdminCallback>) {
        let cmd = RaftCommand {
            header: Some(CmdHeader {
                shard_id: self.shard_id,
                epoch: Some(self.descriptor.epoch()),
            }),
            writes: vec![],
            admin: Some(AdminCommand { cmd: Some(cmd) }),
        };
        self.propose_entry(cmd, ProposalCallbacks::Admin(cb));
    }

    /// The leader's log GC: truncates what every follower has, or, past
    /// the count or size limit (or when `force`d), what every recently
    /// active follower has; the others will need a snapshot.
    fn compact_log(&mut self, ctx: &PollContext, force: bool, cb: Option<AdminCallback>) {
        if !self.is_leader() {
            if let Some(cb) = cb {
                cb(Err(self.not_leader()));
            }
            return;
        }
        let store = self.raw_node.store();
        let applied = store.applied_index();
        let truncated = store.truncated_index();
        let (mut all, mut active) = (u64::MAX, u64::MAX);
        for (id, pr) in self.raw_node.raft.prs().iter() {
            all = all.min(pr.matched);
            if pr.recent_active || *id == self.replica_id {
                active = active.min(pr.matched);
            }
        }
        let cfg = &ctx.cfg;
        let over = store.log_entries() >= cfg.raft_log_gc_count_limit
            || store.log_bytes() >= cfg.raft_log_gc_size_limit;
        let target = if over || force {
            applied.min(active)
        } else {
            applied.min(all)
        };
        if target <= truncated || (!force && target - truncated < cfg.raft_log_gc_threshold) {
            if let Some(cb) = cb {
                cb(Ok(AdminResult {
                    index: truncated,
                    shard: self.descriptor.clone(),
                }));
            }
            return;
        }
        let Ok(term) = store.term(target) else {
            if let Some(cb) = cb {
                cb(Ok(AdminResult {
                    index: truncated,
                    shard: self.descriptor.clone(),
                }));
            }
            return;
        };
        tracing::debug!(
            shard_id = self.shard_id,
            replica_id = self.replica_id,
            index = target,
            over,
            force,
            "compacting the raft log"
        );
        let cmd = admin_command::Cmd::CompactLog(CompactLog {
            index: target,
            term,
        });
        self.propose_admin(cmd, cb);
    }

    fn on_raft_message(&mut self, m: RaftMessage, ctx: &PollContext) {
        if m.extra.is_some() {
            // A wake-up (`note_activity` did what it asks) or hibernation.
            self.on_hibernate_message(&m, ctx);
            return;
        }
        if m.to_replica != self.replica_id {
            metrics::RAFT_MESSAGES_RECEIVED
                .with_label_values(&["wrong_replica"])
                .inc();
            return;
        }
        if m.msg.get_msg_type() == MessageType::MsgSnapshot
            && !self.raw_node.store().is_initialized()
        {
            if let Some(why) = self.snapshot_refusal(&m.msg, ctx) {
                metrics::RAFT_MESSAGES_RECEIVED
                    .with_label_values(&["snapshot_refused"])
                    .inc();
                tracing::debug!(
                    shard_id = self.shard_id,
                    replica_id = self.replica_id,
                    why,
                    "refusing a snapshot; the leader will send it again"
                );
                return;
            }
        }
        if m.msg.get_msg_type() == MessageType::MsgTimeoutNow && self.data_in_flux() {
            // Campaigning now would panic raft (see on_tick); the leader
            // gives the transfer up or tries again.
            metrics::RAFT_MESSAGES_RECEIVED
                .with_label_values(&["dropped"])
                .inc();
            return;
        }
        if self.ticks < self.vote_guard_ticks && self.holds_off_vote(&m.msg) {
            metrics::RAFT_MESSAGES_RECEIVED
                .with_label_values(&["vote_held_off"])
                .inc();
            tracing::debug!(
                shard_id = self.shard_id,
                replica_id = self.replica_id,
                from = m.from_replica,
                "just started: ignoring a vote request, as if a leader had been heard"
            );
            return;
        }
        let log = &self.raw_node.raft.raft_log;
        if m.msg.get_msg_type() == MessageType::MsgHeartbeat
            && m.msg.term >= self.term()
            && m.msg.commit > log.last_index()
        {
            // raft panics on this; say what led here first.
            tracing::error!(
                shard_id = self.shard_id,
                replica_id = self.replica_id,
                from = m.from_replica,
                from_node = m.from_node,
                msg_term = m.msg.term,
                msg_commit = m.msg.commit,
                term = self.term(),
                last_index = log.last_index(),
                persisted = log.persisted,
                committed = log.committed,
                stored_last = self.raw_node.store().last_index(),
                applied = self.raw_node.store().applied_index(),
                truncated = self.raw_node.store().truncated_index(),
                role = ?self.raw_node.raft.state,
                "a leader commits past the end of this replica's log"
            );
        }
        self.peer_nodes.insert(m.from_replica, m.from_node);
        if self.holds_off_vote(&m.msg) {
            self.end_lease_by_silence(m.from_node, ctx);
        }
        if self.was_leader {
            self.last_heard.insert(m.from_replica, self.ticks);
        }
        let from = m.from_replica;
        match self.raw_node.step(m.msg) {
            Ok(()) => {
                metrics::RAFT_MESSAGES_RECEIVED
                    .with_label_values(&["stepped"])
                    .inc();
                if from == self.leader_id() {
                    self.awaiting_leader = false;
                }
            }
            Err(e) => {
                metrics::RAFT_MESSAGES_RECEIVED
                    .with_label_values(&["rejected"])
                    .inc();
                tracing::debug!(shard_id = self.shard_id, replica_id = self.replica_id, from = m.from_replica, error = %e, "raft message rejected");
            }
        }
    }

    /// Why an uninitialized replica must not take a snapshot now: its range
    /// still belongs to another local shard (a split of which will create
    /// this replica, or a replica being removed), or a split here already
    /// wrote this shard's state (and `InitBySplit` is on its way). Installing
    /// would clear data the other shard still serves.
    fn snapshot_refusal(&self, msg: &Message, ctx: &PollContext) -> Option<String> {
        let data = SnapshotData::decode(msg.get_snapshot().get_data()).ok()?;
        let shard = data.shard?;
        // The meta shard's data lives in a column family of its own.
        if shard.id == flotilla_storage::META_SHARD_ID {
            return None;
        }
        if let Some(other) = ctx
            .meta
            .overlapping(self.shard_id, &shard.start_key, &shard.end_key)
        {
            return Some(format!("its range overlaps shard {other} hosted here"));
        }
        match ctx.kv.shard_state(self.shard_id) {
            Ok(Some(s)) if s.state == flotilla_proto::local::ShardState::Normal as i32 => {
                Some("a split on this node is creating the replica".into())
            }
            Ok(_) => None,
            Err(e) => Some(format!("reading its shard state failed: {e}")),
        }
    }

    /// A vote request that raft would refuse if it had heard from a leader
    /// within the election timeout (see `replica::lease`).
    fn holds_off_vote(&self, msg: &Message) -> bool {
        matches!(
            msg.get_msg_type(),
            MessageType::MsgRequestVote | MessageType::MsgRequestPreVote
        ) && msg.term > self.term()
            && msg.context != raft::CAMPAIGN_TRANSFER
    }

    fn on_write(&mut self, req: WriteRequest, ctx: &PollContext) {
        if let Err(e) = self.check_request(&req.epoch, crate::msg::write_spans(&req.command)) {
            metrics::PROPOSALS.with_label_values(&["refused"]).inc();
            (req.cb)(Err(e));
            return;
        }
        // Writes do not count towards load-based splits (see replica::load).
        let size = req.command.encoded_len();
        if self.pending_write_bytes + size > ctx.cfg.max_entry_size
            && !self.pending_writes.is_empty()
        {
            self.propose_pending_writes();
        }
        self.pending_write_bytes += size;
        self.pending_writes.push((req.command, req.cb));
    }

    fn on_read(&mut self, req: ReadRequest, ctx: &PollContext) {
        let ReadRequest {
            epoch,
            spans,
            mode,
            cb,
            ..
        } = req;
        if ctx.cfg.split_qps > 0 && self.is_leader() {
            if let Some(span) = spans.first() {
                self.load.record(span.first_key());
            }
        }
        let checked = match mode {
            ReadMode::Leader | ReadMode::LeaderReadIndex => self.check_request(&epoch, spans),
            ReadMode::Follower | ReadMode::Stale => self.check_replica_read(&epoch, spans),
        };
        if let Err(e) = checked {
            metrics::READS.with_label_values(&["refused"]).inc();
            cb(Err(e));
            return;
        }
        let path = match mode {
            ReadMode::Stale => {
                metrics::READ_PATHS.with_label_values(&["stale"]).inc();
                metrics::READS.with_label_values(&["served"]).inc();
                cb(Ok(()));
                return;
            }
            ReadMode::Leader | ReadMode::Follower if self.lease_valid() => {
                let committed = self.raw_node.raft.raft_log.committed;
                self.reads.push_ready(committed, cb);
                "lease"
            }
            _ => {
                self.reads.push(cb, self.ticks);
                if self.is_leader() {
                    "read_index"
                } else {
                    "follower"
                }
            }
        };
        metrics::READ_PATHS.with_label_values(&[path]).inc();
    }

    /// Whether this replica leads with a lease in force: it may answer reads
    /// at its commit index without asking anyone.
    fn lease_valid(&mut self) -> bool {
        if !self.is_leader() || !self.raw_node.raft.commit_to_current_term() {
            return false;
        }
        if self.raw_node.raft.lead_transferee.is_some() {
            self.lease.on_transfer(self.term());
            return false;
        }
        self.lease.is_valid(Instant::now())
    }

    fn renew_lease(&mut self, started: Instant, by: &str) {
        if self.lease.renew(started, self.term()) {
            metrics::LEASE_RENEWALS.with_label_values(&[by]).inc();
        }
    }

    /// On a leader, an entry of its term that committed was acknowledged by
    /// a quorum after it was proposed.
    fn renew_lease_by_commit(&mut self, committed: &[Entry]) {
        let Some(last) = committed.last() else {
            return;
        };
        if !self.is_leader() {
            return;
        }
        if let Some(at) = self.proposals.proposed_at(last.index, self.term()) {
            self.renew_lease(at, "commit");
        }
    }

    /// A snapshot is about to replace, or is replacing, this replica's data:
    /// staging it moved the log's start to the snapshot, and applied catches
    /// up only once apply installed it (`set_apply_state` never moves the
    /// start back; a compaction only truncates applied entries).
    fn data_in_flux(&self) -> bool {
        let store = self.raw_node.store();
        store.applied_index() < store.truncated_index()
    }

    /// Answers the reads whose index is applied: each caller then takes a
    /// RocksDB snapshot, so nothing may be half-installed now.
    fn serve_reads(&mut self) {
        if self.data_in_flux() {
            return;
        }
        let served = self.reads.serve(self.raw_node.store().applied_index());
        if served > 0 {
            metrics::READS
                .with_label_values(&["served"])
                .inc_by(served as u64);
        }
    }

    /// Proposes the writes gathered this round as one log entry.
    fn propose_pending_writes(&mut self) {
        if self.pending_writes.is_empty() {
            return;
        }
        let writes = std::mem::take(&mut self.pending_writes);
        self.pending_write_bytes = 0;
        // (`propose` answers NotLeader if leadership changed while the
        // round stepped a message.)
        let (commands, callbacks): (Vec<_>, Vec<_>) = writes.into_iter().unzip();
        let cmd = RaftCommand {
            header: Some(CmdHeader {
                shard_id: self.shard_id,
                epoch: Some(self.descriptor.epoch()),
            }),
            writes: commands,
            admin: None,
        };
        self.propose_entry(cmd, ProposalCallbacks::Writes(callbacks));
    }

    /// Appends one entry to the leader's log and remembers who waits for
    /// it; answers them at once if raft refuses it.
    fn propose_entry(&mut self, cmd: RaftCommand, callbacks: ProposalCallbacks) {
        self.propose(Payload::Command(cmd), callbacks)
    }

    fn propose(&mut self, payload: Payload, callbacks: ProposalCallbacks) {
        let n = callbacks.len() as u64;
        let is_write = matches!(callbacks, ProposalCallbacks::Writes(_));
        // raft-rs 0.7 forwards a follower's proposal to the leader and
        // returns Ok: answered NotLeader, a client would retry a command
        // the leader may commit. So it is refused here, before raft.
        if !self.is_leader() {
            let err = self.not_leader();
            callbacks.fail(|| err.clone());
            return;
        }
        let last_before = self.raw_node.raft.raft_log.last_index();
        let result = match payload {
            Payload::Command(cmd) => self.raw_node.propose(vec![], cmd.encode_to_vec()),
            Payload::ConfChange(context, cc) => self
                .raw_node
                .propose_conf_change(context.encode_to_vec(), cc),
        };
        let index = self.raw_node.raft.raft_log.last_index();
        let err = match result {
            Ok(()) if index > last_before => None,
            Ok(()) => Some(self.not_leader()),
            Err(raft::Error::ProposalDropped) => Some(Error::ServerIsBusy(format!(
                "shard {} dropped the proposal (too many uncommitted entries or a leader transfer)",
                self.shard_id
            ))),
            Err(e) => Some(Error::StaleCommand(e.to_string())),
        };
        if let Some(err) = err {
            if is_write {
                metrics::PROPOSALS.with_label_values(&["dropped"]).inc_by(n);
            }
            callbacks.fail(|| err.clone());
            return;
        }
        if is_write {
            metrics::PROPOSALS
                .with_label_values(&["proposed"])
                .inc_by(n);
            metrics::PROPOSAL_ENTRIES.inc();
        }
        self.proposals.push(Proposal {
            index,
            term: self.raw_node.raft.term,
            callbacks,
            proposed_at: Instant::now(),
        });
    }

    /// Issues one ReadIndex for every read gathered so far, once the leader
    /// has committed an entry of its own term.
    /// On a follower, raft forwards them to the leader. Then serves what is
    /// ready (lease reads may be already).
    fn issue_pending_reads(&mut self) {
        if self.reads.has_pending() || self.resend_reads {
            if self.leader_id() == raft::INVALID_ID {
                self.resend_reads = false;
                self.fail_unconfirmed_reads();
            } else if !self.is_leader() || self.raw_node.raft.commit_to_current_term() {
                if std::mem::take(&mut self.resend_reads) {
                    for ctx in self.reads.due_for_resend(self.ticks, 0) {
                        self.raw_node.read_index(ctx);
                    }
                }
                let term = self.is_leader().then(|| self.term());
                if let Some(ctx) = self.reads.issue(self.ticks, Instant::now(), term) {
                    metrics::READ_INDEX_REQUESTS.inc();
                    self.raw_node.read_index(ctx);
                }
            }
        }
        self.serve_reads();
    }

    fn fail_unconfirmed_reads(&mut self) {
        self.fail_reads_older_than(u64::MAX, 0);
    }

    /// Fails, NotLeader, the reads without a confirmed index that arrived
    /// `give_up_ticks` or more before `tick`.
    fn fail_reads_older_than(&mut self, tick: u64, give_up_ticks: u64) {
        let err = self.not_leader();
        let n = self
            .reads
            .fail_older_than(tick, give_up_ticks, || err.clone());
        if n > 0 {
            metrics::READS
                .with_label_values(&["not_leader"])
                .inc_by(n as u64);
        }
    }

    fn on_tick(&mut self, ctx: &PollContext) {
        self.ticks += 1;
        if self.hibernation_tick(ctx) {
            return;
        }
        // While a snapshot installs, the log starts past what raft thinks
        // is applied: an election now would have raft read the entries in
        // between and panic (raft-rs `hup`). Installing takes milliseconds.
        if !self.data_in_flux() {
            self.raw_node.tick();
        }
        if self
            .ticks
            .is_multiple_of(ctx.cfg.raft_log_gc_ticks.max(1) as u64)
            && self.is_leader()
        {
            self.compact_log(ctx, false, None);
        }
        let timeout = 2 * ctx.cfg.election_ticks as u64;
        let resend = self
            .reads
            .due_for_resend(self.ticks, (2 * ctx.cfg.heartbeat_ticks as u64).max(2));
        if !resend.is_empty() {
            tracing::debug!(
                shard_id = self.shard_id,
                replica_id = self.replica_id,
                batches = resend.len(),
                "sending again read indexes that got no answer"
            );
            for ctx in resend {
                self.raw_node.read_index(ctx);
            }
        }
        self.fail_reads_older_than(self.ticks, 2 * timeout);
        if let Some(t) = self.ticks_since_stepdown.as_mut() {
            *t += 1;
            if *t >= ctx.cfg.abandon_proposals_after_ticks {
                self.ticks_since_stepdown = None;
                self.abandon_proposals();
            }
        }
        if self
            .ticks
            .is_multiple_of(ctx.cfg.election_ticks.max(1) as u64)
        {
            self.check_down_replicas(timeout, ctx);
        }
        if ctx.cfg.split_check_ticks > 0
            && self.ticks.is_multiple_of(ctx.cfg.split_check_ticks as u64)
        {
            self.maybe_check_split(ctx);
        }
    }

    /// Enough was written since the last split check that the next one
    /// scans, or load sampling is on and saw requests.
    fn split_check_due(&self, ctx: &PollContext) -> bool {
        let cfg = &ctx.cfg;
        cfg.split_check_ticks > 0
            && ctx.split_checks.is_some()
            && self.shard_id != flotilla_storage::META_SHARD_ID
            && (self.enough_written_to_check(cfg) || (cfg.split_qps > 0 && !self.load.is_empty()))
    }

    /// 1/16 of a split threshold was written since the last size check.
    fn enough_written_to_check(&self, cfg: &crate::Config) -> bool {
        self.split_hint_bytes >= cfg.split_size / 16 || self.split_hint_keys >= cfg.split_keys / 16
    }

    /// On a leader that saw enough writes since its last check: has the
    /// split checker scan the shard (a RocksDB snapshot taken now).
    fn maybe_check_split(&mut self, ctx: &PollContext) {
        let cfg = &ctx.cfg;
        let (ops, samples) = self.load.take();
        let Some(checks) = &ctx.split_checks else {
            return;
        };
        if !self.is_leader() || self.shard_id == flotilla_storage::META_SHARD_ID {
            return;
        }
        let secs = cfg.split_check_ticks as f64 * cfg.tick_interval.as_secs_f64();
        let qps = (ops as f64 / secs.max(0.001)) as u64;
        if cfg.split_qps > 0 && qps >= cfg.split_qps {
            if let Some(key) = super::load::median_split_key(samples, &self.descriptor) {
                let _ = checks.send(crate::worker::SplitCheckTask::Load {
                    shard: self.descriptor.clone(),
                    key,
                    qps,
                });
                return;
            }
        }
        if !self.enough_written_to_check(cfg) {
            return;
        }
        self.split_hint_bytes = 0;
        self.split_hint_keys = 0;
        let _ = checks.send(crate::worker::SplitCheckTask::Size {
            shard: self.descriptor.clone(),
            snap: ctx.kv.snapshot(),
            size: cfg.split_size,
            keys: cfg.split_keys,
        });
    }

    /// On a leader, counts the other replicas not heard from within
    /// `timeout` ticks and publishes the count when it changes (the node
    /// sums them into `flotilla_replicas_down`).
    fn check_down_replicas(&mut self, timeout: u64, ctx: &PollContext) {
        let down = if self.was_leader {
            let now = self.ticks;
            self.descriptor
                .replicas
                .iter()
                .filter(|r| r.id != self.replica_id)
                .filter(|r| {
                    let heard = self.last_heard.get(&r.id).copied().unwrap_or(0);
                    now.saturating_sub(heard.max(self.watch_from)) > timeout
                })
                .count() as u32
        } else {
            0
        };
        if down != self.reported_down {
            if down > self.reported_down {
                tracing::warn!(
                    shard_id = self.shard_id,
                    replica_id = self.replica_id,
                    down,
                    "replicas of this shard stopped answering its leader"
                );
            }
            self.reported_down = down;
            ctx.meta.set_down_replicas(self.shard_id, down);
        }
    }

    fn abandon_proposals(&mut self) {
        let n = self.proposals.len();
        if n == 0 {
            return;
        }
        tracing::warn!(
            shard_id = self.shard_id,
            replica_id = self.replica_id,
            proposals = n,
            "leadership lost; pending proposals have an unknown outcome"
        );
        let shard_id = self.shard_id;
        self.proposals.fail_all_indeterminate(|| {
            Error::Indeterminate(format!(
                "shard {shard_id} lost leadership before the command committed"
            ))
        });
    }

    fn on_applied(&mut self, res: ApplyResult, ctx: &PollContext) {
        let applied = res.apply_state.applied_index;
        self.split_hint_bytes = self.split_hint_bytes.saturating_add(res.written_bytes);
        self.split_hint_keys = self.split_hint_keys.saturating_add(res.written_keys);
        // The log's new start is known before the GC worker deletes entries.
        self.raw_node.mut_store().set_apply_state(res.apply_state);
        // Membership changes reach raft before it learns they are applied:
        // raft decides on leaving a joint configuration when the applied
        // index passes it, which must see the joint configuration.
        for exec in res.exec {
            match exec {
                ExecResult::CompactLog { index } => {
                    let _ = ctx.gc_tasks.send(GcTask {
                        shard_id: self.shard_id,
                        compact_to: index + 1,
                    });
                }
                ExecResult::SnapshotInstalled { index, term, shard } => {
                    if let Err(e) = crate::snapshot::cleanup(
                        &ctx.raft_engine,
                        &ctx.snap_mgr,
                        self.shard_id,
                        index,
                        term,
                    ) {
                        tracing::warn!(shard_id = self.shard_id, error = %e, "cleaning up after a snapshot failed");
                    }
                    self.descriptor = shard.clone();
                    ctx.meta.set_descriptor(shard);
                }
                ExecResult::ConfChange { cc, shard } => self.on_conf_change(cc, shard, ctx),
                ExecResult::Split {
                    left,
                    right,
                    right_replica,
                } => self.on_split(left, right, right_replica, ctx),
            }
        }
        if self.stopped {
            return;
        }
        self.raw_node.advance_apply_to(applied);
        self.serve_reads();
    }

    /// Starts a leadership transfer to a voter that answered lately and is
    /// at most a few entries behind. raft-rs stops taking proposals while a transfer is
    /// under way, for up to an election timeout: a transfer to a dead or
    /// lagging replica would cost the shard that much availability each
    /// time someone (the placement driver) asked for it.
    fn transfer_leader(&mut self, to_replica: ReplicaId, ctx: &PollContext) -> Result<()> {
        if !self.is_leader() {
            return Err(self.not_leader());
        }
        match self.descriptor.replica(to_replica) {
            Some(r) if r.role == ReplicaRole::Voter as i32 => {}
            _ => {
                return Err(Error::Rejected(format!(
                    "replica {to_replica} is not a voter of shard {}",
                    self.shard_id
                )))
            }
        }
        let recent = 2 * ctx.cfg.heartbeat_ticks as u64 + 2;
        // A leader that just woke from hibernation has heard nobody yet:
        // the transferee's node having spoken lately stands in for it.
        let just_woke = self.ticks.saturating_sub(self.watch_from) <= recent;
        let heard = self
            .last_heard
            .get(&to_replica)
            .is_some_and(|t| self.ticks.saturating_sub(*t) <= recent)
            || (just_woke
                && self.node_of(to_replica).is_some_and(|n| {
                    ctx.liveness
                        .heard_within(n, ctx.cfg.tick_interval * recent as u32)
                }));
        let last = self.raw_node.raft.raft_log.last_index();
        let matched = self
            .raw_node
            .raft
            .prs()
            .get(to_replica)
            .map_or(0, |p| p.matched);
        // A few entries behind is fine: raft sends them first and hands
        // over once the transferee caught up.
        const MAX_LAG: u64 = 128;
        if !heard || matched + MAX_LAG < last {
            return Err(Error::Rejected(format!(
                "replica {to_replica} of shard {} cannot take over now: {}",
                self.shard_id,
                if heard {
                    format!("it has the log up to {matched} of {last}")
                } else {
                    "it has not answered lately".to_string()
                }
            )));
        }
        tracing::info!(
            shard_id = self.shard_id,
            replica_id = self.replica_id,
            to_replica,
            "transferring leadership"
        );
        metrics::LEADER_TRANSFERS.inc();
        // The transferee's votes are forced through the followers' leases.
        self.lease.on_transfer(self.term());
        self.raw_node.transfer_leader(to_replica);
        Ok(())
    }

    /// Proposes a membership change (several changes go through joint
    /// consensus). Checks here are for clear errors; apply re-checks
    /// deterministically.
    ///
    /// A change may leave `replica_id` 0: for a replica being added the
    /// leader allocates `(conf_ver + 1) << 32 | node_id`, which is unique in
    /// the shard and larger than any id the shard ever had on that node (so
    /// a tombstone left by an earlier removal does not swallow it); for any
    /// other change it names the member on `node_id`. (The server's Admin
    /// service fills in ids from the meta shard's allocator first, which are
    /// unique cluster-wide; this fallback serves direct callers.)
    fn change_replicas(&mut self, mut changes: Vec<ReplicaChange>, cb: AdminCallback) {
        use flotilla_proto::admin::replica_change::Kind;
        if !self.is_leader() {
            cb(Err(self.not_leader()));
            return;
        }
        let busy = |why: &str| Error::ServerIsBusy(why.to_string());
        let raft = &self.raw_node.raft;
        if raft.pending_conf_index > raft.raft_log.applied
            || self.descriptor.replicas.iter().any(|r| {
                r.role == ReplicaRole::IncomingVoter as i32
                    || r.role == ReplicaRole::DemotingVoter as i32
            })
        {
            cb(Err(busy(
                "another membership change of this shard is in progress",
            )));
            return;
        }
        if changes.is_empty() {
            cb(Err(Error::Rejected("no change given".into())));
            return;
        }
        if let Some(ch) = changes.iter().find(|c| Kind::try_from(c.kind).is_err()) {
            cb(Err(Error::Rejected(format!(
                "unknown change kind {}",
                ch.kind
            ))));
            return;
        }
        let conf_ver = self.descriptor.epoch().conf_ver;
        for ch in changes.iter_mut().filter(|c| c.replica_id == 0) {
            let kind = Kind::try_from(ch.kind).expect("checked above");
            ch.replica_id = match self.descriptor.replica_on(ch.node_id) {
                Some(r) => r.id,
                None if matches!(kind, Kind::AddLearner | Kind::AddVoter) => {
                    (conf_ver + 1) << 32 | (ch.node_id & 0xffff_ffff)
                }
                None => {
                    cb(Err(Error::Rejected(format!(
                        "node {} holds no replica of shard {}",
                        ch.node_id, self.shard_id
                    ))));
                    return;
                }
            };
        }
        let mut cc = ConfChangeV2::default();
        cc.set_transition(ConfChangeTransition::Auto);
        let mut added = Vec::new();
        for ch in &changes {
            let member = self.descriptor.replica(ch.replica_id);
            let kind = Kind::try_from(ch.kind).expect("checked above");
            let refuse = match kind {
                Kind::AddLearner | Kind::AddVoter if member.is_none() => {
                    if ch.node_id == 0 || self.descriptor.replica_on(ch.node_id).is_some() {
                        Some(format!(
                            "node {} already holds a replica of shard {} (or is 0)",
                            ch.node_id, self.shard_id
                        ))
                    } else {
                        added.push(Replica {
                            id: ch.replica_id,
                            node_id: ch.node_id,
                            role: ReplicaRole::Learner as i32,
                        });
                        None
                    }
                }
                Kind::AddLearner => Some(format!("replica {} is already a member", ch.replica_id)),
                // No-op changes would still enter a joint configuration in
                // raft that the descriptor's roles cannot express.
                Kind::AddVoter if member.is_some_and(|r| r.role == ReplicaRole::Voter as i32) => {
                    Some(format!("replica {} is already a voter", ch.replica_id))
                }
                Kind::DemoteToLearner
                    if member.is_some_and(|r| r.role == ReplicaRole::Learner as i32) =>
                {
                    Some(format!("replica {} is already a learner", ch.replica_id))
                }
                Kind::Remove if ch.replica_id == self.replica_id => {
                    Some("the leader cannot remove itself; transfer leadership first".into())
                }
                Kind::Remove
                    if changes.len() > 1
                        && member.is_some_and(|r| r.role != ReplicaRole::Learner as i32) =>
                {
                    Some("a voter is removed alone, or demoted first".into())
                }
                _ if member.is_none() && kind != Kind::AddVoter => {
                    Some(format!("replica {} is not a member", ch.replica_id))
                }
                _ => None,
            };
            if let Some(why) = refuse {
                cb(Err(Error::Rejected(why)));
                return;
            }
            let mut single = ConfChangeSingle {
                node_id: ch.replica_id,
                ..Default::default()
            };
            single.set_change_type(match kind {
                Kind::AddLearner | Kind::DemoteToLearner => ConfChangeType::AddLearnerNode,
                Kind::AddVoter => ConfChangeType::AddNode,
                Kind::Remove => ConfChangeType::RemoveNode,
            });
            cc.changes.push(single);
        }
        let context = ConfChangeContext {
            header: Some(CmdHeader {
                shard_id: self.shard_id,
                epoch: Some(self.descriptor.epoch()),
            }),
            added,
        };
        tracing::info!(shard_id = self.shard_id, replica_id = self.replica_id, changes = ?changes, "proposing a membership change");
        self.propose(
            Payload::ConfChange(context, cc),
            ProposalCallbacks::Admin(Some(cb)),
        );
    }

    /// A membership change applied: raft follows, and a replica that is no
    /// longer a member destroys itself.
    /// The split applied: this shard shrank to `left`. Reads waiting here
    /// may be for keys `right` now owns, whose newest writes this node may
    /// not have (the new shard may already take writes elsewhere): they
    /// fail with EpochNotMatch and the client retries on the right shard.
    /// Writes proposed before the split fail at apply (version check).
    fn on_split(
        &mut self,
        left: ShardDescriptor,
        right: ShardDescriptor,
        right_replica: Option<ReplicaId>,
        ctx: &PollContext,
    ) {
        self.descriptor = left.clone();
        self.split_off = Some(right.clone());
        ctx.meta.set_descriptor(left);
        // The left half may still be past a threshold: check it again.
        self.split_hint_bytes = ctx.cfg.split_size;
        self.split_hint_keys = ctx.cfg.split_keys;
        let err = self.epoch_not_match();
        let failed = self.reads.fail_all(|| err.clone());
        if failed > 0 {
            metrics::READS
                .with_label_values(&["refused"])
                .inc_by(failed as u64);
        }
        if let Some(replica_id) = right_replica {
            let _ = ctx.raft_router.send_control(ControlMsg::SplitCreated {
                shard: right,
                replica_id,
                campaign: self.is_leader(),
            });
        }
    }

    fn on_conf_change(&mut self, cc: ConfChangeV2, shard: ShardDescriptor, ctx: &PollContext) {
        // The quorum changed: only rounds that start now may renew the lease.
        self.lease.restart_at(Instant::now());
        let cs = match self.raw_node.apply_conf_change(&cc) {
            Ok(cs) => cs,
            Err(e) => panic!(
                "shard {}: raft refused a committed membership change: {e}",
                self.shard_id
            ),
        };
        let expected = conf_state_of(&shard);
        let sorted = |v: &[u64]| {
            let mut v = v.to_vec();
            v.sort_unstable();
            v
        };
        assert!(
            sorted(&cs.voters) == sorted(&expected.voters)
                && sorted(&cs.learners) == sorted(&expected.learners)
                && sorted(&cs.voters_outgoing) == sorted(&expected.voters_outgoing),
            "shard {}: raft configuration {:?} disagrees with the descriptor {:?}",
            self.shard_id,
            cs,
            expected
        );
        self.raw_node.mut_store().set_conf_state(cs);
        self.descriptor = shard.clone();
        ctx.meta.set_descriptor(shard);
        if self.descriptor.replica(self.replica_id).is_none() {
            self.destroy(ctx);
        }
    }

    /// Removes this replica from the node: answers everyone waiting, stops
    /// both FSMs, leaves a tombstone (so late messages do not recreate it)
    /// and deletes its data and log.
    fn destroy(&mut self, ctx: &PollContext) {
        tracing::info!(
            shard_id = self.shard_id,
            replica_id = self.replica_id,
            "replica removed from its shard; destroying it"
        );
        self.stopped = true;
        let shard_id = self.shard_id;
        // A former leader's proposals may still commit through the new
        // leader: their outcome is unknown, not "no such shard" (which a
        // client would take as not applied and retry).
        self.proposals.fail_all_indeterminate(|| {
            Error::Indeterminate(format!(
                "replica of shard {shard_id} was removed before the command's outcome was known"
            ))
        });
        self.reads
            .fail_unconfirmed(|| Error::ShardNotFound(shard_id));
        for (_, cb) in self.pending_writes.drain(..) {
            cb(Err(Error::ShardNotFound(shard_id)));
        }
        if self.was_leader {
            metrics::LEADERS.dec();
        }
        ctx.apply_router.close(shard_id);
        ctx.raft_router.close(shard_id);
        if let Err(e) = crate::snapshot::destroy_replica(
            &ctx.kv,
            &ctx.raft_engine,
            &self.descriptor,
            self.replica_id,
            self.raw_node.store().is_initialized(),
        ) {
            tracing::error!(shard_id, error = %e, "cleaning up a removed replica failed; stopping the node");
            panic!("destroying replica of shard {shard_id} failed: {e}");
        }
        // Last, so whoever sees the replica gone also sees its data gone.
        ctx.meta.remove(shard_id);
        metrics::REPLICA_LIFECYCLE
            .with_label_values(&["destroyed"])
            .inc();
    }

    fn on_role_change(&mut self, ctx: &PollContext) {
        let raft = &self.raw_node.raft;
        let is_leader = raft.state == StateRole::Leader;
        ctx.meta
            .set_leader(self.shard_id, raft.leader_id, raft.term);
        if raft.leader_id != raft::INVALID_ID {
            self.last_leader = (raft.leader_id, raft.term);
        }
        if is_leader != self.was_leader {
            metrics::LEADER_CHANGES.inc();
            if is_leader {
                metrics::LEADERS.inc();
                self.ticks_since_stepdown = None;
                // Every replica gets a fresh grace period.
                self.last_heard.clear();
                self.watch_from = self.ticks;
                tracing::info!(
                    shard_id = self.shard_id,
                    replica_id = self.replica_id,
                    term = raft.term,
                    "became leader"
                );
            } else {
                metrics::LEADERS.dec();
                tracing::info!(
                    shard_id = self.shard_id,
                    replica_id = self.replica_id,
                    term = raft.term,
                    leader_id = raft.leader_id,
                    "stepped down"
                );
                if !self.proposals.is_empty() {
                    self.ticks_since_stepdown = Some(0);
                }
            }
            self.lease.expire();
            self.was_leader = is_leader;
        }
        // Campaigning, or without a leader: an election needs the clock.
        let electing = raft.state != StateRole::Leader
            && (raft.state != StateRole::Follower || raft.leader_id == raft::INVALID_ID);
        if electing {
            self.wake(ctx, "raft_message");
        }
        // The leader changed (or is unknown): raft dropped the read indexes
        // in flight; send them again through whoever leads now.
        self.resend_reads = true;
    }

    fn send_messages(&self, msgs: Vec<Message>, ctx: &PollContext) {
        let epoch = self.descriptor.epoch();
        for msg in msgs {
            if msg.get_msg_type() == MessageType::MsgAppendResponse
                && !msg.reject
                && msg.index > self.raw_node.store().last_index()
            {
                tracing::error!(
                    shard_id = self.shard_id,
                    replica_id = self.replica_id,
                    to = msg.to,
                    index = msg.index,
                    msg_term = msg.term,
                    raft_last = self.raw_node.raft.raft_log.last_index(),
                    stored_last = self.raw_node.store().last_index(),
                    persisted = self.raw_node.raft.raft_log.persisted,
                    "acknowledging entries past the end of the stored log"
                );
            }
            let Some(to_node) = self.node_of(msg.to) else {
                tracing::warn!(
                    shard_id = self.shard_id,
                    to = msg.to,
                    "dropping a message to a replica of unknown node"
                );
                continue;
            };
            let is_snapshot = msg.get_msg_type() == MessageType::MsgSnapshot;
            let m = RaftMessage {
                shard_id: self.shard_id,
                from_node: ctx.node_id,
                to_node,
                from_replica: self.replica_id,
                to_replica: msg.to,
                epoch,
                msg,
                extra: None,
            };
            if is_snapshot {
                tracing::info!(
                    shard_id = self.shard_id,
                    to_replica = m.to_replica,
                    index = m.msg.get_snapshot().get_metadata().index,
                    "sending a snapshot"
                );
                ctx.transport.send_snapshot(m);
            } else {
                ctx.transport.send(m);
            }
        }
    }

    fn send_to_apply(&mut self, entries: Vec<Entry>, ctx: &PollContext) {
        let Some(last) = entries.last() else { return };
        let proposals = self.proposals.take_upto(last.index);
        if !proposals.is_empty() {
            if flotilla_storage::metrics::detailed() {
                for p in &proposals {
                    metrics::COMMIT_DURATION.observe(p.proposed_at.elapsed().as_secs_f64());
                }
            }
            if self.proposals.is_empty() {
                self.ticks_since_stepdown = None;
            }
        }
        let task = ApplyTask {
            entries,
            proposals,
            sent_at: Instant::now(),
        };
        if ctx
            .apply_router
            .force_send(self.shard_id, ApplyMsg::Apply(task))
            .is_err()
        {
            // Only at shutdown; the task's callbacks are dropped with it.
            tracing::debug!(shard_id = self.shard_id, "apply FSM gone");
        }
    }

    /// Takes this round's ready and stages its writes into `round`.
    fn collect_ready(&mut self, ctx: &PollContext, round: &mut RoundCtx) {
        let mut rd = self.raw_node.ready();
        if rd.ss().is_some() {
            self.on_role_change(ctx);
        }
        if !rd.messages().is_empty() {
            self.send_messages(rd.take_messages(), ctx);
        }
        if !rd.snapshot().is_empty() {
            self.stage_snapshot(&rd, ctx, round);
        }
        let committed = rd.take_committed_entries();
        if !committed.is_empty() {
            self.renew_lease_by_commit(&committed);
            self.send_to_apply(committed, ctx);
        }
        let mut dirty = false;
        if !rd.entries().is_empty() {
            let entries = rd.take_entries();
            self.raw_node
                .mut_store()
                .append(&entries, &mut round.log_batch);
            dirty = true;
        }
        if let Some(hs) = rd.hs() {
            self.raw_node.mut_store().set_hard_state(hs.clone());
            dirty = true;
        }
        if dirty {
            self.raw_node.store().stage_raft_state(&mut round.log_batch);
        }
        if rd.must_sync() {
            round.sync = true;
        }
        for rs in rd.take_read_states() {
            let Some(c) = self.reads.on_read_state(&rs.request_ctx, rs.index) else {
                continue;
            };
            if c.leader_term == Some(self.term()) && self.is_leader() {
                self.renew_lease(c.issued_at, "read_index");
            }
        }
        self.serve_reads();
        round.readies += 1;
        self.pending_ready = Some(rd);
    }

    /// A snapshot from the leader replaces the log: stage the raft-engine
    /// side into this round's write; the data is installed by the apply FSM
    /// once that write is durable (see `crate::snapshot`).
    fn stage_snapshot(&mut self, rd: &Ready, ctx: &PollContext, round: &mut RoundCtx) {
        let meta = rd.snapshot().get_metadata();
        let (index, term) = (meta.index, meta.term);
        let data = match SnapshotData::decode(&rd.snapshot().data[..]) {
            Ok(d) => d,
            Err(e) => panic!("shard {}: undecodable snapshot data: {e}", self.shard_id),
        };
        tracing::info!(
            shard_id = self.shard_id,
            replica_id = self.replica_id,
            index,
            term,
            keys = data.keys,
            "installing a snapshot from the leader"
        );
        self.answer_covered_proposals(index);
        self.raw_node
            .mut_store()
            .apply_snapshot(index, term, &data, &mut round.log_batch);
        if let Some(shard) = &data.shard {
            self.descriptor = shard.clone();
            ctx.meta.set_descriptor(shard.clone());
        }
        metrics::SNAPSHOTS.with_label_values(&["received"]).inc();
        self.pending_install = Some(SnapshotInstall { index, term, data });
    }

    /// A former leader's proposals at or below a snapshot's index: the
    /// snapshot may hold their commands (committed by the new leader) or
    /// another leader's entries, and does not say which. Answered
    /// Indeterminate now rather than left for apply, which never sees
    /// those entries.
    fn answer_covered_proposals(&mut self, snapshot_index: Index) {
        let covered = self.proposals.take_upto(snapshot_index);
        if covered.is_empty() {
            return;
        }
        tracing::warn!(
            shard_id = self.shard_id,
            replica_id = self.replica_id,
            proposals = covered.len(),
            snapshot_index,
            "a snapshot covers pending proposals; their outcome is unknown"
        );
        metrics::PROPOSALS_DROPPED
            .with_label_values(&["indeterminate"])
            .inc_by(covered.iter().map(|p| p.callbacks.len() as u64).sum());
        let shard_id = self.shard_id;
        for p in covered {
            p.callbacks.fail(|| {
                Error::Indeterminate(format!(
                    "shard {shard_id}: a snapshot covered the command's log entry before its outcome was known"
                ))
            });
        }
        if self.proposals.is_empty() {
            self.ticks_since_stepdown = None;
        }
    }

    /// Called after the round's raft-engine write is durable.
    pub fn post_persist(&mut self, ctx: &PollContext) {
        let Some(mut rd) = self.pending_ready.take() else {
            return;
        };
        // Before any entry committed after the snapshot.
        if let Some(install) = self.pending_install.take() {
            let _ = ctx
                .apply_router
                .force_send(self.shard_id, ApplyMsg::Install(install));
        }
        if !rd.persisted_messages().is_empty() {
            self.send_messages(rd.take_persisted_messages(), ctx);
        }
        let mut light = self.raw_node.advance_append(rd);
        if let Some(commit) = light.commit_index() {
            self.raw_node.mut_store().set_commit(commit);
        }
        if !light.messages().is_empty() {
            self.send_messages(light.take_messages(), ctx);
        }
        let committed = light.take_committed_entries();
        if !committed.is_empty() {
            self.renew_lease_by_commit(&committed);
            self.send_to_apply(committed, ctx);
        }
        self.maybe_request_snapshot(ctx);
        // Whatever became ready because of this write (more committed
        // entries, for example) is handled in another round.
        if self.raw_node.has_ready() {
            let _ = ctx.raft_router.force_send(self.shard_id, ReplicaMsg::Wake);
        }
    }

    pub fn has_pending_ready(&self) -> bool {
        self.pending_ready.is_some()
    }

    pub fn status(&self) -> ReplicaStatus {
        let raft = &self.raw_node.raft;
        let store = self.raw_node.store();
        ReplicaStatus {
            shard: self.descriptor.clone(),
            replica_id: self.replica_id,
            role: raft.state,
            term: raft.term,
            leader_id: raft.leader_id,
            commit_index: raft.raft_log.committed,
            applied_index: store.applied_index(),
            last_index: store.last_index(),
            truncated_index: store.truncated_index(),
            pending_proposals: self.proposals.len(),
            hibernated: self.asleep,
        }
    }
}
