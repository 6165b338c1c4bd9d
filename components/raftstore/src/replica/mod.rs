//! The raft side of a shard replica: its FSM and the poller that drives it.

pub mod fsm;
pub mod lease;
pub mod load;
pub mod poller;
pub mod proposal;
pub mod read;

pub use fsm::ReplicaFsm;
pub use poller::{NodeFsm, RaftPoller, RaftPollerBuilder};
