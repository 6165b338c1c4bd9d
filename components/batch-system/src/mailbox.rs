//! A mailbox: the sending half of an FSM's channel plus its ownership state.

use std::sync::Arc;

use crossbeam_channel::Sender;

use crate::fsm::{Fsm, FsmState};

/// Puts an FSM that just became runnable on the poll queue.
pub trait FsmScheduler: Clone + Send + 'static {
    type Fsm: Fsm;
    /// Queues `fsm`, which is in the NOTIFIED state, for a poller.
    fn schedule(&self, fsm: Box<Self::Fsm>, mailbox: BasicMailbox<Self::Fsm>);
}

/// Why a message could not be delivered. Every variant hands the message back
/// so a caller can answer a callback it carries.
#[derive(Debug, PartialEq, Eq)]
pub enum MailboxError<M> {
    /// The mailbox is past its soft capacity.
    Full(M),
    /// The FSM is gone.
    Disconnected(M),
}

/// The sending side of one FSM. Cheap to clone.
pub struct BasicMailbox<N: Fsm> {
    sender: Sender<N::Message>,
    state: Arc<FsmState<N>>,
}

impl<N: Fsm> Clone for BasicMailbox<N> {
    fn clone(&self) -> Self {
        BasicMailbox {
            sender: self.sender.clone(),
            state: self.state.clone(),
        }
    }
}

impl<N: Fsm> BasicMailbox<N> {
    /// Wraps an FSM and the sender of the channel whose receiver it owns.
    pub fn new(sender: Sender<N::Message>, fsm: Box<N>) -> Self {
        BasicMailbox {
            sender,
            state: Arc::new(FsmState::new(fsm)),
        }
    }

    /// Messages waiting in the mailbox.
    pub fn len(&self) -> usize {
        self.sender.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sender.is_empty()
    }

    /// Whether the mailbox was closed.
    pub fn is_closed(&self) -> bool {
        self.state.is_dropped()
    }

    /// Sends unless the mailbox holds `capacity` messages or more.
    pub fn try_send<S: FsmScheduler<Fsm = N>>(
        &self,
        msg: N::Message,
        capacity: usize,
        scheduler: &S,
    ) -> Result<(), MailboxError<N::Message>> {
        if self.sender.len() >= capacity {
            return Err(MailboxError::Full(msg));
        }
        self.force_send(msg, scheduler)
    }

    /// Sends regardless of the soft capacity.
    pub fn force_send<S: FsmScheduler<Fsm = N>>(
        &self,
        msg: N::Message,
        scheduler: &S,
    ) -> Result<(), MailboxError<N::Message>> {
        if self.state.is_dropped() {
            return Err(MailboxError::Disconnected(msg));
        }
        self.sender
            .send(msg)
            .map_err(|e| MailboxError::Disconnected(e.into_inner()))?;
        self.notify(scheduler);
        Ok(())
    }

    /// Schedules the FSM if it is idle.
    pub(crate) fn notify<S: FsmScheduler<Fsm = N>>(&self, scheduler: &S) {
        if let Some(fsm) = self.state.take_fsm() {
            scheduler.schedule(fsm, self.clone());
        }
    }

    /// Returns the FSM after a round; reschedules it if a message arrived
    /// since the handler last looked (`checked_len` messages were left then).
    pub(crate) fn release<S: FsmScheduler<Fsm = N>>(
        &self,
        fsm: Box<N>,
        checked_len: usize,
        scheduler: &S,
    ) {
        self.state.release(fsm);
        if self.len() != checked_len {
            self.notify(scheduler);
        }
    }

    /// Closes the mailbox: the FSM is dropped now if idle, or by the poller
    /// that holds it when it releases it.
    pub fn close(&self) {
        self.state.clear();
    }
}
