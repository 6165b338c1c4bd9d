//! One shard's apply state machine.
//!
//! Within a round the FSM applies its committed entries into the round's
//! shared write batch. Three things need the batch written first and are
//! done in `finish_round`, after the round's write:
//! - building a snapshot (the RocksDB snapshot must hold what the apply
//!   state says is applied);
//! - hashing at a `ComputeHash` entry: the FSM stops after that entry so the
//!   hash is taken at exactly its index on every replica, and goes on next
//!   round;
//! - installing a received snapshot (clear the range, ingest, new apply
//!   state), which replaces everything applied before it.
//!
//! A membership change that removes this replica is the last entry it
//! applies: what follows belongs to the remaining members, and the raft side
//! deletes the shard's data once it hears of the removal.

use std::collections::VecDeque;

use bytes::Bytes;
use crossbeam_channel::{Receiver, TryRecvError};
use flotilla_batch_system::{Fsm, HandleResult};
use flotilla_proto::local::{ApplyState, ShardLocalState, ShardState};
use flotilla_proto::meta::{Replica, ReplicaRole, ShardDescriptor};
use flotilla_proto::raftcmd::{
    admin_command, op, Cas, ConfChangeContext, RaftCommand, WriteCommand,
};
use flotilla_proto::Message as _;
use flotilla_storage::CF_DEFAULT;
use protobuf::Message as _;
use raft::eraftpb::{ConfChangeType, ConfChangeV2, Entry, EntryType};

use super::overlay::Lookup;
use super::poller::{Answer, ApplyCtx};
use crate::msg::{
    write_spans, AdminResult, ApplyMsg, ApplyResult, CasOutcome, ExecResult, Proposal,
    ProposalCallbacks, SnapshotInstall, WriteResult,
};
use crate::worker::SnapJob;
use crate::{metrics, Error, Index, ReplicaId, Result, ShardId};

/// Entries left over when the FSM stopped early in a round.
struct Stash {
    entries: VecDeque<Entry>,
    proposals: VecDeque<Proposal>,
}

pub struct ApplyFsm {
    shard_id: ShardId,
    replica_id: ReplicaId,
    descriptor: ShardDescriptor,
    apply_state: ApplyState,
    receiver: Receiver<ApplyMsg>,
    stopped: bool,
    /// A membership change removed this replica: nothing after it is
    /// applied (the raft side destroys the replica once it hears of it).
    removed: bool,
    stash: Option<Stash>,
    // What this round did, for `finish_round`.
    applied_in_round: bool,
    exec: Vec<ExecResult>,
    gen_snapshot: bool,
    hash_at: Option<Index>,
    install: Option<SnapshotInstall>,
}

impl Fsm for ApplyFsm {
    type Message = ApplyMsg;
    fn is_stopped(&self) -> bool {
        self.stopped
    }
}

/// What an applied entry produced for its proposal.
enum EntryOutcome {
    None,
    Writes(Vec<Result<WriteResult>>),
    Admin,
    /// An admin command refused at apply time (deterministically, on every
    /// replica).
    Rejected(String),
}

impl ApplyFsm {
    pub fn new(
        descriptor: ShardDescriptor,
        replica_id: ReplicaId,
        apply_state: ApplyState,
        receiver: Receiver<ApplyMsg>,
    ) -> Self {
        ApplyFsm {
            shard_id: descriptor.id,
            replica_id,
            descriptor,
            apply_state,
            receiver,
            stopped: false,
            removed: false,
            stash: None,
            applied_in_round: false,
            exec: Vec::new(),
            gen_snapshot: false,
            hash_at: None,
            install: None,
        }
    }

    /// Whether the FSM must stop taking work until the round's write.
    fn must_wait(&self) -> bool {
        self.hash_at.is_some() || self.install.is_some()
    }

