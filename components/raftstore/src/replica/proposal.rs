//! Proposals waiting for their entry to commit.
//!
//! Each proposal is identified by the (index, term) its entry got when it
//! was appended to the leader's log; (index, term) names a log entry
//! uniquely, so when an entry commits, the proposal at its index either has
//! the same term (its command was applied) or not (its entry was replaced by
//! a newer leader's: StaleCommand, which a client may retry). The queue is
//! ordered by index.
//!
//! StaleCommand is only ever answered from that comparison. A proposal whose
//! index is left behind any other way is answered Indeterminate: its entry
//! may still be in some replica's log and commit there (a leader re-elected
//! after its log was cut back, or a snapshot that covered the index without
//! saying which entry it holds there).
//!
//! The queue keeps `flotilla_raft_pending_proposals` itself: every proposal
//! is counted while it is in here, whichever way it leaves.

use std::collections::VecDeque;
use std::time::Instant;

use crate::msg::Proposal;
use crate::{metrics, Error, Index, Term};

#[derive(Default)]
pub struct ProposalQueue {
    queue: VecDeque<Proposal>,
}

impl ProposalQueue {
    /// Queues `p`. Earlier proposals at or past its index are answered
    /// Indeterminate.
    pub fn push(&mut self, p: Proposal) {
        if let Some(last) = self.queue.back() {
            assert!(
                (last.term, last.index) < (p.term, p.index),
                "proposal ({}, {}) after ({}, {})",
                p.term,
                p.index,
                last.term,
                last.index
            );
        }
        // A leader re-elected after its log was cut back reuses indexes of
        // its earlier term's proposals. Their entries left this log, but
        // another replica may still hold one and later lead and commit it.
        while self.queue.back().is_some_and(|last| last.index >= p.index) {
            let left = self.queue.pop_back().unwrap();
            metrics::PENDING_PROPOSALS.dec();
            metrics::PROPOSALS_DROPPED
                .with_label_values(&["indeterminate"])
                .inc_by(left.callbacks.len() as u64);
            left.callbacks.fail(|| {
                Error::Indeterminate(
                    "outcome unknown: a newer term of this leader reused its log index".into(),
                )
            });
        }
        metrics::PENDING_PROPOSALS.inc();
        self.queue.push_back(p);
    }

    /// Removes and returns the proposals with index <= `index`.
    pub fn take_upto(&mut self, index: Index) -> Vec<Proposal> {
        let n = self.queue.iter().take_while(|p| p.index <= index).count();
        metrics::PENDING_PROPOSALS.sub(n as i64);
        self.queue.drain(..n).collect()
    }

    /// When the newest proposal of `term` at or below `index` was made.
    pub fn proposed_at(&self, index: Index, term: Term) -> Option<Instant> {
        self.queue
            .iter()
            .rev()
            .find(|p| p.index <= index && p.term == term)
            .map(|p| p.proposed_at)
    }

    pub fn len(&self) -> usize {
        self.queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Answers every proposal with an error made by `err`, whose outcome is
    /// unknown (the commands may still commit through another leader), and
    /// counts the waiters that answered (a batched proposal has several).
    /// Returns that count.
    pub fn fail_all_indeterminate(&mut self, err: impl Fn() -> Error) -> usize {
        metrics::PENDING_PROPOSALS.sub(self.queue.len() as i64);
        let mut answered = 0;
        for p in self.queue.drain(..) {
            answered += p.callbacks.len();
            p.callbacks.fail(&err);
        }
        metrics::PROPOSALS_DROPPED
            .with_label_values(&["indeterminate"])
            .inc_by(answered as u64);
        answered
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::msg::ProposalCallbacks;

    type Answers = Arc<Mutex<Vec<(Index, String)>>>;

    fn proposal(index: Index, term: Term, answers: &Answers) -> Proposal {
        let answers = answers.clone();
        Proposal {
            index,
            term,
            callbacks: ProposalCallbacks::Writes(vec![Box::new(move |r| {
                let what = match r {
                    Ok(_) => "ok".to_string(),
                    Err(e) => format!("{e:?}"),
                };
                answers.lock().unwrap().push((index, what));
            })]),
            proposed_at: Instant::now(),
        }
    }

    #[test]
    fn a_reused_index_leaves_the_displaced_outcome_unknown() {
        let answers = Answers::default();
        let mut q = ProposalQueue::default();
        q.push(proposal(5, 1, &answers));
        q.push(proposal(6, 1, &answers));
        assert!(answers.lock().unwrap().is_empty());
        assert_eq!(q.len(), 2);
        // Re-elected at term 3 with its log cut back to 4: both displaced.
        q.push(proposal(5, 3, &answers));
        assert_eq!(q.len(), 1);
        let answers = answers.lock().unwrap();
        let indexes: Vec<_> = answers.iter().map(|(i, _)| *i).collect();
        assert_eq!(indexes, vec![6, 5]);
        // Another replica may still hold and commit them: never "not applied".
        assert!(
            answers.iter().all(|(_, a)| a.starts_with("Indeterminate")),
            "{answers:?}"
        );
    }

    #[test]
    fn failing_all_counts_every_waiter() {
        let answers = Answers::default();
        let mut q = ProposalQueue::default();
        let mut batched = proposal(7, 1, &answers);
        if let (ProposalCallbacks::Writes(mine), ProposalCallbacks::Writes(more)) =
            (&mut batched.callbacks, proposal(7, 1, &answers).callbacks)
        {
            mine.extend(more);
        }
        q.push(batched);
        q.push(proposal(8, 1, &answers));
        assert_eq!(
            q.fail_all_indeterminate(|| Error::Indeterminate("x".into())),
            3
        );
        assert_eq!(answers.lock().unwrap().len(), 3);
        assert!(q.is_empty());
    }
}
