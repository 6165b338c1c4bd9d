//! One shard's apply state machine.

use std::collections::VecDeque;

use bytes::Bytes;
use crossbeam_channel::{Receiver, TryRecvError};
use flotilla_batch_system::{Fsm, HandleResult};
use flotilla_proto::local::ApplyState;
use flotilla_proto::meta::ShardDescriptor;
use flotilla_proto::raftcmd::{op, Cas, RaftCommand, WriteCommand};
use flotilla_proto::Message as _;
use flotilla_storage::CF_DEFAULT;
use raft::eraftpb::{Entry, EntryType};

use super::overlay::Lookup;
use super::poller::ApplyCtx;
use crate::msg::{write_spans, ApplyMsg, ApplyResult, CasOutcome, Proposal, WriteResult};
use crate::{metrics, Error, ReplicaId, Result, ShardId};

pub struct ApplyFsm {
    shard_id: ShardId,
    replica_id: ReplicaId,
    descriptor: ShardDescriptor,
    apply_state: ApplyState,
    receiver: Receiver<ApplyMsg>,
    stopped: bool,
}

impl Fsm for ApplyFsm {
    type Message = ApplyMsg;
    fn is_stopped(&self) -> bool {
        self.stopped
    }
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
        }
    }

    /// Applies every task in the mailbox into the round's write batch.
    pub fn handle(&mut self, ctx: &mut ApplyCtx) -> HandleResult {
        let mut applied_any = false;
        loop {
            let task = match self.receiver.try_recv() {
                Ok(ApplyMsg::Apply(task)) => task,
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    self.stopped = true;
                    break;
                }
            };
            metrics::APPLY_WAIT.observe(task.sent_at.elapsed().as_secs_f64());
            let mut proposals = VecDeque::from(task.proposals);
            for entry in task.entries {
                self.apply_entry(entry, &mut proposals, ctx);
                applied_any = true;
            }
            // Every proposal handed over has an index within the entries.
            for p in proposals {
                answer_stale(p, ctx);
            }
        }
        if applied_any {
            ctx.kv
                .put_apply_state(&mut ctx.wb, self.shard_id, &self.apply_state);
            ctx.results.push((
                self.shard_id,
                ApplyResult {
                    apply_state: self.apply_state,
                },
            ));
        }
        HandleResult::drained()
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
        let results = match entry.get_entry_type() {
            EntryType::EntryNormal if !entry.data.is_empty() => {
                Some(self.exec_command(&entry, ctx))
            }
            EntryType::EntryNormal => None,
            EntryType::EntryConfChange | EntryType::EntryConfChangeV2 => {
                tracing::warn!(
                    shard_id = self.shard_id,
                    replica_id = self.replica_id,
                    index = entry.index,
                    "membership changes are not supported yet; entry skipped"
                );
                None
            }
        };
        self.apply_state.applied_index = entry.index;
        self.apply_state.applied_term = entry.term;
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
            let results = results.clone().unwrap_or_default();
            assert_eq!(
                results.len(),
                p.callbacks.len(),
                "shard {}: entry {} carries {} commands for {} callbacks",
                self.shard_id,
                entry.index,
                results.len(),
                p.callbacks.len()
            );
            for (cb, r) in p.callbacks.into_iter().zip(results) {
                ctx.answers.push((cb, r, Some(p.proposed_at)));
            }
        }
    }

    fn exec_command(&mut self, entry: &Entry, ctx: &mut ApplyCtx) -> Vec<Result<WriteResult>> {
        let cmd = RaftCommand::decode(&entry.data[..]).unwrap_or_else(|e| {
            panic!(
                "shard {} entry {}: undecodable command: {e}",
                self.shard_id, entry.index
            )
        });
        let version = cmd.header.and_then(|h| h.epoch).unwrap_or_default().version;
        if version != self.descriptor.epoch().version {
            let err = Error::EpochNotMatch {
                shard_id: self.shard_id,
                current: vec![self.descriptor.clone()],
            };
            return cmd.writes.iter().map(|_| Err(err.clone())).collect();
        }
        cmd.writes
            .into_iter()
            .map(|w| self.exec_write(w, ctx))
            .collect()
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
}

fn answer_stale(p: Proposal, ctx: &mut ApplyCtx) {
    metrics::PROPOSALS_DROPPED
        .with_label_values(&["stale"])
        .inc_by(p.callbacks.len() as u64);
    for cb in p.callbacks {
        ctx.answers.push((
            cb,
            Err(Error::StaleCommand(
                "its log entry was replaced by a newer leader".into(),
            )),
            None,
        ));
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
    let cf = ctx.kv.cf(CF_DEFAULT);
    if end.is_empty() {
        // RocksDB needs an upper bound: one past the greatest key present.
        let (last_db, _) = ctx
            .kv
            .scan(&start, &[], 1, true)
            .unwrap_or_else(|e| panic!("apply: reading RocksDB failed: {e}"));
        let last = last_db
            .into_iter()
            .map(|(k, _)| Bytes::from(k))
            .chain(ctx.overlay.last_key_from(&start).cloned())
            .max();
        if let Some(mut upper) = last.map(|k| k.to_vec()) {
            upper.push(0);
            ctx.wb.delete_range_cf(cf, &start[..], &upper[..]);
        }
    } else if start < end {
        ctx.wb.delete_range_cf(cf, &start[..], &end[..]);
    }
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
