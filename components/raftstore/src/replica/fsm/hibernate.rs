//! Hibernation: replicas of idle shards stop ticking, so a node's ticking,
//! heartbeats and poll work follow its active shards, not its hosted ones.
//!
//! # When a replica sleeps
//! - A **follower** (or learner) sleeps as soon as it steps an append or a
//!   heartbeat from the leader it knows, in the leader's term, with a log
//!   ending in that term, nothing of its own waiting (reads, a former
//!   leader's proposals) and no snapshot installing. It needs no ticks while
//!   its leader is fine: ticks only count down to an election.
//! - A **leader** sleeps after `hibernate_after_ticks` ticks with nothing
//!   to do: nothing proposed, read or transferring, no membership change
//!   pending, everything committed and applied, and every other replica
//!   answered within an election timeout and acknowledged the whole log and
//!   its commit (so the followers' states are final), none reported down.
//!   A split check due is run then, not at a tick that will not come.
//!
//! A sleeping replica is left out of the node ticker's rounds; it still
//! handles every message. A shard with a replica down does not hibernate:
//! its leader keeps ticking to count it down and to keep probing it (so
//! while a node is down, the shards it held tick, as they would without
//! hibernation, until the placement driver replaces its replicas).
//!
//! # What wakes it
//! - Client requests and admin commands (reset a leader's idle count too).
//! - Any raft message, except a sleeping follower's leader's appends and
//!   heartbeats, and a sleeping leader's followers' acknowledgements (of
//!   the heartbeat it may send in the tick it falls asleep). A follower woken by a vote request or a client also sends
//!   its leader a `WakeUp`: a sleeping leader sends no heartbeats, and
//!   without them the followers would elect a replacement for a leader
//!   that is fine.
//! - Node liveness (`crate::liveness`), the only thing that notices a dead
//!   leader: a follower whose leader's node went silent for two election
//!   timeouts, or restarted, wakes and campaigns at once (its election
//!   clock is moved to the timeout: the leader's lease ended before that
//!   silence did, see `replica::lease`); a leader wakes when a node holding
//!   one of its followers goes, comes back or restarts.
//!
//! # Not solved yet (why it is off by default)
//! Under saturation it misbehaves. Starting a 3-node cluster of 10,000
//! shards on 2 cores: followers sleep as soon as they hear their leader, so
//! when an overloaded leader steps down (check-quorum) nobody notices but
//! node liveness; heartbeats between nodes wait behind the election traffic,
//! peers are called down, thousands of followers campaign at once, and the
//! cluster did not settle within minutes (without hibernation a fresh start
//! is ready in 1.7 s, though the saturated cluster keeps re-electing a few
//! thousand shards). The fix planned: followers tick while their leader does, and sleep
//! only when the leader says it hibernates (TiKV's negotiation), so only
//! hibernated shards depend on node liveness.
//!
//! # Safety
//! Not ticking only lengthens what ticks measure: a sleeping follower holds
//! off votes longer, never shorter, so the lease argument holds. The one
//! shortcut, campaigning at once when the leader's node is silent, is
//! justified by real time measured on this node since that node's last
//! message. A sleeping leader that got cut off keeps believing it leads,
//! but cannot commit or serve a lease read (its lease is time-bound and
//! long over); once anything wakes it, raft's check-quorum steps it down.

use flotilla_proto::meta::ReplicaRole;
use raft::eraftpb::MessageType;
use raft::{ProgressState, StateRole};

use super::ReplicaFsm;
use crate::liveness::PeerEvent;
use crate::msg::ReplicaMsg;
use crate::replica::poller::PollContext;
use crate::transport::{Extra, RaftMessage};
use crate::{metrics, NodeId, ReplicaId};

