//! A generic batch-system: many finite state machines (FSMs) multiplexed onto
//! a small, fixed pool of poller threads. Nothing in here knows about Raft.
//!
//! # How data flows
//!
//! ```text
//!  Router::send(addr, msg) ──► mailbox of FSM `addr` (crossbeam channel)
//!        │                     │ first message to an idle FSM takes the FSM
//!        │                     ▼ out of its mailbox and schedules it
//!        │              shared poll queue (FIFO of scheduled FSMs)
//!        │                     │
//!        ▼                     ▼ a poller fetches up to `max_batch_size` FSMs
//!   control mailbox      PollHandler::begin
//!                        PollHandler::handle_control (if the control FSM is in the batch)
//!                        PollHandler::handle_normal  (each FSM, drains its mailbox)
//!                        PollHandler::end            (flush the round: one write, one send)
//!                        release each FSM to its mailbox, or requeue it at the tail
//! ```
//!
//! The point of the round is `end`: N FSMs touched in one round cost one disk
//! write and one network flush, which is where a Multi-Raft store gets its
//! group commit.
//!
//! # Invariants
//!
//! - An FSM is in exactly one place: idle inside its mailbox, queued on the
//!   poll queue, or held by exactly one poller. So it is never polled by two
//!   threads at once (see [`fsm`]).
//! - No lost wakeup: a message that arrives while a poller holds the FSM finds
//!   it "notified" and schedules nothing; after releasing the FSM the poller
//!   re-checks the mailbox and reschedules it if anything arrived.
//! - Fairness: an FSM that still has messages after a round (its handler said
//!   `KeepProcessing`) goes to the tail of the poll queue, behind every FSM
//!   that was waiting, instead of staying in the poller's batch.
//! - Mailboxes are unbounded channels with a soft capacity: [`Router::send`]
//!   refuses past it (the caller answers "busy"), [`Router::force_send`] never
//!   refuses, for internal messages that must not be lost.
//!
//! # Not done
//!
//! - No priority pools (TiKV moves slow apply work to a low-priority pool).
//! - Router lookups take a read lock on one map; TiKV adds a per-thread cache.

pub mod batch;
pub mod config;
pub mod fsm;
pub mod mailbox;
pub mod router;

pub use batch::{create_system, BatchSystem, HandleResult, HandlerBuilder, PollHandler};
pub use config::Config;
pub use fsm::Fsm;
pub use mailbox::BasicMailbox;
pub use router::{Router, SendError};
