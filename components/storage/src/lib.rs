//! The two storage engines of a node, and raft-rs `Storage` on top of them.
//!
//! - [`RaftLogEngine`]: one raft-engine instance at `<data>/raft` holds the
//!   Raft logs of every shard on the node (raft group id = shard id): the
//!   entries, plus one [`RaftLocalState`] record per group (hard state and
//!   last index).
//! - [`KvEngine`]: one RocksDB at `<data>/kv`. Column family `default` holds
//!   user data keyed by the raw user key (so a split moves no data); column
//!   family `meta` holds node and per-shard records (see [`keys`]); column
//!   family `cluster` holds the data of the meta shard (shard 0: node
//!   registry, shard directory, id allocator), which thereby never overlaps
//!   a user shard's range.
//! - [`ReplicaStorage`]: a shard replica's view of its log, implementing
//!   `raft::Storage` from the raft-engine log, its in-memory raft state and its
//!   apply state (which fixes where the log starts).
//!
//! # Crash-consistency contract
//!
//! - Raft log writes are synced (fsync) before anything that depends on them
//!   (acknowledging an append, sending a vote) leaves the node.
//! - A shard's data and its `ApplyState` are written in one RocksDB write
//!   batch, so after a crash they agree; the shard re-applies from
//!   `applied_index + 1` using the raft log. RocksDB writes on the apply path
//!   are not synced: the raft log is the write-ahead log.
//! - A failed raft-engine fsync panics inside raft-engine; a failed RocksDB
//!   write on the apply path panics the node (see `KvEngine::write`). Neither
//!   is ever ignored.
//!
//! - [`SnapManager`]: snapshot files (one SST of a shard's range) built from
//!   a RocksDB snapshot, sent to and ingested by lagging replicas.

pub mod disk;
pub mod entry_cache;
pub mod error;
pub mod keys;
pub mod kv;
pub mod metrics;
pub mod raft_log;
pub mod replica_storage;
pub mod snap;

pub use disk::{DiskLevel, DiskMonitor, DiskStatus};
pub use error::{Error, Result};
pub use kv::{
    data_cf, KvConfig, KvEngine, KvSnapshot, CF_CLUSTER, CF_DEFAULT, CF_META, META_SHARD_ID,
};
pub use raft_log::{RaftLocalState, RaftLogConfig, RaftLogEngine};
pub use replica_storage::{ReplicaStorage, RAFT_INIT_INDEX, RAFT_INIT_TERM};
pub use snap::SnapManager;

/// Identifier of a shard; also its raft-engine group id.
pub type ShardId = u64;
/// Identifier of a replica; also its raft-rs peer id. Unique cluster-wide.
pub type ReplicaId = u64;
/// Identifier of a node.
pub type NodeId = u64;
/// A Raft log index.
pub type Index = u64;
/// A Raft term.
pub type Term = u64;