impl ReplicaFsm {
    /// What a message means for hibernation, before it is handled.
    pub(super) fn note_activity(&mut self, msg: &ReplicaMsg, ctx: &PollContext) {
        use ReplicaMsg::*;
        let (reason, tell_leader) = match msg {
            Write(_) | Read(_) => {
                self.idle_ticks = 0;
                ("request", true)
            }
            ChangeReplicas { .. }
            | TransferLeader { .. }
            | CompactLog(_)
            | ComputeHash(_)
            | Split { .. } => {
                self.idle_ticks = 0;
                ("request", false)
            }
            Raft(m) => match m.extra {
                Some(Extra::WakeUp) => ("wake_up", false),
                Some(Extra::NodeHeartbeat { .. }) => return,
                None if self.is_own_leaders_append(m) || self.late_ack(m) => return,
                None => (
                    "raft_message",
                    matches!(
                        m.msg.get_msg_type(),
                        MessageType::MsgRequestVote | MessageType::MsgRequestPreVote
                    ),
                ),
            },
            _ => return,
        };
        if self.asleep {
            self.wake(ctx, reason);
            if tell_leader {
                self.wake_leader(ctx);
            }
        }
    }

    /// An append or heartbeat from the leader this follower knows.
    fn is_own_leaders_append(&self, m: &RaftMessage) -> bool {
        !self.is_leader()
            && m.from_replica != raft::INVALID_ID
            && m.from_replica == self.leader_id()
            && m.msg.term == self.term()
            && matches!(
                m.msg.get_msg_type(),
                MessageType::MsgAppend | MessageType::MsgHeartbeat | MessageType::MsgSnapshot
            )
    }

    /// On a leader: a follower acknowledging what it has, as answers to the
    /// heartbeat a leader may send in the tick it falls asleep do.
    fn late_ack(&self, m: &RaftMessage) -> bool {
        self.is_leader()
            && m.msg.term == self.term()
            && match m.msg.get_msg_type() {
                MessageType::MsgHeartbeatResponse => true,
                MessageType::MsgAppendResponse => !m.msg.reject,
                _ => false,
            }
    }

    pub(super) fn wake(&mut self, ctx: &PollContext, reason: &'static str) {
        self.idle_ticks = 0;
        if !self.asleep {
            return;
        }
        self.asleep = false;
        ctx.meta.set_asleep(self.shard_id, false);
        metrics::WAKEUPS.with_label_values(&[reason]).inc();
        tracing::debug!(
            shard_id = self.shard_id,
            replica_id = self.replica_id,
            reason,
            "waking up"
        );
        if self.is_leader() {
            // Tick counts froze while asleep: who answered "lately" must be
            // heard again (leader transfers check it), and the followers
            // hear from the leader now rather than at its next heartbeat.
            self.last_heard.clear();
            self.watch_from = self.ticks;
            self.raw_node.ping();
        }
    }

    fn sleep(&mut self, ctx: &PollContext, role: &'static str) {
        if self.asleep || !ctx.cfg.hibernate {
            return;
        }
        self.asleep = true;
        ctx.meta.set_asleep(self.shard_id, true);
        metrics::HIBERNATIONS.with_label_values(&[role]).inc();
        tracing::trace!(
            shard_id = self.shard_id,
            replica_id = self.replica_id,
            role,
            "hibernating"
        );
    }

    /// Tells the leader to tick again (see the module notes).
    fn wake_leader(&self, ctx: &PollContext) {
        let leader = self.leader_id();
        if leader == raft::INVALID_ID || leader == self.replica_id {
            return;
        }
        let Some(to_node) = self.node_of(leader) else {
            return;
        };
        ctx.transport.send(RaftMessage {
            shard_id: self.shard_id,
            from_node: ctx.node_id,
            to_node,
            from_replica: self.replica_id,
            to_replica: leader,
            epoch: self.descriptor.epoch(),
            msg: Default::default(),
            extra: Some(Extra::WakeUp),
        });
    }

    pub(super) fn node_of(&self, replica: ReplicaId) -> Option<NodeId> {
        self.descriptor
            .replica(replica)
            .map(|r| r.node_id)
            .or_else(|| self.peer_nodes.get(&replica).copied())
    }

    /// After stepping `m` (of type `msg_type`, from `from`).
    pub(super) fn maybe_sleep_as_follower(
        &mut self,
        from: ReplicaId,
        msg_type: MessageType,
        ctx: &PollContext,
    ) {
        if self.asleep || !matches!(msg_type, MessageType::MsgAppend | MessageType::MsgHeartbeat) {
            return;
        }
        let raft = &self.raw_node.raft;
        if raft.state != StateRole::Follower
            || raft.leader_id != from
            || raft.raft_log.last_term() != raft.term
        {
            return;
        }
        if !self.reads.is_empty()
            || self.resend_reads
            || self.ticks_since_stepdown.is_some()
            || !self.pending_writes.is_empty()
            || !self.raw_node.store().is_initialized()
            || self.data_in_flux()
        {
            return;
        }
        self.sleep(ctx, "follower");
    }

