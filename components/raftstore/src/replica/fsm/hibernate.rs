//! Hibernation: replicas of idle shards stop ticking, so a node's ticking,
//! heartbeats and poll work follow its active shards, not its hosted ones.
//!
//! # How a shard falls asleep (negotiated, as TiKV does)
//! 1. A **leader** counts ticks with nothing to do: nothing proposed, read
//!    or transferring, no membership change pending, everything committed
//!    and applied, and every other replica answered within an election
//!    timeout and acknowledged the whole log and its commit, none reported
//!    down. A split check due is run then, not at a tick that will not come.
//! 2. After `hibernate_after_ticks` of them it stops ticking raft (so it
//!    sends no more heartbeats) and sends every other replica `Hibernate`
//!    with its term, last index and commit, but only at a tick where raft
//!    has no message waiting to leave: nothing of the leader's may reach a
//!    follower after its request (a heartbeat would wake it).
//! 3. A **follower** whose log ends there, in that term, with that commit,
//!    nothing of its own waiting (reads, a former leader's proposals) and no
//!    snapshot installing, stops ticking and answers `HibernateAck`.
//! 4. The leader sleeps once every replica answered. If one does not
//!    within half an election timeout (less when heartbeats are sparse), or
//!    anything happens meanwhile, it gives up: it pings (a heartbeat, which
//!    wakes the followers that slept) and counts idle ticks again. The wait
//!    is bounded so that a follower that declined never goes an election
//!    timeout without a heartbeat; it is not shorter because a loaded node
//!    (10,000 shards restarting) answers late.
//!
//! So a follower sleeps only while its leader does (or is about to): as long
//! as a leader is awake its followers tick and notice its failure by raft's
//! own election timeout. An earlier version let followers sleep on any
//! heartbeat; on a saturated node leaders then stepped down (check-quorum)
//! unnoticed by their sleeping followers, and a 10,000-shard cluster never
//! settled.
//!
//! A sleeping replica is left out of the node ticker's rounds; it still
//! handles every message. A shard with a replica down does not hibernate:
//! its leader keeps ticking to count it down and to keep probing it (so
//! while a node is down, the shards it held tick, as they would without
//! hibernation, until the placement driver replaces its replicas).
//!
//! # What wakes it
//! - Client requests and admin commands (reset a leader's idle count too).
//! - Any raft message, except a sleeping leader's followers'
//!   acknowledgements of the heartbeat it sent before it stopped ticking.
//!   A leader sends nothing after `Hibernate` unless it woke, and a woken
//!   leader pings, so a follower wakes on anything from its leader. A
//!   follower woken by a vote request or a client also sends its leader a
//!   `WakeUp`: a sleeping leader sends no heartbeats, and without them the
//!   followers would elect a replacement for a leader that is fine.
//! - Node liveness (`crate::liveness`), the only thing that notices a dead
//!   sleeping leader: a sleeping follower whose leader's node went silent
//!   for an election timeout, or restarted, wakes; its election clock is
//!   moved to the timeout (the leader's lease ended before that silence
//!   did, see `replica::lease`), so it grants votes, and one voter outside
//!   that node (chosen by shard id) campaigns: at once after a silence, two
//!   ticks later after a restart. A vote request reaching a follower whose
//!   leader's node has been silent past the lease bound is granted even
//!   before that follower handled its own event (`end_lease_by_silence`).
//!   A leader wakes when a node holding one of its followers goes (an
//!   election timeout later, so the elections go first), comes back or
//!   restarts. Awake followers that still hear their leader ignore node
//!   liveness events (a peer wrongly called down on an overloaded node must
//!   not set off elections); awake ones that missed its heartbeats (woken
//!   by a client while the leader slept, or followers of an awake leader
//!   that died) take part like sleeping ones, so their own timers do not
//!   race the chosen voter. A follower woken while its leader slept counts
//!   as not hearing it until the leader's next message (raft's clock stood
//!   still while it slept and says nothing), and one whose own pre-vote
//!   failed, which makes raft forget the leader, still answers to the
//!   leader it had in that term: once such a chosen voter ignored the
//!   event, and its shard waited for the fallback timer.
//!
//! # Not done yet
//! - A sleeping shard whose leader's node dies waits out node liveness's
//!   election timeout before electing: with 3,333 such shards on one node,
//!   writes resume 1.0-1.3 s after a kill -9 at the median and within
//!   1.6 s at most (`make bench-scale`, README figures). Detection faster
//!   than one election timeout would need the lease to be shorter. The
//!   followers that clients woke used to race the chosen voter with their
//!   own (stale) clocks: that won ~0.2 s at the median but split the vote
//!   now and then (a second election, 2.5-3 s); they now hold off, see
//!   `wake`.
//! - The meta shard sleeps between the reads that node heartbeats make
//!   now and then (each wakes it: a ReadIndex round, then ticks and a new
//!   handshake). The meta leader answers most heartbeats from the registry
//!   record it last confirmed (`flotilla_server::cluster_meta`), so with
//!   three nodes that is one wake-up every ~7 s; it used to be one every
//!   2 s. A sleeping follower could answer its sleeping leader's ReadIndex
//!   heartbeat without waking, and the leader could serve the read and stay
//!   asleep (with a timeout of its own for a round that never completes).
//! - A shard with a replica down never sleeps (as in TiKV).
//!
//! # Safety
//! Not ticking only lengthens what ticks measure: a sleeping follower holds
//! off votes longer, never shorter, so the lease argument holds. The one
//! shortcut, campaigning at once when the leader's node is silent, is
//! justified by real time measured on this node since that node's last
//! message. A sleeping leader that got cut off keeps believing it leads,
//! but cannot commit or serve a lease read (its lease is time-bound and
//! long over); once anything wakes it, raft's check-quorum steps it down.