    /// Applies queued work into the round's write batch.
    pub fn handle(&mut self, ctx: &mut ApplyCtx) -> HandleResult {
        if let Some(stash) = self.stash.take() {
            self.apply_entries(stash.entries, stash.proposals, ctx);
        }
        while !self.must_wait() {
            match self.receiver.try_recv() {
                Ok(ApplyMsg::Apply(task)) => {
                    if flotilla_storage::metrics::detailed() {
                        metrics::APPLY_WAIT.observe(task.sent_at.elapsed().as_secs_f64());
                    }
                    self.apply_entries(task.entries.into(), task.proposals.into(), ctx);
                }
                Ok(ApplyMsg::GenerateSnapshot) => self.gen_snapshot = true,
                Ok(ApplyMsg::Install(s)) => self.install = Some(s),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    self.stopped = true;
                    break;
                }
            }
        }
        // Data and apply state go in the same write batch.
        if self.applied_in_round {
            ctx.kv
                .put_apply_state(&mut ctx.wb, self.shard_id, &self.apply_state);
        }
        if self.must_wait() || self.stash.is_some() {
            // Resume after the round's write.
            HandleResult::KeepProcessing
        } else {
            HandleResult::drained()
        }
    }

    fn apply_entries(
        &mut self,
        mut entries: VecDeque<Entry>,
        mut proposals: VecDeque<Proposal>,
        ctx: &mut ApplyCtx,
    ) {
        while let Some(entry) = entries.pop_front() {
            if self.removed {
                break;
            }
            self.apply_entry(entry, &mut proposals, ctx);
            if self.must_wait() {
                if !entries.is_empty() || !proposals.is_empty() {
                    self.stash = Some(Stash { entries, proposals });
                }
                return;
            }
        }
        // Every proposal handed over has an index within the entries (or
        // comes after this replica's removal).
        for p in proposals {
            answer_stale(p, ctx);
        }
    }

    fn apply_entry(
        &mut self,
        entry: Entry,
        proposals: &mut VecDeque<Proposal>,
        ctx: &mut ApplyCtx,
    ) {
        assert_eq!(
            entry.index,
            self.apply_state.applied_index + 1,
            "shard {} replica {}: entries must apply in order",
            self.shard_id,
            self.replica_id
        );
        let outcome = match entry.get_entry_type() {
            EntryType::EntryNormal if !entry.data.is_empty() => self.exec_command(&entry, ctx),
            EntryType::EntryNormal => EntryOutcome::None,
            EntryType::EntryConfChangeV2 => self.exec_conf_change(&entry, ctx),
            EntryType::EntryConfChange => {
                // Flotilla only proposes ConfChangeV2.
                tracing::warn!(
                    shard_id = self.shard_id,
                    index = entry.index,
                    "ignoring a v1 conf change entry"
                );
                EntryOutcome::None
            }
        };
        self.apply_state.applied_index = entry.index;
        self.apply_state.applied_term = entry.term;
        self.applied_in_round = true;
        ctx.entries += 1;

        while let Some(p) = proposals.front() {
            if p.index > entry.index {
                break;
            }
            let p = proposals.pop_front().unwrap();
            if p.index < entry.index || p.term != entry.term {
                answer_stale(p, ctx);
                continue;
            }
            match (p.callbacks, &outcome) {
                (ProposalCallbacks::Writes(cbs), EntryOutcome::Writes(results)) => {
                    assert_eq!(
                        results.len(),
                        cbs.len(),
                        "shard {}: entry {} carries {} commands for {} callbacks",
                        self.shard_id,
                        entry.index,
                        results.len(),
                        cbs.len()
                    );
                    for (cb, r) in cbs.into_iter().zip(results.iter().cloned()) {
                        ctx.answers.push(Answer::Write(cb, r, Some(p.proposed_at)));
                    }
                }
                (ProposalCallbacks::Admin(Some(cb)), EntryOutcome::Admin) => {
                    let r = AdminResult {
                        index: entry.index,
                        shard: self.descriptor.clone(),
                    };
                    ctx.answers.push(Answer::Admin(cb, Ok(r)));
                }
                (
                    ProposalCallbacks::Admin(None),
                    EntryOutcome::Admin | EntryOutcome::Rejected(_),
                ) => {}
                (ProposalCallbacks::Admin(Some(cb)), EntryOutcome::Rejected(why)) => {
                    ctx.answers
                        .push(Answer::Admin(cb, Err(Error::Rejected(why.clone()))));
                }
                // raft-rs turns a conf change it refuses into an empty entry.
                (ProposalCallbacks::Admin(cb), EntryOutcome::None) => {
                    if let Some(cb) = cb {
                        let why = "raft refused the membership change (another one is in progress)";
                        ctx.answers
                            .push(Answer::Admin(cb, Err(Error::Rejected(why.into()))));
                    }
                }
                (cbs, _) => panic!(
                    "shard {}: entry {} does not carry what was proposed ({} waiters)",
                    self.shard_id,
                    entry.index,
                    cbs.len()
                ),
            }
        }
    }

    fn exec_command(&mut self, entry: &Entry, ctx: &mut ApplyCtx) -> EntryOutcome {
        let cmd = RaftCommand::decode(&entry.data[..]).unwrap_or_else(|e| {
            panic!(
                "shard {} entry {}: undecodable command: {e}",
                self.shard_id, entry.index
            )
        });
        if let Some(admin) = cmd.admin.and_then(|a| a.cmd) {
            self.exec_admin(admin, entry.index);
            return EntryOutcome::Admin;
        }
        let version = cmd.header.and_then(|h| h.epoch).unwrap_or_default().version;
        if version != self.descriptor.epoch().version {
            let err = Error::EpochNotMatch {
                shard_id: self.shard_id,
                current: vec![self.descriptor.clone()],
            };
            return EntryOutcome::Writes(cmd.writes.iter().map(|_| Err(err.clone())).collect());
        }
        EntryOutcome::Writes(
            cmd.writes
                .into_iter()
                .map(|w| self.exec_write(w, ctx))
                .collect(),
        )
    }

    fn exec_admin(&mut self, admin: admin_command::Cmd, index: Index) {
        match admin {
            admin_command::Cmd::CompactLog(c) => {
                // A compaction proposed before a snapshot install or an
                // earlier compaction may be out of date.
                if c.index > self.apply_state.truncated_index && c.index < index {
                    self.apply_state.truncated_index = c.index;
                    self.apply_state.truncated_term = c.term;
                    self.exec.push(ExecResult::CompactLog { index: c.index });
                }
            }
            admin_command::Cmd::ComputeHash(_) => self.hash_at = Some(index),
        }
    }

    /// Applies a membership change to the descriptor (the raft side applies
    /// it when the result reaches the replica FSM). Refusals are
    /// deterministic, so every replica refuses the same entries.
    fn exec_conf_change(&mut self, entry: &Entry, ctx: &mut ApplyCtx) -> EntryOutcome {
        let outcome = self.apply_conf_change(entry, ctx);
        let result = match outcome {
            EntryOutcome::Rejected(_) => "rejected",
            _ => "applied",
        };
        metrics::MEMBERSHIP_CHANGES
            .with_label_values(&[result])
            .inc();
        outcome
    }

    fn apply_conf_change(&mut self, entry: &Entry, ctx: &mut ApplyCtx) -> EntryOutcome {
        let cc = if entry.data.is_empty() {
            ConfChangeV2::default()
        } else {
            ConfChangeV2::parse_from_bytes(&entry.data).unwrap_or_else(|e| {
                panic!(
                    "shard {} entry {}: undecodable conf change: {e}",
                    self.shard_id, entry.index
                )
            })
        };
        let context = if entry.context.is_empty() {
            ConfChangeContext::default()
        } else {
            ConfChangeContext::decode(&entry.context[..]).unwrap_or_else(|e| {
                panic!(
                    "shard {} entry {}: undecodable conf change context: {e}",
                    self.shard_id, entry.index
                )
            })
        };
        if !cc.leave_joint() {
            let proposed = context.header.and_then(|h| h.epoch).unwrap_or_default();
            if proposed.conf_ver != self.descriptor.epoch().conf_ver {
                return EntryOutcome::Rejected(format!(
                    "proposed at conf_ver {} but the shard is at {}",
                    proposed.conf_ver,
                    self.descriptor.epoch().conf_ver
                ));
            }
        }
        let mut desc = self.descriptor.clone();
        if let Err(why) = change_replicas(&mut desc, &cc, &context.added) {
            return EntryOutcome::Rejected(why);
        }
        let mut epoch = desc.epoch();
        epoch.conf_ver += 1;
        desc.epoch = Some(epoch);
        tracing::info!(shard_id = self.shard_id, replica_id = self.replica_id, index = entry.index, conf_ver = epoch.conf_ver, replicas = ?desc.replicas.iter().map(|r| (r.id, r.node_id, r.role)).collect::<Vec<_>>(), "membership changed");
        ctx.kv.put_shard_state(
            &mut ctx.wb,
            self.shard_id,
            &ShardLocalState {
                shard: Some(desc.clone()),
                state: ShardState::Normal as i32,
                replica_id: self.replica_id,
            },
        );
        self.removed = desc.replica(self.replica_id).is_none();
        self.descriptor = desc.clone();
        self.exec.push(ExecResult::ConfChange { cc, shard: desc });
        EntryOutcome::Admin
    }

    /// Applies one client command: all of its ops, or none if any key lies
    /// outside the shard.
    fn exec_write(&mut self, w: WriteCommand, ctx: &mut ApplyCtx) -> Result<WriteResult> {
        for span in write_spans(&w) {
            if let Some(key) = span.outside(&self.descriptor) {
                return Err(Error::key_not_in_shard(key, &self.descriptor));
            }
        }
        let mut result = WriteResult::default();
        for o in w.ops {
            match o.op {
                None => {}
                Some(op::Op::Put(p)) => put(ctx, p.key, Some(p.value)),
                Some(op::Op::Delete(d)) => put(ctx, d.key, None),
                Some(op::Op::DeleteRange(r)) => {
                    let end = if r.end_key.is_empty() {
                        self.descriptor.end_key.clone()
                    } else {
                        r.end_key
                    };
                    delete_range(ctx, r.start_key, end);
                }
                Some(op::Op::Cas(c)) => result.cas.push(cas(ctx, c)),
            }
        }
        Ok(result)
    }

    /// Runs what had to wait for the round's write, then reports to the
    /// replica FSM.
    pub fn finish_round(&mut self, ctx: &mut ApplyCtx) {
        if let Some(index) = self.hash_at.take() {
            let _ = ctx.snap_jobs.send(SnapJob::Hash {
                shard: self.descriptor.clone(),
                index,
                snap: ctx.kv.snapshot(),
            });
        }
        if std::mem::take(&mut self.gen_snapshot) {
            let _ = ctx.snap_jobs.send(SnapJob::Generate {
                shard: self.descriptor.clone(),
                apply_state: self.apply_state,
                snap: ctx.kv.snapshot(),
            });
        }
        if let Some(install) = self.install.take() {
            self.install_snapshot(install, ctx);
        }
        if std::mem::take(&mut self.applied_in_round) || !self.exec.is_empty() {
            ctx.results.push((
                self.shard_id,
                ApplyResult {
                    apply_state: self.apply_state,
                    exec: std::mem::take(&mut self.exec),
                },
            ));
        }
    }

    fn install_snapshot(&mut self, s: SnapshotInstall, ctx: &mut ApplyCtx) {
        if s.index <= self.apply_state.applied_index {
            tracing::warn!(
                shard_id = self.shard_id,
                index = s.index,
                applied = self.apply_state.applied_index,
                "ignoring a snapshot older than the applied state"
            );
            return;
        }
        let started = std::time::Instant::now();
        let shard = s
            .data
            .shard
            .clone()
            .unwrap_or_else(|| self.descriptor.clone());
        if let Err(e) = crate::snapshot::install(
            &ctx.kv,
            &ctx.snap_mgr,
            self.replica_id,
            s.index,
            s.term,
            &s.data,
        ) {
            // The raft state already points past the old log; the restart
            // installs the snapshot again from its pending record.
            tracing::error!(shard_id = self.shard_id, index = s.index, error = %e, "installing a snapshot failed; stopping the node");
            panic!("installing a snapshot failed: {e}");
        }
        self.apply_state = ApplyState {
            applied_index: s.index,
            applied_term: s.term,
            truncated_index: s.index,
            truncated_term: s.term,
        };
        self.descriptor = shard.clone();
        self.exec.push(ExecResult::SnapshotInstalled {
            index: s.index,
            term: s.term,
            shard,
        });
        metrics::SNAPSHOTS.with_label_values(&["applied"]).inc();
        metrics::SNAPSHOT_DURATION
            .with_label_values(&["apply"])
            .observe(started.elapsed().as_secs_f64());
        tracing::info!(
            shard_id = self.shard_id,
            replica_id = self.replica_id,
            index = s.index,
            keys = s.data.keys,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "snapshot installed"
        );
    }
}

