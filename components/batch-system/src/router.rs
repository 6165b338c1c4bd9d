//! Address → mailbox, plus the one control mailbox.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use parking_lot::RwLock;

use crate::batch::{ControlScheduler, NormalScheduler};
use crate::fsm::Fsm;
use crate::mailbox::{BasicMailbox, MailboxError};

/// Why [`Router::send`] did not deliver. The message is handed back.
#[derive(Debug, PartialEq, Eq)]
pub enum SendError<M> {
    /// No FSM is registered at that address.
    NotFound(M),
    /// The mailbox is past its soft capacity (the FSM is overloaded).
    Full(M),
    /// The FSM was closed, or the system is shutting down.
    Disconnected(M),
}

impl<M> SendError<M> {
    pub fn into_inner(self) -> M {
        match self {
            SendError::NotFound(m) | SendError::Full(m) | SendError::Disconnected(m) => m,
        }
    }
}

impl<M> From<MailboxError<M>> for SendError<M> {
    fn from(e: MailboxError<M>) -> Self {
        match e {
            MailboxError::Full(m) => SendError::Full(m),
            MailboxError::Disconnected(m) => SendError::Disconnected(m),
        }
    }
}

/// Routes messages to FSMs by a `u64` address. Cheap to clone; all clones
/// share one map.
pub struct Router<N: Fsm, C: Fsm> {
    normals: Arc<RwLock<HashMap<u64, BasicMailbox<N>>>>,
    control: BasicMailbox<C>,
    pub(crate) normal_scheduler: NormalScheduler<N, C>,
    pub(crate) control_scheduler: ControlScheduler<N, C>,
    shutdown: Arc<AtomicBool>,
    capacity: usize,
}

impl<N: Fsm, C: Fsm> Clone for Router<N, C> {
    fn clone(&self) -> Self {
        Router {
            normals: self.normals.clone(),
            control: self.control.clone(),
            normal_scheduler: self.normal_scheduler.clone(),
            control_scheduler: self.control_scheduler.clone(),
            shutdown: self.shutdown.clone(),
            capacity: self.capacity,
        }
    }
}

impl<N: Fsm, C: Fsm> Router<N, C> {
    pub(crate) fn new(
        control: BasicMailbox<C>,
        normal_scheduler: NormalScheduler<N, C>,
        control_scheduler: ControlScheduler<N, C>,
        capacity: usize,
    ) -> Self {
        Router {
            normals: Arc::default(),
            control,
            normal_scheduler,
            control_scheduler,
            shutdown: Arc::default(),
            capacity,
        }
    }

    /// Registers a mailbox at `addr`. An FSM already registered there is
    /// closed (its replacement wins).
    pub fn register(&self, addr: u64, mailbox: BasicMailbox<N>) {
        if let Some(old) = self.normals.write().insert(addr, mailbox) {
            old.close();
        }
    }

    /// Registers many mailboxes under one lock (used at start-up).
    pub fn register_all(&self, mailboxes: Vec<(u64, BasicMailbox<N>)>) {
        let mut normals = self.normals.write();
        normals.reserve(mailboxes.len());
        for (addr, mailbox) in mailboxes {
            if let Some(old) = normals.insert(addr, mailbox) {
                old.close();
            }
        }
    }

    /// Unregisters and closes the FSM at `addr`.
    pub fn close(&self, addr: u64) {
        if let Some(mb) = self.normals.write().remove(&addr) {
            mb.close();
        }
    }

    pub fn mailbox(&self, addr: u64) -> Option<BasicMailbox<N>> {
        self.normals.read().get(&addr).cloned()
    }

    /// Number of registered normal FSMs.
    pub fn len(&self) -> usize {
        self.normals.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Addresses of every registered FSM.
    pub fn addresses(&self) -> Vec<u64> {
        self.normals.read().keys().copied().collect()
    }

    /// Sends to `addr`, refusing when its mailbox is past capacity. Use for
    /// requests from outside (clients, peers) that can be answered "busy".
    pub fn send(&self, addr: u64, msg: N::Message) -> Result<(), SendError<N::Message>> {
        let normals = self.normals.read();
        match normals.get(&addr) {
            Some(mb) => Ok(mb.try_send(msg, self.capacity, &self.normal_scheduler)?),
            None => Err(SendError::NotFound(msg)),
        }
    }

    /// Sends to `addr` regardless of capacity. Use for internal messages that
    /// must not be lost (apply results, ticks).
    pub fn force_send(&self, addr: u64, msg: N::Message) -> Result<(), SendError<N::Message>> {
        let normals = self.normals.read();
        match normals.get(&addr) {
            Some(mb) => Ok(mb.force_send(msg, &self.normal_scheduler)?),
            None => Err(SendError::NotFound(msg)),
        }
    }

    /// Sends `make()` to each of `addrs` that is registered, under one
    /// lookup of the table.
    pub fn send_each(
        &self,
        addrs: impl IntoIterator<Item = u64>,
        mut make: impl FnMut() -> N::Message,
    ) {
        let normals = self.normals.read();
        for addr in addrs {
            if let Some(mb) = normals.get(&addr) {
                let _ = mb.force_send(make(), &self.normal_scheduler);
            }
        }
    }

    /// Sends to the control FSM.
    pub fn send_control(&self, msg: C::Message) -> Result<(), SendError<C::Message>> {
        Ok(self.control.force_send(msg, &self.control_scheduler)?)
    }

    pub fn is_shutdown(&self) -> bool {
        self.shutdown.load(Ordering::SeqCst)
    }

    /// Closes every mailbox. FSMs are dropped (idle ones now, busy ones when
    /// their poller releases them), which disconnects their channels: pending
    /// messages are dropped with them, so any callback they carry is
    /// cancelled rather than left waiting.
    pub(crate) fn close_all(&self) {
        self.shutdown.store(true, Ordering::SeqCst);
        let normals: Vec<_> = self.normals.write().drain().collect();
        for (_, mb) in normals {
            mb.close();
        }
        self.control.close();
    }
}