    /// On a leader's tick: counts idle ticks and sleeps after enough.
    pub(super) fn maybe_sleep_as_leader(&mut self, ctx: &PollContext) {
        if !ctx.cfg.hibernate || !self.is_leader() {
            return;
        }
        if let Some(why) = self.leader_busy(ctx) {
            if self.idle_ticks > 0 {
                tracing::trace!(
                    shard_id = self.shard_id,
                    replica_id = self.replica_id,
                    why,
                    "leader busy again"
                );
            }
            self.idle_ticks = 0;
            return;
        }
        self.idle_ticks += 1;
        if self.idle_ticks >= ctx.cfg.hibernate_after_ticks {
            // What was written since the last split check is checked now
            // rather than at a tick that will not come.
            if self.split_check_due(ctx) {
                self.maybe_check_split(ctx);
            }
            self.sleep(ctx, "leader");
        }
    }

    /// What keeps the leader ticking (None: nothing needs a clock).
    fn leader_busy(&self, ctx: &PollContext) -> Option<&'static str> {
        let raft = &self.raw_node.raft;
        let last = raft.raft_log.last_index();
        let store = self.raw_node.store();
        if raft.lead_transferee.is_some() {
            return Some("transferring leadership");
        }
        if raft.pending_conf_index > raft.raft_log.applied
            || self.descriptor.replicas.iter().any(|r| {
                r.role == ReplicaRole::IncomingVoter as i32
                    || r.role == ReplicaRole::DemotingVoter as i32
            })
        {
            return Some("membership change");
        }
        if raft.raft_log.committed != last || store.applied_index() != last {
            return Some("entries not committed or applied");
        }
        if !self.proposals.is_empty() || !self.pending_writes.is_empty() {
            return Some("proposals");
        }
        if !self.reads.is_empty() || self.resend_reads {
            return Some("reads");
        }
        if self.reported_down > 0 {
            return Some("replicas down");
        }
        // Every other replica answered within an election timeout (since
        // this leader last woke: waking forgets who answered), so a
        // follower that died just now keeps the leader up to count it down.
        let recent = ctx.cfg.election_ticks as u64;
        for (id, pr) in raft.prs().iter() {
            if *id == self.replica_id {
                continue;
            }
            if pr.matched != last || pr.committed_index != last {
                return Some("a follower lacks entries or their commit");
            }
            // (A follower that was unreachable stays in Probe until the
            // next entry even when it has everything.)
            if pr.state == ProgressState::Snapshot {
                return Some("a follower needs a snapshot");
            }
            let answered = self
                .last_heard
                .get(id)
                .is_some_and(|t| self.ticks.saturating_sub(*t) <= recent);
            if !answered {
                return Some("a follower has not answered lately");
            }
        }
        None
    }

    /// What a peer node's change means here (see the module notes).
    pub(super) fn on_peer_node(&mut self, node: NodeId, event: PeerEvent, ctx: &PollContext) {
        if self.is_leader() {
            if self.descriptor.replica_on(node).is_some() {
                self.wake(ctx, event.as_str());
            }
            return;
        }
        let leader = self.leader_id();
        if leader == raft::INVALID_ID || self.node_of(leader) != Some(node) {
            return;
        }
        if matches!(event, PeerEvent::Down | PeerEvent::Restarted) {
            self.wake(ctx, event.as_str());
            let raft = &mut self.raw_node.raft;
            raft.election_elapsed = raft.election_elapsed.max(raft.election_timeout());
            tracing::debug!(
                shard_id = self.shard_id,
                replica_id = self.replica_id,
                leader_node = node,
                event = event.as_str(),
                "the leader's node is gone; campaigning without waiting out an election timeout"
            );
        }
    }

    pub fn is_asleep(&self) -> bool {
        self.asleep
    }
}