use std::collections::HashSet;

use flotilla_proto::meta::ReplicaRole;
use raft::eraftpb::MessageType;
use raft::{ProgressState, StateRole};

use super::ReplicaFsm;
use crate::liveness::PeerEvent;
use crate::msg::ReplicaMsg;
use crate::replica::poller::PollContext;
use crate::transport::{Extra, RaftMessage};
use crate::{metrics, NodeId, ReplicaId};

/// The leader a follower answers to in `term`: the one raft names, or, if
/// raft names none (its own pre-vote made it forget, and a pre-vote keeps
/// the term), the last one it knew in that same term. A newer term means
/// someone else campaigned: then it answers to nobody yet.
fn leader_in_term(leader: ReplicaId, last: (ReplicaId, u64), term: u64) -> ReplicaId {
    match leader {
        raft::INVALID_ID if last.1 == term => last.0,
        id => id,
    }
}

/// A leader's request to hibernate, waiting for every replica's answer.
pub(super) struct Announcement {
    term: u64,
    at_tick: u64,
    acks: HashSet<ReplicaId>,
}

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
                Some(
                    Extra::NodeHeartbeat { .. }
                    | Extra::Hibernate { .. }
                    | Extra::HibernateAck { .. },
                ) => return,
                None if self.late_ack(m) => return,
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
        if self.asleep && tell_leader {
            self.wake_leader(ctx);
        }
        if self.asleep || self.announced.is_some() {
            self.wake(ctx, reason);
        }
    }

    /// On a leader: a follower acknowledging what it has, as answers to the
    /// heartbeat a leader sent before it stopped ticking do.
    fn late_ack(&self, m: &RaftMessage) -> bool {
        (self.asleep || self.announced.is_some())
            && self.is_leader()
            && m.msg.term == self.term()
            && match m.msg.get_msg_type() {
                MessageType::MsgHeartbeatResponse => true,
                MessageType::MsgAppendResponse => !m.msg.reject,
                _ => false,
            }
    }

    /// Ticks again (a no-op when awake, but for the leader's idle count): a
    /// leader that slept or asked to stops waiting for answers and pings.
    pub(super) fn wake(&mut self, ctx: &PollContext, reason: &'static str) {
        self.idle_ticks = 0;
        let gave_up = self.announced.take().is_some();
        if !self.asleep && !gave_up {
            return;
        }
        if gave_up {
            metrics::HIBERNATE_REQUESTS
                .with_label_values(&["given_up"])
                .inc();
        }
        if self.asleep {
            self.asleep = false;
            ctx.meta.set_asleep(self.shard_id, false);
            metrics::WAKEUPS.with_label_values(&[reason]).inc();
            // (Cleared again at once if what woke it came from the leader.)
            self.awaiting_leader = !self.is_leader();
            if self.awaiting_leader {
                // Raft's clock stood still while it slept: what it shows is
                // old. Started over, with at least one and a half timeouts
                // to run, it gives a sleeping leader (told by `WakeUp`) time
                // to answer and, if that leader died, node liveness's chosen
                // voter the first go (`on_peer_node`). Ticking on from the
                // old reading, a follower a client woke after the kill
                // campaigned by itself at about the moment the chosen voter
                // did: both pre-votes passed, each voted for itself, and the
                // shard needed a second election (2.5-3 s of failover in 2
                // of 52 `make bench-scale` runs). A longer wait for a vote
                // is always safe; the leader's lease only needs it long.
                self.raw_node.raft.election_elapsed = 0;
                self.hold_own_campaign();
            }
        }
        tracing::debug!(
            shard_id = self.shard_id,
            replica_id = self.replica_id,
            reason,
            gave_up,
            "waking up"
        );
        if self.is_leader() {
            // Tick counts froze while asleep: who answered "lately" must be
            // heard again (leader transfers check it), and the followers
            // (some of which may sleep) hear from the leader now.
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
        if leader != self.replica_id {
            self.send_extra(leader, Extra::WakeUp, ctx);
        }
    }

    fn send_extra(&self, to_replica: ReplicaId, extra: Extra, ctx: &PollContext) {
        if to_replica == raft::INVALID_ID {
            return;
        }
        let Some(to_node) = self.node_of(to_replica) else {
            return;
        };
        ctx.transport.send(RaftMessage {
            shard_id: self.shard_id,
            from_node: ctx.node_id,
            to_node,
            from_replica: self.replica_id,
            to_replica,
            epoch: self.descriptor.epoch(),
            msg: Default::default(),
            extra: Some(extra),
        });
    }

    pub(super) fn node_of(&self, replica: ReplicaId) -> Option<NodeId> {
        self.descriptor
            .replica(replica)
            .map(|r| r.node_id)
            .or_else(|| self.peer_nodes.get(&replica).copied())
    }

    /// A `Hibernate`/`HibernateAck` from a peer replica.
    pub(super) fn on_hibernate_message(&mut self, m: &RaftMessage, ctx: &PollContext) {
        match m.extra {
            Some(Extra::Hibernate {
                term,
                index,
                commit,
            }) => {
                if let Some(why) =
                    self.why_not_sleep_as_follower(m.from_replica, term, index, commit)
                {
                    tracing::trace!(
                        shard_id = self.shard_id,
                        replica_id = self.replica_id,
                        why,
                        "not hibernating as the leader asks"
                    );
                    return;
                }
                self.sleep(ctx, "follower");
                self.send_extra(m.from_replica, Extra::HibernateAck { term }, ctx);
            }
            Some(Extra::HibernateAck { term }) => {
                let raft = &self.raw_node.raft;
                let Some(a) = self.announced.as_mut() else {
                    return;
                };
                if a.term != term || raft.term != term {
                    return;
                }
                a.acks.insert(m.from_replica);
                let all = raft
                    .prs()
                    .iter()
                    .all(|(id, _)| *id == self.replica_id || a.acks.contains(id));
                if all {
                    self.announced = None;
                    metrics::HIBERNATE_REQUESTS
                        .with_label_values(&["granted"])
                        .inc();
                    self.sleep(ctx, "leader");
                }
            }
            _ => {}
        }
    }

    /// Why this replica must not sleep when `leader` asks, saying its log
    /// ends at `index` in `term` with `commit` committed (None: it may).
    fn why_not_sleep_as_follower(
        &self,
        leader: ReplicaId,
        term: u64,
        index: u64,
        commit: u64,
    ) -> Option<&'static str> {
        let raft = &self.raw_node.raft;
        let log = &raft.raft_log;
        if raft.state != StateRole::Follower || raft.leader_id != leader || raft.term != term {
            return Some("not a follower of that leader in that term");
        }
        if log.last_index() != index
            || log.last_term() != term
            || log.committed != commit
            || log.persisted != index
        {
            return Some("the log differs from the leader's");
        }
        if !self.reads.is_empty() || self.resend_reads {
            return Some("reads");
        }
        if self.ticks_since_stepdown.is_some() || !self.pending_writes.is_empty() {
            return Some("proposals of its own");
        }
        if !self.raw_node.store().is_initialized() || self.data_in_flux() {
            return Some("a snapshot");
        }
        None
    }

    /// On a leader's tick, before raft's: counts idle ticks, asks the
    /// followers to hibernate after enough, and waits for their answers.
    /// True: raft must not tick (no heartbeats while the request stands).
    pub(super) fn hibernation_tick(&mut self, ctx: &PollContext) -> bool {
        if !ctx.cfg.hibernate {
            return false;
        }
        if !self.is_leader() {
            self.announced = None;
            return false;
        }
        if let Some(a) = &self.announced {
            // A follower that did not take the request (or whose answer is
            // late) keeps ticking: it must hear a ping before its election
            // timeout, counted from the heartbeat before the request.
            let (hb, et) = (ctx.cfg.heartbeat_ticks, ctx.cfg.election_ticks);
            let patience = (et / 2).min(et.saturating_sub(hb + 2)).max(1) as u64;
            let waited = self.ticks.saturating_sub(a.at_tick);
            if waited <= patience && a.term == self.term() {
                return true;
            }
            tracing::debug!(
                shard_id = self.shard_id,
                replica_id = self.replica_id,
                answered = a.acks.len(),
                "not every replica agreed to hibernate"
            );
            self.wake(ctx, "hibernate_refused");
            return false;
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
            return false;
        }
        self.idle_ticks += 1;
        if self.idle_ticks < ctx.cfg.hibernate_after_ticks {
            return false;
        }
        // What was written since the last split check is checked now
        // rather than at a tick that will not come.
        if self.split_check_due(ctx) {
            self.maybe_check_split(ctx);
        }
        let raft = &self.raw_node.raft;
        let (term, index, commit) = (
            raft.term,
            raft.raft_log.last_index(),
            raft.raft_log.committed,
        );
        let others: Vec<ReplicaId> = raft
            .prs()
            .iter()
            .map(|(id, _)| *id)
            .filter(|id| *id != self.replica_id)
            .collect();
        if others.is_empty() {
            self.sleep(ctx, "leader");
            return true;
        }
        // Raft's messages leave at the end of the poll round, `Hibernate`
        // at once: a heartbeat from a tick earlier in this round (a busy
        // poller hands a replica several ticks at a time) would reach the
        // followers after it and wake them under a sleeping leader, which
        // they would then replace an election timeout later. After a whole
        // cluster of 10,000 shards restarted, thousands of followers woke
        // this way and a few thousand shards elected again. The request
        // goes out at the next tick instead, once those have left.
        if !self.raw_node.raft.msgs.is_empty() {
            return true;
        }
        for id in others {
            self.send_extra(
                id,
                Extra::Hibernate {
                    term,
                    index,
                    commit,
                },
                ctx,
            );
        }
        self.announced = Some(Announcement {
            term,
            at_tick: self.ticks,
            acks: HashSet::new(),
        });
        true
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
        // A follower that knows no leader because its own pre-vote failed
        // (a client woke it under a leader that had just died, its clock ran
        // out before the others' did, and they refused) still answers to
        // the leader it had in this term. Once it ignored the event, and
        // when it was the voter chosen below, its shard waited for the
        // others' fallback timer: half an election timeout more.
        let leader = leader_in_term(self.leader_id(), self.last_leader, self.term());
        if leader == raft::INVALID_ID || self.node_of(leader) != Some(node) {
            return;
        }
        // An awake follower still hearing its leader ignores the event: a
        // peer wrongly called down on an overloaded node must not set off
        // elections. One that missed its leader's heartbeats (a follower a
        // client woke under a sleeping leader, or a dead awake leader's)
        // joins the election below; left to raft's own timer, its election
        // raced the chosen voter's and split the vote in ~4 % of the shards
        // that clients were writing to, costing them another timeout.
        let hears_leader = !self.asleep
            && !self.awaiting_leader
            && self.leader_id() != raft::INVALID_ID
            && self.raw_node.raft.election_elapsed <= 2 * ctx.cfg.heartbeat_ticks;
        if hears_leader {
            return;
        }
        if matches!(event, PeerEvent::Down | PeerEvent::Restarted) {
            self.wake(ctx, event.as_str());
            // The leader's lease ended before the silence did: grant votes
            // at once. One voter elsewhere campaigns, picked by shard id so
            // new leaders spread over the nodes; the rest keep their timer
            // as a fallback. All campaigning at once split the votes: with
            // 3,333 hibernated leaders on a killed node, 5,000 elections and
            // writes stalled up to 10 s. After `Down` it campaigns at once:
            // the other voters grant by their own node's measure of the
            // same silence (`end_lease_by_silence`), whether or not they
            // have handled their own `Down` yet (on a node waking 10,000
            // replicas that takes a while). After `Restarted` the others
            // heard the new process, so it waits two ticks for them to
            // handle their own `Restarted`.
            let first = self.chosen_voter(Some(node)) == Some(self.replica_id);
            // (`first` is a voter by the descriptor, which apply keeps equal
            // to raft's configuration; raft's `campaign` does not check.)
            // Raft declines to campaign while a configuration change is
            // pending: the replica then stays a follower.
            let campaigned = first && event == PeerEvent::Down && !self.data_in_flux() && {
                let _ = self.raw_node.campaign();
                self.raw_node.raft.state != StateRole::Follower
            };
            let raft = &mut self.raw_node.raft;
            if campaigned {
                // Pre-candidacy keeps the election clock: without this it
                // would campaign again at the next tick.
                raft.election_elapsed = 0;
            } else if first {
                raft.election_elapsed = raft
                    .randomized_election_timeout()
                    .saturating_sub(2)
                    .max(raft.election_timeout());
            } else {
                self.grant_votes();
            }
            tracing::debug!(
                shard_id = self.shard_id,
                replica_id = self.replica_id,
                leader_node = node,
                event = event.as_str(),
                first,
                "the leader's node is gone; its lease is over"
            );
        }
    }

    /// A vote request from a replica elsewhere reached a follower whose
    /// leader's node this node has not heard from for
    /// `(election-ticks - 1) * tick-interval`, the bound the leader lease is
    /// kept below (`replica::lease`): the leader's lease started before its
    /// last message left, so it is over, and raft may grant as it would
    /// once its own election timeout passed. A sleeping follower's election
    /// clock stands still, so without this it would refuse until it handled
    /// its node's `Down` event. Nothing is concluded from a node never
    /// heard since this process started (a restarted node holds off votes
    /// for an election timeout anyway).
    pub(super) fn end_lease_by_silence(&mut self, from_node: NodeId, ctx: &PollContext) {
        let leader = self.leader_id();
        if self.is_leader() || leader == raft::INVALID_ID {
            return;
        }
        let Some(leader_node) = self.node_of(leader) else {
            return;
        };
        if leader_node == from_node || leader_node == ctx.node_id {
            return;
        }
        if ctx
            .liveness
            .silent_for(leader_node)
            .is_none_or(|silent| silent < ctx.cfg.lease_bound())
        {
            return;
        }
        if self.raw_node.raft.election_elapsed < self.raw_node.raft.election_timeout() {
            self.grant_votes();
            tracing::debug!(
                shard_id = self.shard_id,
                replica_id = self.replica_id,
                leader_node,
                "a vote request while the leader's node is silent: its lease is over"
            );
        }
    }

    /// Has raft grant votes now (its election timeout passed) without
    /// campaigning itself for at least half an election timeout more: a
    /// voter whose randomized timeout happened to be the shortest would
    /// otherwise campaign at its next tick against the candidate it just
    /// granted a pre-vote, split the vote and cost both a whole timeout
    /// (an eighth of 3,333 elections did). It stays the fallback if the
    /// candidate fails.
    fn grant_votes(&mut self) {
        let raft = &mut self.raw_node.raft;
        let timeout = raft.election_timeout();
        // Exactly the timeout, also when an awake follower's clock was past
        // it: the hold below starts now.
        raft.election_elapsed = timeout;
        self.hold_own_campaign();
    }

    /// The voter that campaigns first when the shard has nobody to hear
    /// from (its leader's node `dead` died, or the whole cluster restarted):
    /// by the descriptor's voters outside `dead`, sorted by replica id, the
    /// one at shard id modulo their count, so that new leaders spread over
    /// the nodes and every replica picks the same one.
    pub(super) fn chosen_voter(&self, dead: Option<NodeId>) -> Option<ReplicaId> {
        let mut voters: Vec<ReplicaId> = self
            .descriptor
            .replicas
            .iter()
            .filter(|r| Some(r.node_id) != dead && r.role == ReplicaRole::Voter as i32)
            .map(|r| r.id)
            .collect();
        voters.sort_unstable();
        (!voters.is_empty()).then(|| voters[self.shard_id as usize % voters.len()])
    }

    /// Makes raft's election timer run for at least one and a half
    /// election timeouts this time (from its clock's current reading).
    pub(super) fn hold_own_campaign(&mut self) {
        let raft = &mut self.raw_node.raft;
        let timeout = raft.election_timeout();
        // Within raft's range [timeout, 2 * timeout): the raft config sets
        // no other min/max election ticks (raft asserts the range).
        let hold = timeout + timeout / 2;
        if raft.randomized_election_timeout() < hold {
            raft.set_randomized_election_timeout(hold);
        }
    }

    pub fn is_asleep(&self) -> bool {
        self.asleep
    }
}

#[cfg(test)]
mod tests {
    use super::leader_in_term;

    #[test]
    fn a_failed_pre_vote_does_not_make_a_follower_forget_its_leader() {
        // Raft names the leader: that one.
        assert_eq!(leader_in_term(5, (4, 6), 7), 5);
        // It names none after this replica's own pre-vote (same term).
        assert_eq!(leader_in_term(0, (5, 7), 7), 5);
        // Someone campaigned in a newer term: nobody yet.
        assert_eq!(leader_in_term(0, (5, 7), 8), 0);
        // Never knew one (a restarted replica).
        assert_eq!(leader_in_term(0, (0, 0), 7), 0);
    }
}
