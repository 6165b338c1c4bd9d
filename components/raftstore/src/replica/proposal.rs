//! Proposals waiting for their entry to commit.
//!
//! Each proposal is identified by the (index, term) its entry got when it
//! was appended to the leader's log; (index, term) names a log entry
//! uniquely, so when an entry commits, the proposal at its index either has
//! the same term (its command was applied) or not (its entry was replaced by
//! a newer leader's: StaleCommand). The queue is ordered by index.

use std::collections::VecDeque;
use std::time::Instant;

use crate::msg::Proposal;
use crate::{Error, Index, Term};

#[derive(Default)]
pub struct ProposalQueue {
    queue: VecDeque<Proposal>,
}

impl ProposalQueue {
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
        // A new leader may reuse indexes of proposals that a previous term
        // left behind; those can no longer commit with their own term.
        while self.queue.back().is_some_and(|last| last.index >= p.index) {
            let stale = self.queue.pop_back().unwrap();
            stale
                .callbacks
                .fail(|| Error::StaleCommand("a newer leader term reused its log index".into()));
        }
        self.queue.push_back(p);
    }

    /// Removes and returns the proposals with index <= `index`.
    pub fn take_upto(&mut self, index: Index) -> Vec<Proposal> {
        let n = self.queue.iter().take_while(|p| p.index <= index).count();
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

    /// Answers every proposal with an error made by `err`.
    pub fn fail_all(&mut self, err: impl Fn() -> Error) {
        for p in self.queue.drain(..) {
            p.callbacks.fail(&err);
        }
    }
}
