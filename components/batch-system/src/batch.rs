//! The poller pool and the contract between a poller and its handler.
//!
//! One poll round, on one poller thread:
//!
//! 1. fetch: block for one scheduled FSM, yield the CPU `round_yields`
//!    times, then take more without blocking, up to `max_batch_size`;
//! 2. `begin`, `handle_control` (if the control FSM came), `handle_normal`
//!    for each normal FSM, then `end` with the whole batch;
//! 3. release: a stopped FSM is dropped; an FSM that asked to keep processing
//!    is put back at the tail of the queue; any other FSM is released to its
//!    mailbox, and rescheduled at once if a message arrived meanwhile.
//!
//! The yields make rounds bigger on a busy machine without a timed wait:
//! a yield returns at once when no other thread wants the CPU, and
//! otherwise lets the threads that are delivering more messages (gRPC
//! workers, other pollers) run first, so those messages join the round.
//! The raft pool yields twice (`raftstore.raft-round-yields`): its rounds
//! each end in one fsync, and under load the yields cut fsyncs per write by
//! a quarter. A 200 µs sleep instead cut them by less and cost 11 % of the
//! throughput; parking at once instead of crossbeam's spin-and-yield
//! before blocking made rounds smaller and cost 20 %.

use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender};

use crate::config::Config;
use crate::fsm::Fsm;
use crate::mailbox::{BasicMailbox, FsmScheduler};
use crate::router::Router;

/// What a handler wants done with an FSM after the round.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HandleResult {
    /// Work is left (the handler stopped draining to be fair): requeue the
    /// FSM at the tail of the poll queue.
    KeepProcessing,
    /// The handler is done. `progress` is the mailbox length the handler
    /// observed when it stopped (0 after draining); if the length differs
    /// after release, a message arrived concurrently and the FSM is
    /// rescheduled.
    StopAt { progress: usize },
}

impl HandleResult {
    /// The mailbox was drained.
    pub fn drained() -> Self {
        HandleResult::StopAt { progress: 0 }
    }
}

/// Drives FSMs on one poller thread. Methods are called in this order each
/// round: `begin`, `handle_control` (only if the control FSM is scheduled),
/// `handle_normal` once per normal FSM in the batch, `end`. `pause` is called
/// before the poller blocks waiting for work.
pub trait PollHandler<N: Fsm, C: Fsm>: Send + 'static {
    /// A round with `batch_size` FSMs starts.
    fn begin(&mut self, batch_size: usize);

    /// Handles the control FSM. Returns the mailbox length observed when it
    /// stopped (normally 0), or `None` to requeue it for another round.
    fn handle_control(&mut self, control: &mut C) -> Option<usize>;

    /// Handles one normal FSM: drain (some of) its mailbox and stage work for
    /// `end`.
    fn handle_normal(&mut self, normal: &mut N) -> HandleResult;

    /// Flushes the round's staged work. `normals` are the FSMs handled in
    /// this round, in `handle_normal` order.
    fn end(&mut self, normals: &mut [Box<N>]);

    /// No FSM is runnable; the poller is about to block.
    fn pause(&mut self) {}
}

/// Builds one handler per poller thread.
pub trait HandlerBuilder<N: Fsm, C: Fsm> {
    type Handler: PollHandler<N, C>;
    fn build(&mut self) -> Self::Handler;
}

/// An entry of the poll queue.
pub(crate) enum FsmTypes<N: Fsm, C: Fsm> {
    Normal(Box<N>, BasicMailbox<N>),
    Control(Box<C>, BasicMailbox<C>),
    /// Tells one poller to exit.
    Stop,
}

pub(crate) struct NormalScheduler<N: Fsm, C: Fsm> {
    sender: Sender<FsmTypes<N, C>>,
}

impl<N: Fsm, C: Fsm> Clone for NormalScheduler<N, C> {
    fn clone(&self) -> Self {
        NormalScheduler {
            sender: self.sender.clone(),
        }
    }
}

impl<N: Fsm, C: Fsm> FsmScheduler for NormalScheduler<N, C> {
    type Fsm = N;
    fn schedule(&self, fsm: Box<N>, mailbox: BasicMailbox<N>) {
        // Fails only when every poller is gone (shutdown); the FSM is dropped.
        let _ = self.sender.send(FsmTypes::Normal(fsm, mailbox));
    }
}

pub(crate) struct ControlScheduler<N: Fsm, C: Fsm> {
    sender: Sender<FsmTypes<N, C>>,
}

impl<N: Fsm, C: Fsm> Clone for ControlScheduler<N, C> {
    fn clone(&self) -> Self {
        ControlScheduler {
            sender: self.sender.clone(),
        }
    }
}

impl<N: Fsm, C: Fsm> FsmScheduler for ControlScheduler<N, C> {
    type Fsm = C;
    fn schedule(&self, fsm: Box<C>, mailbox: BasicMailbox<C>) {
        let _ = self.sender.send(FsmTypes::Control(fsm, mailbox));
    }
}

/// The FSMs of one round, kept as parallel vectors so `end` can take a plain
/// slice of FSMs.
struct Batch<N: Fsm, C: Fsm> {
    normals: Vec<Box<N>>,
    mailboxes: Vec<BasicMailbox<N>>,
    results: Vec<HandleResult>,
    control: Option<(Box<C>, BasicMailbox<C>)>,
}

impl<N: Fsm, C: Fsm> Batch<N, C> {
    fn len(&self) -> usize {
        self.normals.len() + usize::from(self.control.is_some())
    }

