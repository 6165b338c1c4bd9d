//! The raftstore: every shard replica of a node, each with its own raft-rs
//! `RawNode`, multiplexed onto two small poller pools of the batch-system.
//!
//! # How data flows
//!
//! ```text
//!  server ──StoreRouter::write/read──► ReplicaFsm mailbox
//!  peers  ──StoreRouter::raft_message─►      │
//!  ticker ──Tick (one thread per node)─►     │
//!                                            ▼
//!   raft pollers: handle_normal = step / propose (one entry per round) /
//!                 read_index (one per round) / collect Ready
//!                 end = flush leader msgs; ONE synced raft-engine write for
//!                       the round; persisted msgs; advance
//!                                            │ committed entries + proposals
//!                                            ▼
//!   apply pollers: ApplyFsm per shard; ONE RocksDB WriteBatch per round
//!                  (data + apply state); then callbacks; then ApplyResult
//!                  back to the ReplicaFsm (applied index → reads served)
//! ```
//!
//! # Invariants
//! - Raft logic does no I/O: the replica stages writes and messages into the
//!   round; the round's `end` does the disk write and the network flush.
//! - Messages that depend on persistence (votes, append responses) leave the
//!   node only after the round's fsync; the leader's appends leave before it.
//! - Committed entries handed to apply are always locally persisted (raft-rs
//!   limits them to the persisted index).
//! - Every client callback is answered exactly once (see `replica::fsm`).
//! - A failed raft-engine write or RocksDB apply write panics the node.
//!
//! # Durability
//! - Log GC: the leader proposes `CompactLog` (an entry, so every replica
//!   truncates at the same index); the GC worker syncs RocksDB's WAL and
//!   then deletes the entries from raft-engine; raft-engine files are purged
//!   periodically (`worker`).
//! - Snapshots: built by the snapshot workers from a RocksDB snapshot the
//!   apply poller takes after its write; sent by the transport as a separate
//!   stream; installed as documented in `snapshot`.
//!
//! # Reads
//! A read asks the replica when it may be served from the applied state:
//! from the leader's lease, after a ReadIndex round (on the leader, or
//! forwarded by a follower), or at once for stale reads (`replica::read`,
//! `replica::lease`). The data itself is read from RocksDB by the caller.
//!
//! # Idle shards
//! Replicas of idle shards hibernate: they leave the ticker's rounds, so a
//! node's ticking, heartbeats and poll work follow its active shards, not
//! its hosted ones (`replica::fsm::hibernate`). Since a hibernated follower
//! cannot notice its leader's death, the node watches its peer nodes for
//! all replicas (`liveness`) and wakes the ones a silent or restarted node
//! concerns.
//!
//! # Not done yet
//! - Merges (splits are one-way).

pub mod apply;
pub mod bootstrap;
pub mod config;
pub mod error;
pub mod liveness;
pub mod logger;
pub mod meta;
pub mod metrics;
pub mod msg;
pub mod replica;
pub mod snapshot;
pub mod store;
pub mod transport;
pub mod worker;

pub use config::Config;
pub use error::{Error, Result};
pub use meta::{ShardMeta, StoreMeta};
pub use msg::{
    CasOutcome, KeySpan, ReadMode, ReadRequest, ReplicaStatus, WriteCallback, WriteRequest,
    WriteResult,
};
pub use store::{Engines, Store, StoreRouter};
pub use transport::{Extra, RaftMessage, Transport};

pub use flotilla_storage::{Index, NodeId, ReplicaId, ShardId, Term};

/// A key for log lines and messages: printable ASCII as is, other bytes
/// escaped.
pub fn fmt_key(key: &[u8]) -> String {
    key.escape_ascii().to_string()
}
