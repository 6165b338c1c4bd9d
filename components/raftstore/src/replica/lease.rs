//! The leader lease: while it holds, the leader serves reads from its own
//! applied state without a network round (`ReadMode::Leader`).
//!
//! # Why it is safe
//! With check-quorum on, a voter that heard from the leader ignores vote
//! requests (other than a leader transfer's) until `election_ticks` of its
//! own ticks have passed, and a follower campaigns itself only after as many.
//! The ticker sends ticks at least `tick_interval` apart and never catches up
//! after a stall (`store::spawn_ticker`), so those ticks span at least
//! `(election_ticks - 1) * tick_interval` of real time after the message
//! arrived, hence after the leader sent it.
//!
//! A lease is renewed by a round that a quorum acknowledged: a ReadIndex
//! batch confirmed by a quorum, or an entry of the leader's term that
//! committed. It runs from when the round *started* (before any message
//! left), for `leader_lease` (configuration, at most `(election_ticks - 1)`
//! ticks; the difference is the margin for clock-rate drift between
//! nodes). No other leader can be elected before it ends.
//!
//! Three things bypass that argument, and each is closed here or by the
//! replica:
//! - A leader transfer: the transferee campaigns with a forced vote that
//!   voters grant inside their lease, and its TimeoutNow may arrive late
//!   (held in a TCP buffer across a partition, say), long after the leader
//!   gave the transfer up. So starting a transfer drops the lease for the
//!   rest of the term: the leader serves reads by ReadIndex until a new
//!   term begins (with a new leader, or with it re-elected).
//! - A membership change moves the quorum: applying one drops the lease;
//!   only rounds started afterwards renew it.
//! - A voter that restarts forgets whom it heard from. A replica loaded from
//!   disk ignores vote requests for `election_ticks` after it starts
//!   (`ReplicaFsm::on_raft_message`), as if it had just heard from a leader.
//!
//! The clock is `Instant` (monotonic, keeps running while the process is
//! stopped), so a leader paused by SIGSTOP finds its lease over when it
//! resumes.

use std::time::{Duration, Instant};

use crate::Term;

#[derive(Debug)]
pub struct Lease {
    /// Longest lease a round grants; zero turns leases off.
    max: Duration,
    valid_until: Option<Instant>,
    /// Rounds that started before this do not renew the lease.
    not_before: Option<Instant>,
    /// A leader transfer started in this term: no lease in it.
    transfer_term: Option<Term>,
}

impl Lease {
    pub fn new(max: Duration) -> Self {
        Lease {
            max,
            valid_until: None,
            not_before: None,
            transfer_term: None,
        }
    }

    /// A round of the leader of `term` that started at `started` was
    /// acknowledged by a quorum. Returns whether the lease got longer.
    pub fn renew(&mut self, started: Instant, term: Term) -> bool {
        if self.max.is_zero()
            || self.not_before.is_some_and(|nb| started < nb)
            || self.transfer_term == Some(term)
        {
            return false;
        }
        let until = started + self.max;
        if self.valid_until.is_some_and(|u| u >= until) {
            return false;
        }
        self.valid_until = Some(until);
        true
    }

    pub fn is_valid(&self, now: Instant) -> bool {
        self.valid_until.is_some_and(|u| now < u)
    }

    /// Drops the lease (leadership changed hands).
    pub fn expire(&mut self) {
        self.valid_until = None;
    }

    /// Drops the lease; only rounds that start from `now` on renew it.
    pub fn restart_at(&mut self, now: Instant) {
        self.valid_until = None;
        if self.not_before.is_none_or(|cur| cur < now) {
            self.not_before = Some(now);
        }
    }

    /// A leader transfer started in `term`: no lease for the rest of it.
    pub fn on_transfer(&mut self, term: Term) {
        self.valid_until = None;
        self.transfer_term = Some(term);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_round_grants_a_lease_from_its_start() {
        let t0 = Instant::now();
        let mut l = Lease::new(800 * MS);
        assert!(!l.is_valid(t0));
        assert!(l.renew(t0, 6));
        assert!(l.is_valid(t0 + 799 * MS));
        assert!(!l.is_valid(t0 + 800 * MS));
        // An older round does not shorten it, a newer one extends it.
        assert!(!l.renew(t0 - 10 * MS, 6));
        assert!(l.renew(t0 + 100 * MS, 6));
        assert!(l.is_valid(t0 + 850 * MS));
        l.expire();
        assert!(!l.is_valid(t0 + 850 * MS));
    }

    #[test]
    fn after_a_membership_change_only_later_rounds_renew() {
        let t0 = Instant::now();
        let mut l = Lease::new(800 * MS);
        l.renew(t0, 6);
        l.restart_at(t0 + 10 * MS);
        assert!(!l.is_valid(t0 + 20 * MS));
        assert!(!l.renew(t0 + 5 * MS, 6));
        assert!(l.renew(t0 + 10 * MS, 6));
        assert!(l.is_valid(t0 + 500 * MS));
    }

    #[test]
    fn a_transfer_ends_leases_for_the_rest_of_its_term() {
        let t0 = Instant::now();
        let mut l = Lease::new(800 * MS);
        l.renew(t0, 6);
        l.on_transfer(6);
        assert!(!l.is_valid(t0 + 20 * MS));
        assert!(!l.renew(t0 + 5000 * MS, 6));
        assert!(l.renew(t0 + 5000 * MS, 7));
        assert!(l.is_valid(t0 + 5100 * MS));
    }

    #[test]
    fn a_zero_lease_is_never_valid() {
        let t0 = Instant::now();
        let mut l = Lease::new(Duration::ZERO);
        assert!(!l.renew(t0, 6));
        assert!(!l.is_valid(t0));
    }
}
