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
use flotilla_storage::{data_cf, CF_CLUSTER};
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
    /// The shard the last split applied here created.
    split_off: Option<ShardDescriptor>,
    /// Written this round (reported with the round's result).
    written_bytes: u64,
    written_keys: u64,
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
            split_off: None,
            written_bytes: 0,
            written_keys: 0,
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
        // Every proposal handed over has an index within the entries, or
        // comes after this replica's removal: the remaining members may
        // still commit those, so their outcome is unknown here.
        for p in proposals {
            answer_unknown(p, "this replica was removed from the shard", ctx);
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
            if p.index < entry.index {
                // Its entry never reached this FSM: a snapshot covered its
                // index, and whether the snapshot holds its command or a
                // newer leader's entry is not known here.
                answer_unknown(p, "its log entry was covered by a snapshot", ctx);
                continue;
            }
            if p.term != entry.term {
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
        // Decoded from the entry's `Bytes`: keys and values are slices of
        // it, not copies (they only live until the batch is written).
        let cmd = RaftCommand::decode(entry.data.clone()).unwrap_or_else(|e| {
            panic!(
                "shard {} entry {}: undecodable command: {e}",
                self.shard_id, entry.index
            )
        });
        let epoch = cmd.header.and_then(|h| h.epoch).unwrap_or_default();
        if let Some(admin) = cmd.admin.and_then(|a| a.cmd) {
            return self.exec_admin(admin, epoch, entry.index, ctx);
        }
        if epoch.version != self.descriptor.epoch().version {
            let err = Error::epoch_not_match(&self.descriptor, self.split_off.as_ref());
            return EntryOutcome::Writes(cmd.writes.iter().map(|_| Err(err.clone())).collect());
        }
        EntryOutcome::Writes(
            cmd.writes
                .into_iter()
                .map(|w| self.exec_write(w, ctx))
                .collect(),
        )
    }

    fn exec_admin(
        &mut self,
        admin: admin_command::Cmd,
        epoch: flotilla_proto::meta::Epoch,
        index: Index,
        ctx: &mut ApplyCtx,
    ) -> EntryOutcome {
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
            admin_command::Cmd::Split(s) => {
                let outcome = self.exec_split(s, epoch, index, ctx);
                let result = match outcome {
                    EntryOutcome::Rejected(_) => "rejected",
                    _ => "applied",
                };
                metrics::SPLITS.with_label_values(&[result]).inc();
                return outcome;
            }
        }
        EntryOutcome::Admin
    }

    /// Cuts the shard in two (see `raftcmd.Split`). Refusals are
    /// deterministic. The new shard's states go in the same write batch as
    /// the shrunk descriptor, so a crash leaves both or neither; the raft
    /// side creates the new replica once it hears of the result.
    fn exec_split(
        &mut self,
        s: flotilla_proto::raftcmd::Split,
        epoch: flotilla_proto::meta::Epoch,
        index: Index,
        ctx: &mut ApplyCtx,
    ) -> EntryOutcome {
        let d = &self.descriptor;
        if epoch != d.epoch() {
            return EntryOutcome::Rejected(format!(
                "split proposed at epoch {}/{} but the shard is at {}/{}",
                epoch.conf_ver,
                epoch.version,
                d.epoch().conf_ver,
                d.epoch().version
            ));
        }
        let key = s.split_key;
        if key <= d.start_key || (!d.end_key.is_empty() && key >= d.end_key) {
            return EntryOutcome::Rejected(format!(
                "split key {} is not strictly inside the shard's range",
                crate::fmt_key(&key)
            ));
        }
        if s.new_replica_ids.len() != d.replicas.len()
            || d.replicas.iter().any(|r| {
                r.role == ReplicaRole::IncomingVoter as i32
                    || r.role == ReplicaRole::DemotingVoter as i32
            })
        {
            return EntryOutcome::Rejected(
                "split needs one new replica id per replica and no membership change in progress"
                    .into(),
            );
        }
        let mut version = d.epoch();
        version.version += 1;
        let right = ShardDescriptor {
            id: s.new_shard_id,
            start_key: key.clone(),
            end_key: d.end_key.clone(),
            epoch: Some(version),
            replicas: d
                .replicas
                .iter()
                .zip(&s.new_replica_ids)
                .map(|(r, id)| Replica {
                    id: *id,
                    node_id: r.node_id,
                    role: r.role,
                })
                .collect(),
        };
        let mut left = d.clone();
        left.end_key = key;
        left.epoch = Some(version);
        let mine = d
            .replicas
            .iter()
            .position(|r| r.id == self.replica_id)
            .map(|i| s.new_replica_ids[i]);
        let existing = ctx
            .kv
            .shard_state(right.id)
            .unwrap_or_else(|e| panic!("apply: reading RocksDB failed: {e}"));
        let right_replica = match (&existing, mine) {
            (None, Some(id)) => {
                put_normal_state(ctx, &right, id);
                ctx.kv.put_apply_state(
                    &mut ctx.wb,
                    right.id,
                    &flotilla_storage::replica_storage::initial_apply_state(),
                );
                Some(id)
            }
            (Some(s), _) if s.state != ShardState::Tombstone as i32 => {
                // Cannot happen: snapshots overlapping a local shard are
                // refused, so the new shard has no data here yet. Keep
                // whatever is there rather than guess.
                tracing::error!(
                    shard_id = self.shard_id,
                    new_shard_id = right.id,
                    "split: the new shard already has state on this node; not creating it"
                );
                None
            }
            _ => {
                // The new shard's replica here was already removed (a
                // tombstone) while this replica lagged behind the split:
                // nobody here owns the right half's data any more.
                tracing::info!(
                    shard_id = self.shard_id,
                    new_shard_id = right.id,
                    state = ?existing.map(|s| s.state),
                    "split: the new shard's replica on this node is gone; dropping its data"
                );
                // Through the round's overlay: writes to that half earlier
                // in this round are only in the batch, and with an open end
                // the database alone does not say how far the range goes.
                delete_range(
                    ctx,
                    data_cf(self.shard_id),
                    right.start_key.clone(),
                    right.end_key.clone(),
                );
                None
            }
        };
        put_normal_state(ctx, &left, self.replica_id);
        tracing::info!(
            shard_id = self.shard_id,
            replica_id = self.replica_id,
            index,
            new_shard_id = right.id,
            split_key = %crate::fmt_key(&right.start_key),
            version = version.version,
            "shard split"
        );
        self.descriptor = left.clone();
        self.split_off = Some(right.clone());
        ctx.sync = true;
        self.exec.push(ExecResult::Split {
            left,
            right,
            right_replica,
        });
        EntryOutcome::Admin
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
        put_normal_state(ctx, &desc, self.replica_id);
        self.removed = desc.replica(self.replica_id).is_none();
        self.descriptor = desc.clone();
        ctx.sync = true;
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
        let cf = data_cf(self.shard_id);
        for o in w.ops {
            match o.op {
                None => {}
                Some(op::Op::Put(p)) => {
                    self.written_bytes += (p.key.len() + p.value.len()) as u64;
                    self.written_keys += 1;
                    put(ctx, cf, p.key, Some(p.value))
                }
                Some(op::Op::Delete(d)) => {
                    self.written_bytes += d.key.len() as u64;
                    put(ctx, cf, d.key, None)
                }
                Some(op::Op::DeleteRange(r)) => {
                    let end = if r.end_key.is_empty() {
                        self.descriptor.end_key.clone()
                    } else {
                        r.end_key
                    };
                    delete_range(ctx, cf, r.start_key, end);
                }
                Some(op::Op::Cas(c)) => {
                    self.written_bytes += (c.key.len() + c.new_value.len()) as u64;
                    result.cas.push(cas(ctx, cf, c))
                }
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
                    written_bytes: std::mem::take(&mut self.written_bytes),
                    written_keys: std::mem::take(&mut self.written_keys),
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
                    // Already a voter: it stays one in both configurations
                    // (raft-rs treats this as no change).
                    Some(i) if role(&desc.replicas[i]) == Voter => {}
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

/// Stages `shard` as the descriptor of the live replica `replica_id` here.
fn put_normal_state(ctx: &mut ApplyCtx, shard: &ShardDescriptor, replica_id: ReplicaId) {
    ctx.kv.put_shard_state(
        &mut ctx.wb,
        shard.id,
        &ShardLocalState {
            shard: Some(shard.clone()),
            state: ShardState::Normal as i32,
            replica_id,
        },
    );
}

/// Answers a proposal whose index committed with another term: its command
/// was never applied and can be retried.
fn answer_stale(p: Proposal, ctx: &mut ApplyCtx) {
    let err = || Error::StaleCommand("its log entry was replaced by a newer leader".into());
    answer_err(p, "stale", err, ctx);
}

/// Answers a proposal whose command may or may not have been applied.
fn answer_unknown(p: Proposal, why: &str, ctx: &mut ApplyCtx) {
    let err = || Error::Indeterminate(format!("outcome unknown: {why}"));
    answer_err(p, "indeterminate", err, ctx);
}

fn answer_err(p: Proposal, label: &str, err: impl Fn() -> Error, ctx: &mut ApplyCtx) {
    metrics::PROPOSALS_DROPPED
        .with_label_values(&[label])
        .inc_by(p.callbacks.len() as u64);
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

impl ApplyCtx {
    /// The round's staged writes to column family `cf`.
    fn overlay(&mut self, cf: &str) -> &mut super::overlay::Overlay {
        if cf == CF_CLUSTER {
            &mut self.cluster_overlay
        } else {
            &mut self.overlay
        }
    }
}

fn put(ctx: &mut ApplyCtx, cf_name: &str, key: Bytes, value: Option<Bytes>) {
    let cf = ctx.kv.cf(cf_name);
    match &value {
        Some(v) => ctx.wb.put_cf(cf, &key, v),
        None => ctx.wb.delete_cf(cf, &key),
    }
    ctx.overlay(cf_name).put(key, value);
}

/// Deletes `[start, end)`; an empty `end` means +inf (the last shard).
fn delete_range(ctx: &mut ApplyCtx, cf_name: &str, start: Bytes, end: Bytes) {
    if end.is_empty() {
        // Keys written earlier in this round are only in the batch: cover
        // them too.
        if let Some(last) = ctx.overlay(cf_name).last_key_from(&start) {
            let mut upper = last.to_vec();
            upper.push(0);
            let cf = ctx.kv.cf(cf_name);
            ctx.wb.delete_range_cf(cf, &start[..], &upper[..]);
        }
    }
    ctx.kv
        .delete_range(&mut ctx.wb, cf_name, &start, &end)
        .unwrap_or_else(|e| panic!("apply: reading RocksDB failed: {e}"));
    ctx.overlay(cf_name).delete_range(start, end);
}

fn cas(ctx: &mut ApplyCtx, cf_name: &str, c: Cas) -> CasOutcome {
    let current = match ctx.overlay(cf_name).get(&c.key) {
        Lookup::Known(v) => v,
        Lookup::Unknown => ctx
            .kv
            .get(cf_name, &c.key)
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
        put(ctx, cf_name, c.key, new);
    }
    CasOutcome {
        succeeded: matches,
        previous: current,
    }
}
