//! The apply side: an `ApplyFsm` per shard on its own poller pool, applying
//! committed entries to RocksDB.
//!
//! One apply round writes ONE RocksDB `WriteBatch` holding the data of every
//! entry applied in the round and, for each shard touched, its `ApplyState`
//! (applied index and term). Data and apply state therefore never disagree
//! after a crash: on restart a shard re-applies from `applied_index + 1`
//! using the Raft log, and nothing is applied twice. The batch is written
//! without fsync (the Raft log is the WAL); callbacks are answered only after
//! it is written, and the results then go back to the replica FSMs.
//!
//! Apply is deterministic: a command's outcome depends only on the log and
//! the data before it, so every replica reaches the same state. Commands
//! refused at apply time (stale epoch, key outside the shard) are refused the
//! same way everywhere and write nothing.

mod fsm;
mod overlay;
mod poller;

pub use fsm::ApplyFsm;
pub use poller::{ApplyControlFsm, ApplyPoller, ApplyPollerBuilder};
