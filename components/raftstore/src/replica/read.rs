//! Linearizable reads through Raft's ReadIndex, batched per shard per round.
//!
//! ```text
//!  pending ──issue (one read_index per round)──► inflight ──ReadState{index}──► ready
//!                                                                               │ applied >= index
//!                                                                               ▼
//!                                                                      callbacks answered Ok
//! ```
//!
//! - A leader that has not yet committed an entry of its term would drop the
//!   request silently (raft-rs does), so reads stay pending until it has.
//! - An inflight batch that gets no ReadState within a few election
//!   timeouts (its heartbeat round was lost) is issued again.
//! - When leadership is lost, pending and inflight reads fail with NotLeader
//!   (reads are idempotent; the client retries). Ready reads are still served
//!   once applied: their index was confirmed by a quorum after they arrived.

use std::collections::VecDeque;

use crate::msg::ReadCallback;
use crate::{Error, Index};

struct Inflight {
    id: u64,
    issued_tick: u64,
    reads: Vec<ReadCallback>,
}

#[derive(Default)]
pub struct ReadQueue {
    pending: Vec<ReadCallback>,
    inflight: VecDeque<Inflight>,
    ready: VecDeque<(Index, Vec<ReadCallback>)>,
    next_id: u64,
}

impl ReadQueue {
    pub fn push(&mut self, cb: ReadCallback) {
        self.pending.push(cb);
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
    pub fn issue(&mut self, tick: u64) -> Option<Vec<u8>> {
        if self.pending.is_empty() {
            return None;
        }
        self.next_id += 1;
        let id = self.next_id;
        self.inflight.push_back(Inflight {
            id,
            issued_tick: tick,
            reads: std::mem::take(&mut self.pending),
        });
        Some(id.to_be_bytes().to_vec())
    }

    /// A ReadState came back for `ctx` at `index`.
    pub fn on_read_state(&mut self, ctx: &[u8], index: Index) {
        let Ok(bytes) = <[u8; 8]>::try_from(ctx) else {
            return;
        };
        let id = u64::from_be_bytes(bytes);
        if let Some(pos) = self.inflight.iter().position(|b| b.id == id) {
            let batch = self.inflight.remove(pos).unwrap();
            // Keep `ready` sorted by index: read indexes of one leader term
            // never go backwards, but a re-issued batch may come late.
            let at = self.ready.partition_point(|(i, _)| *i <= index);
            self.ready.insert(at, (index, batch.reads));
        }
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

    /// Moves inflight batches older than `timeout_ticks` back to pending.
    pub fn retry_stale(&mut self, tick: u64, timeout_ticks: u64) -> usize {
        let mut n = 0;
        while self
            .inflight
            .front()
            .is_some_and(|b| tick.saturating_sub(b.issued_tick) >= timeout_ticks)
        {
            let b = self.inflight.pop_front().unwrap();
            n += 1;
            self.pending.extend(b.reads);
        }
        n
    }

    /// Fails reads that have no confirmed index yet.
    pub fn fail_unconfirmed(&mut self, err: impl Fn() -> Error) -> usize {
        let mut n = 0;
        for cb in self.pending.drain(..) {
            n += 1;
            cb(Err(err()));
        }
        for b in self.inflight.drain(..) {
            for cb in b.reads {
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
        let mut q = ReadQueue::default();
        q.push(cb());
        q.push(cb());
        let ctx = q.issue(1).unwrap();
        assert!(q.issue(1).is_none());
        q.on_read_state(&ctx, 10);
        assert_eq!(q.serve(9), 0);
        assert_eq!(q.serve(10), 2);
        assert_eq!(*log.lock().unwrap(), vec![true, true]);
        assert!(q.is_empty());
    }

    #[test]
    fn lost_batches_are_reissued_and_unconfirmed_reads_fail_on_stepdown() {
        let (log, cb) = recorder();
        let mut q = ReadQueue::default();
        q.push(cb());
        let lost = q.issue(1).unwrap();
        assert_eq!(q.retry_stale(5, 10), 0);
        assert_eq!(q.retry_stale(11, 10), 1);
        assert!(q.has_pending());
        let ctx = q.issue(11).unwrap();
        assert_ne!(ctx, lost);
        // A late answer to the lost batch is ignored.
        q.on_read_state(&lost, 3);
        assert_eq!(q.serve(100), 0);
        q.push(cb());
        assert_eq!(
            q.fail_unconfirmed(|| Error::NotLeader {
                shard_id: 1,
                leader: None
            }),
            2
        );
        assert_eq!(*log.lock().unwrap(), vec![false, false]);
    }
}
