//! The FSM trait and the ownership state that makes an FSM single-threaded.
//!
//! An [`FsmState`] is shared by a mailbox's senders. It holds the boxed FSM
//! while the FSM is idle, and a status word:
//!
//! ```text
//!   IDLE ──take_fsm (CAS)──► NOTIFIED ──release──► IDLE
//!     │                          │
//!     └──────── clear ──────────►└──► DROPPED (final: released FSMs are dropped)
//! ```
//!
//! Only the thread whose compare-and-swap moved IDLE to NOTIFIED gets the box,
//! so at most one poller holds an FSM at any time.

use std::sync::atomic::{AtomicUsize, Ordering};

use parking_lot::Mutex;

/// A state machine driven by the poller pool.
///
/// The FSM owns the receiving end of its mailbox and drains it in
/// [`crate::PollHandler::handle_normal`]. Dropping the FSM disconnects the
/// mailbox, so senders learn it is gone.
pub trait Fsm: Send + 'static {
    /// What its mailbox carries.
    type Message: Send + 'static;

    /// True once the FSM has finished for good. The poller then drops it
    /// (closing its mailbox) instead of releasing it back to the mailbox.
    fn is_stopped(&self) -> bool;
}

const NOTIFIED: usize = 0;
const IDLE: usize = 1;
const DROPPED: usize = 2;

pub(crate) struct FsmState<N> {
    status: AtomicUsize,
    data: Mutex<Option<Box<N>>>,
}

impl<N> FsmState<N> {
    pub(crate) fn new(fsm: Box<N>) -> Self {
        FsmState {
            status: AtomicUsize::new(IDLE),
            data: Mutex::new(Some(fsm)),
        }
    }

    /// Takes the FSM if it is idle. Returns `None` if it is already scheduled,
    /// held by a poller, or dropped.
    pub(crate) fn take_fsm(&self) -> Option<Box<N>> {
        if self
            .status
            .compare_exchange(IDLE, NOTIFIED, Ordering::SeqCst, Ordering::SeqCst)
            .is_err()
        {
            return None;
        }
        let fsm = self.data.lock().take();
        assert!(fsm.is_some(), "an idle FsmState must hold its FSM");
        fsm
    }

    /// Gives the FSM back after a poll round. If the mailbox was closed in the
    /// meantime, the FSM is dropped here.
    pub(crate) fn release(&self, fsm: Box<N>) {
        *self.data.lock() = Some(fsm);
        if self
            .status
            .compare_exchange(NOTIFIED, IDLE, Ordering::SeqCst, Ordering::SeqCst)
            .is_err()
        {
            // DROPPED: nobody will ever take it again.
            self.data.lock().take();
        }
    }

    /// Marks the state dropped and drops the FSM if it is idle; a poller
    /// holding it drops it on release.
    pub(crate) fn clear(&self) {
        if self.status.swap(DROPPED, Ordering::SeqCst) == IDLE {
            self.data.lock().take();
        }
    }

    pub(crate) fn is_dropped(&self) -> bool {
        self.status.load(Ordering::SeqCst) == DROPPED
    }
}