    /// Adds a queue entry; returns false for `Stop`.
    fn push(&mut self, t: FsmTypes<N, C>) -> bool {
        match t {
            FsmTypes::Normal(fsm, mb) => {
                self.normals.push(fsm);
                self.mailboxes.push(mb);
            }
            FsmTypes::Control(fsm, mb) => {
                assert!(self.control.is_none(), "control FSM scheduled twice");
                self.control = Some((fsm, mb));
            }
            FsmTypes::Stop => return false,
        }
        true
    }
}

struct Poller<N: Fsm, C: Fsm, H> {
    queue: Receiver<FsmTypes<N, C>>,
    router: Router<N, C>,
    handler: H,
    max_batch_size: usize,
    round_yields: usize,
}

impl<N: Fsm, C: Fsm, H: PollHandler<N, C>> Poller<N, C, H> {
    fn run(mut self) {
        let mut batch = Batch {
            normals: Vec::with_capacity(self.max_batch_size),
            mailboxes: Vec::with_capacity(self.max_batch_size),
            results: Vec::with_capacity(self.max_batch_size),
            control: None,
        };
        let mut running = true;
        while running {
            // Fetch: block for the first FSM only.
            let first = match self.queue.try_recv() {
                Ok(t) => t,
                Err(_) => {
                    self.handler.pause();
                    match self.queue.recv() {
                        Ok(t) => t,
                        Err(_) => return,
                    }
                }
            };
            running = batch.push(first);
            for _ in 0..self.round_yields {
                std::thread::yield_now();
            }
            while running && batch.len() < self.max_batch_size {
                match self.queue.try_recv() {
                    Ok(t) => running = batch.push(t),
                    Err(_) => break,
                }
            }
            if batch.len() == 0 {
                break;
            }
            self.round(&mut batch);
        }
    }

    fn round(&mut self, batch: &mut Batch<N, C>) {
        self.handler.begin(batch.len());
        let control_progress = batch
            .control
            .as_mut()
            .map(|(fsm, _)| self.handler.handle_control(fsm));
        for fsm in batch.normals.iter_mut() {
            let r = self.handler.handle_normal(fsm);
            batch.results.push(r);
        }
        self.handler.end(&mut batch.normals);

        if let Some((fsm, mb)) = batch.control.take() {
            match control_progress.flatten() {
                _ if fsm.is_stopped() => mb.close(),
                Some(len) => mb.release(fsm, len, &self.router.control_scheduler),
                None => self.router.control_scheduler.schedule(fsm, mb),
            }
        }
        let results = batch.results.drain(..);
        for ((fsm, mb), r) in batch
            .normals
            .drain(..)
            .zip(batch.mailboxes.drain(..))
            .zip(results)
        {
            if fsm.is_stopped() {
                mb.close();
                drop(fsm);
                continue;
            }
            match r {
                HandleResult::KeepProcessing => self.router.normal_scheduler.schedule(fsm, mb),
                HandleResult::StopAt { progress } => {
                    mb.release(fsm, progress, &self.router.normal_scheduler)
                }
            }
        }
    }
}

/// A pool of pollers sharing one poll queue, and the router feeding it.
pub struct BatchSystem<N: Fsm, C: Fsm> {
    name: String,
    config: Config,
    queue: Receiver<FsmTypes<N, C>>,
    stop_sender: Sender<FsmTypes<N, C>>,
    router: Router<N, C>,
    workers: Vec<JoinHandle<()>>,
}

/// Creates a batch-system whose control FSM is `control`, fed by
/// `control_sender` (the FSM owns the matching receiver).
pub fn create_system<N: Fsm, C: Fsm>(
    name: &str,
    config: &Config,
    control_sender: Sender<C::Message>,
    control: Box<C>,
) -> (Router<N, C>, BatchSystem<N, C>) {
    let (tx, rx) = crossbeam_channel::unbounded();
    let normal_scheduler = NormalScheduler { sender: tx.clone() };
    let control_scheduler = ControlScheduler { sender: tx.clone() };
    let control_mailbox = BasicMailbox::new(control_sender, control);
    let router = Router::new(
        control_mailbox,
        normal_scheduler,
        control_scheduler,
        config.mailbox_capacity,
    );
    let system = BatchSystem {
        name: name.to_owned(),
        config: config.clone(),
        queue: rx,
        stop_sender: tx,
        router: router.clone(),
        workers: Vec::new(),
    };
    (router, system)
}

impl<N: Fsm, C: Fsm> BatchSystem<N, C> {
    pub fn router(&self) -> &Router<N, C> {
        &self.router
    }

    /// Starts `pool_size` pollers, each with a handler from `builder`.
    pub fn spawn<B: HandlerBuilder<N, C>>(&mut self, mut builder: B) {
        for i in 0..self.config.pool_size {
            let poller = Poller {
                queue: self.queue.clone(),
                router: self.router.clone(),
                handler: builder.build(),
                max_batch_size: self.config.max_batch_size.max(1),
                round_yields: self.config.round_yields,
            };
            let handle = std::thread::Builder::new()
                .name(format!("{}-{}", self.name, i))
                .spawn(move || poller.run())
                .expect("spawn poller thread");
            self.workers.push(handle);
        }
    }

    /// Closes every mailbox, stops the pollers after their current round and
    /// joins them. Idempotent.
    pub fn shutdown(&mut self) {
        if self.workers.is_empty() {
            return;
        }
        self.router.close_all();
        for _ in 0..self.workers.len() {
            let _ = self.stop_sender.send(FsmTypes::Stop);
        }
        for w in self.workers.drain(..) {
            if w.join().is_err() {
                tracing::error!(system = %self.name, "a poller thread panicked");
            }
        }
        // Whatever is still queued is dropped with its FSM.
        while self.queue.try_recv().is_ok() {}
    }
}

impl<N: Fsm, C: Fsm> Drop for BatchSystem<N, C> {
    fn drop(&mut self) {
        self.shutdown();
    }
}