/// Applies a ConfChangeV2 to a descriptor's replicas and roles.
fn change_replicas(
    desc: &mut ShardDescriptor,
    cc: &ConfChangeV2,
    added: &[Replica],
) -> std::result::Result<(), String> {
    use ReplicaRole::*;
    let role = |r: &Replica| ReplicaRole::try_from(r.role).unwrap_or(Voter);
    if cc.leave_joint() {
        for r in desc.replicas.iter_mut() {
            match role(r) {
                IncomingVoter => r.role = Voter as i32,
                DemotingVoter => r.role = Learner as i32,
                _ => {}
            }
        }
        return Ok(());
    }
    let joint = cc.enter_joint().is_some();
    // A replica new to the shard, on the node its proposal named.
    let new_replica = |id: u64, role: ReplicaRole| -> std::result::Result<Replica, String> {
        let r = added
            .iter()
            .find(|r| r.id == id)
            .ok_or_else(|| format!("no node given for new replica {id}"))?;
        Ok(Replica {
            id,
            node_id: r.node_id,
            role: role as i32,
        })
    };
    for ch in &cc.changes {
        let id = ch.node_id;
        let pos = desc.replicas.iter().position(|r| r.id == id);
        match ch.get_change_type() {
            ConfChangeType::AddNode => {
                let new_role = if joint { IncomingVoter } else { Voter };
                match pos {
                    Some(i) => desc.replicas[i].role = new_role as i32,
                    None => desc.replicas.push(new_replica(id, new_role)?),
                }
            }
            ConfChangeType::AddLearnerNode => match pos {
                Some(i) if role(&desc.replicas[i]) == Learner => {}
                Some(i) => {
                    desc.replicas[i].role = if joint { DemotingVoter } else { Learner } as i32
                }
                None => desc.replicas.push(new_replica(id, Learner)?),
            },
            ConfChangeType::RemoveNode => match pos {
                Some(i) if joint && role(&desc.replicas[i]) != Learner => {
                    return Err(format!(
                        "voter {id} can only be removed alone, or demoted first"
                    ));
                }
                Some(i) => {
                    desc.replicas.remove(i);
                }
                None => return Err(format!("replica {id} is not a member")),
            },
        }
    }
    let mut nodes: Vec<_> = desc.replicas.iter().map(|r| r.node_id).collect();
    nodes.sort_unstable();
    if nodes.windows(2).any(|w| w[0] == w[1]) {
        return Err("two replicas of a shard cannot share a node".into());
    }
    if !desc
        .replicas
        .iter()
        .any(|r| matches!(role(r), Voter | IncomingVoter))
    {
        return Err("a shard needs at least one voter".into());
    }
    Ok(())
}

