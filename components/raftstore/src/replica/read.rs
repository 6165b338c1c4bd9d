//! Reads of a shard: the queue of reads waiting for a confirmed index, and
//! how they reach it.
//!
//! ```text
//!  ReadMode::Leader, lease valid ───────────────────────────────────► ready(commit index)
//!  ReadMode::Leader / LeaderReadIndex / Follower:                                │
//!    pending ──issue (one read_index per round)──► inflight ──ReadState{index}──►│
//!                                                                                ▼ applied >= index
//!  ReadMode::Stale: answered at once from the applied state        callbacks answered Ok
//! ```
//!
//! - On the leader, a batch is confirmed by a heartbeat round (raft's Safe
//!   ReadIndex); a leader that has not yet committed an entry of its term
//!   would drop the request, so reads stay pending until it has. A confirmed
//!   batch also renews the leader's lease (`lease`).
//! - On a follower, raft forwards the batch to the leader and the answer
//!   comes back as a ReadState; the follower serves it once it has applied
//!   that far. Every read that began after a write was acknowledged sees it.
//! - A batch that gets no answer (its heartbeat round or the forwarded
//!   request was lost, or a new leader dropped it) is sent again with the
//!   same context every `resend_ticks`; the first answer wins. When the
//!   leader changes, every unanswered batch is sent again at once, through
//!   the new leader. When no leader is known, unanswered reads fail with
//!   NotLeader (the client retries elsewhere), and reads that wait longer
//!   than `give_up_ticks` fail the same way, so nothing hangs.
//! - Ready reads are served once applied, whatever happens to leadership:
//!   their index was confirmed after they arrived.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use crate::msg::ReadCallback;
use crate::{Error, Index, ReplicaId, Term};

struct Inflight {
    id: u64,
    /// When the batch was first sent; a confirmation on the leader renews
    /// the lease from here.
    issued_at: Instant,
    first_tick: u64,
    sent_tick: u64,
    /// The term, when the batch was issued by the leader of that term.
    leader_term: Option<Term>,
    reads: Vec<ReadCallback>,
}

/// A read index's context: `replica id ‖ nonce ‖ batch id`. raft matches
/// pending read indexes and heartbeat acknowledgements by context alone, so
/// a context must never be reused: not by another replica, and not by this
/// replica after a restart (the nonce differs per start), or an old
/// confirmation could answer a new batch whose reads arrived later.
const CTX_LEN: usize = 24;

/// What a confirmation says about the batch it confirms.
pub struct Confirmed {
    pub issued_at: Instant,
    pub leader_term: Option<Term>,
}

pub struct ReadQueue {
    /// The first 16 bytes of every context this queue issues.
    prefix: [u8; 16],
    pending: Vec<ReadCallback>,
    /// The tick the oldest pending read arrived at.
    pending_since: u64,
    inflight: VecDeque<Inflight>,
    ready: VecDeque<(Index, Vec<ReadCallback>)>,
    next_id: u64,
}

impl ReadQueue {
    pub fn new(replica_id: ReplicaId) -> Self {
        static STARTS: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let nonce = nanos ^ STARTS.fetch_add(1, Ordering::Relaxed).rotate_left(48);
        let mut prefix = [0u8; 16];
        prefix[..8].copy_from_slice(&replica_id.to_be_bytes());
        prefix[8..].copy_from_slice(&nonce.to_be_bytes());
        ReadQueue {
            prefix,
            pending: Vec::new(),
            pending_since: 0,
            inflight: VecDeque::new(),
            ready: VecDeque::new(),
            next_id: 0,
        }
    }

    fn ctx_of(&self, id: u64) -> Vec<u8> {
        let mut ctx = Vec::with_capacity(CTX_LEN);
        ctx.extend_from_slice(&self.prefix);
        ctx.extend_from_slice(&id.to_be_bytes());
        ctx
    }

    pub fn push(&mut self, cb: ReadCallback, tick: u64) {
        if self.pending.is_empty() {
            self.pending_since = tick;
        }
        self.pending.push(cb);
    }

    /// A read whose index is already known (a lease read at the commit
    /// index): served once applied reaches it.
    pub fn push_ready(&mut self, index: Index, cb: ReadCallback) {
        self.insert_ready(index, vec![cb]);
    }