fn answer_stale(p: Proposal, ctx: &mut ApplyCtx) {
    metrics::PROPOSALS_DROPPED
        .with_label_values(&["stale"])
        .inc_by(p.callbacks.len() as u64);
    let err = || Error::StaleCommand("its log entry was replaced by a newer leader".into());
    match p.callbacks {
        ProposalCallbacks::Writes(cbs) => {
            for cb in cbs {
                ctx.answers.push(Answer::Write(cb, Err(err()), None));
            }
        }
        ProposalCallbacks::Admin(Some(cb)) => ctx.answers.push(Answer::Admin(cb, Err(err()))),
        ProposalCallbacks::Admin(None) => {}
    }
}

fn put(ctx: &mut ApplyCtx, key: Bytes, value: Option<Bytes>) {
    let cf = ctx.kv.cf(CF_DEFAULT);
    match &value {
        Some(v) => ctx.wb.put_cf(cf, &key, v),
        None => ctx.wb.delete_cf(cf, &key),
    }
    ctx.overlay.put(key, value);
}

/// Deletes `[start, end)`; an empty `end` means +inf (the last shard).
fn delete_range(ctx: &mut ApplyCtx, start: Bytes, end: Bytes) {
    if end.is_empty() {
        // Keys written earlier in this round are only in the batch: cover
        // them too.
        let cf = ctx.kv.cf(CF_DEFAULT);
        if let Some(last) = ctx.overlay.last_key_from(&start) {
            let mut upper = last.to_vec();
            upper.push(0);
            ctx.wb.delete_range_cf(cf, &start[..], &upper[..]);
        }
    }
    ctx.kv
        .delete_range(&mut ctx.wb, &start, &end)
        .unwrap_or_else(|e| panic!("apply: reading RocksDB failed: {e}"));
    ctx.overlay.delete_range(start, end);
}

fn cas(ctx: &mut ApplyCtx, c: Cas) -> CasOutcome {
    let current = match ctx.overlay.get(&c.key) {
        Lookup::Known(v) => v,
        Lookup::Unknown => ctx
            .kv
            .get(&c.key)
            .unwrap_or_else(|e| panic!("apply: reading RocksDB failed: {e}"))
            .map(Bytes::from),
    };
    let matches = match (&current, c.expected_exists) {
        (None, false) => true,
        (Some(v), true) => *v == c.expected_value,
        _ => false,
    };
    if matches {
        let new = (!c.delete).then_some(c.new_value);
        put(ctx, c.key, new);
    }
    CasOutcome {
        succeeded: matches,
        previous: current,
    }
}