    /// Keeps `ready` sorted by index: a batch answered late (or by an older
    /// leader) may carry a smaller index than one already ready. Reads at
    /// the newest index join its group.
    fn insert_ready(&mut self, index: Index, mut reads: Vec<ReadCallback>) {
        match self.ready.back_mut() {
            Some((i, group)) if *i == index => group.append(&mut reads),
            _ => {
                let at = self.ready.partition_point(|(i, _)| *i <= index);
                self.ready.insert(at, (index, reads));
            }
        }
    }

    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    pub fn len(&self) -> usize {
        self.pending.len()
            + self.inflight.iter().map(|b| b.reads.len()).sum::<usize>()
            + self.ready.iter().map(|(_, r)| r.len()).sum::<usize>()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Moves the pending reads into a new inflight batch; returns the context
    /// to pass to `read_index`.
    pub fn issue(&mut self, tick: u64, now: Instant, leader_term: Option<Term>) -> Option<Vec<u8>> {
        if self.pending.is_empty() {
            return None;
        }
        self.next_id += 1;
        let id = self.next_id;
        self.inflight.push_back(Inflight {
            id,
            issued_at: now,
            first_tick: self.pending_since,
            sent_tick: tick,
            leader_term,
            reads: std::mem::take(&mut self.pending),
        });
        Some(self.ctx_of(id))
    }

    /// A ReadState came back for `ctx` at `index`. Returns what the batch
    /// was, if it was still waiting.
    pub fn on_read_state(&mut self, ctx: &[u8], index: Index) -> Option<Confirmed> {
        if ctx.len() != CTX_LEN || ctx[..16] != self.prefix {
            return None;
        }
        let id = u64::from_be_bytes(<[u8; 8]>::try_from(&ctx[16..]).ok()?);
        let pos = self.inflight.iter().position(|b| b.id == id)?;
        let batch = self.inflight.remove(pos).unwrap();
        self.insert_ready(index, batch.reads);
        Some(Confirmed {
            issued_at: batch.issued_at,
            leader_term: batch.leader_term,
        })
    }

    /// Answers every ready read whose index is applied.
    pub fn serve(&mut self, applied: Index) -> usize {
        let mut served = 0;
        while self.ready.front().is_some_and(|(i, _)| *i <= applied) {
            let (_, reads) = self.ready.pop_front().unwrap();
            served += reads.len();
            for cb in reads {
                cb(Ok(()));
            }
        }
        served
    }

    /// The contexts of unanswered batches last sent `resend_ticks` or more
    /// ago (all of them when `resend_ticks` is 0), marked as sent now.
    pub fn due_for_resend(&mut self, tick: u64, resend_ticks: u64) -> Vec<Vec<u8>> {
        let mut due = Vec::new();
        for b in self.inflight.iter_mut() {
            if tick.saturating_sub(b.sent_tick) >= resend_ticks {
                b.sent_tick = tick;
                due.push(b.id);
            }
        }
        due.into_iter().map(|id| self.ctx_of(id)).collect()
    }

    /// Fails the reads without a confirmed index that arrived
    /// `give_up_ticks` or more ago.
    pub fn fail_older_than(
        &mut self,
        tick: u64,
        give_up_ticks: u64,
        err: impl Fn() -> Error,
    ) -> usize {
        let old = |since: u64| tick.saturating_sub(since) >= give_up_ticks;
        let mut n = 0;
        if !self.pending.is_empty() && old(self.pending_since) {
            for cb in self.pending.drain(..) {
                n += 1;
                cb(Err(err()));
            }
        }
        while self.inflight.front().is_some_and(|b| old(b.first_tick)) {
            for cb in self.inflight.pop_front().unwrap().reads {
                n += 1;
                cb(Err(err()));
            }
        }
        n
    }

    /// Fails reads that have no confirmed index yet.
    pub fn fail_unconfirmed(&mut self, err: impl Fn() -> Error) -> usize {
        self.fail_older_than(u64::MAX, 0, err)
    }

    /// Fails every read, confirmed or not.
    pub fn fail_all(&mut self, err: impl Fn() -> Error) -> usize {
        let mut n = self.fail_unconfirmed(&err);
        for (_, reads) in self.ready.drain(..) {
            for cb in reads {
                n += 1;
                cb(Err(err()));
            }
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    fn recorder() -> (Arc<Mutex<Vec<bool>>>, impl Fn() -> ReadCallback) {
        let log = Arc::new(Mutex::new(Vec::new()));
        let l = log.clone();
        (log, move || {
            let l = l.clone();
            Box::new(move |r: crate::Result<()>| l.lock().unwrap().push(r.is_ok()))
        })
    }

    #[test]
    fn reads_are_served_once_applied_reaches_their_index() {
        let (log, cb) = recorder();
        let mut q = ReadQueue::new(3);
        q.push(cb(), 1);
        q.push(cb(), 1);
        let now = Instant::now();
        let ctx = q.issue(1, now, Some(7)).unwrap();
        assert!(q.issue(1, now, Some(7)).is_none());
        let c = q.on_read_state(&ctx, 10).unwrap();
        assert_eq!((c.issued_at, c.leader_term), (now, Some(7)));
        // A lease read at a smaller index is served first.
        q.push_ready(8, cb());
        assert_eq!(q.serve(7), 0);
        assert_eq!(q.serve(9), 1);
        assert_eq!(q.serve(10), 2);
        assert_eq!(*log.lock().unwrap(), vec![true, true, true]);
        assert!(q.is_empty());
    }

    #[test]
    fn unanswered_batches_are_resent_with_their_context_then_given_up() {
        let (log, cb) = recorder();
        let mut q = ReadQueue::new(3);
        q.push(cb(), 1);
        let ctx = q.issue(1, Instant::now(), None).unwrap();
        assert!(q.due_for_resend(3, 4).is_empty());
        assert_eq!(q.due_for_resend(5, 4), vec![ctx.clone()]);
        assert!(q.due_for_resend(6, 4).is_empty());
        // A leader change resends everything at once.
        assert_eq!(q.due_for_resend(6, 0), vec![ctx.clone()]);
        // Another queue's context (another replica, or this one before a
        // restart) is not ours.
        assert!(ReadQueue::new(3).on_read_state(&ctx, 3).is_none());
        // An answer to any sending is accepted once.
        assert!(q.on_read_state(&ctx, 3).is_some());
        assert!(q.on_read_state(&ctx, 3).is_none());
        assert_eq!(q.serve(3), 1);

        q.push(cb(), 10);
        q.issue(10, Instant::now(), None).unwrap();
        q.push(cb(), 12);
        let not_leader = || Error::NotLeader {
            shard_id: 1,
            leader: None,
        };
        assert_eq!(q.fail_older_than(19, 10, not_leader), 0);
        assert_eq!(q.fail_older_than(20, 10, not_leader), 1);
        q.push(cb(), 21);
        assert_eq!(q.fail_unconfirmed(not_leader), 2);
        assert!(q.is_empty());
        assert_eq!(*log.lock().unwrap(), vec![true, false, false, false]);
    }
}
