//! Wire and disk formats of Flotilla, generated from `proto/` by prost and
//! tonic.
//!
//! - `meta`: nodes, shards, replicas, epochs (shared vocabulary).
//! - `error`: structured routing errors carried in data responses.
//! - `kv`: the client-facing Kv service.
//! - `admin`: routing and cluster administration (Admin service).
//! - `raft`: the node-to-node Raft transport (raft-rs messages as opaque bytes).
//! - `raftcmd`: payloads of Raft log entries (durable: fields only added).
//! - `local`: records a node keeps in its own RocksDB.
//! - `etcd`: the slice of etcd's v3 KV API that flotilla-bench drives for
//!   side-by-side runs (wire-compatible with etcd's own definitions).
//!
//! Raft's own messages (`eraftpb`) stay rust-protobuf types from the raft
//! crate; they are never decoded from client-supplied bytes (see
//! RUSTSEC-2024-0437 in the README's security notes).

#[allow(clippy::all, missing_docs)]
pub mod flotilla {
    pub mod meta {
        tonic::include_proto!("flotilla.meta");
    }
    pub mod error {
        tonic::include_proto!("flotilla.error");
    }
    pub mod kv {
        tonic::include_proto!("flotilla.kv");
    }
    pub mod admin {
        tonic::include_proto!("flotilla.admin");
    }
    pub mod raft {
        tonic::include_proto!("flotilla.raft");
    }
    pub mod raftcmd {
        tonic::include_proto!("flotilla.raftcmd");
    }
    pub mod local {
        tonic::include_proto!("flotilla.local");
    }
}

pub use flotilla::{admin, error, kv, local, meta, raft, raftcmd};

pub mod shard_map;
pub use shard_map::ShardMap;

/// etcd's v3 KV API, the part flotilla-bench drives (`--target etcd`).
#[allow(clippy::all, missing_docs)]
pub mod etcd {
    tonic::include_proto!("etcdserverpb");
}

/// gRPC metadata key on an Admin error answered by a node that does not
/// lead the shard; its value is the leader's node id (0 when unknown).
pub const NOT_LEADER_METADATA: &str = "flotilla-not-leader";
pub use prost::Message;

impl meta::ShardDescriptor {
    /// Whether `key` lies in `[start_key, end_key)` (empty end = +inf).
    pub fn contains(&self, key: &[u8]) -> bool {
        key >= &self.start_key[..] && (self.end_key.is_empty() || key < &self.end_key[..])
    }

    /// Whether the shard's range meets `[start, end)` (empty end = +inf).
    pub fn overlaps(&self, start: &[u8], end: &[u8]) -> bool {
        (end.is_empty() || self.start_key[..] < *end)
            && (self.end_key.is_empty() || *start < self.end_key[..])
    }

    /// Whether `other` is an older version of a descriptor than this one
    /// (splits and merges bump `version`, membership changes `conf_ver`).
    pub fn is_newer_than(&self, other: &meta::ShardDescriptor) -> bool {
        let (a, b) = (self.epoch(), other.epoch());
        (a.version, a.conf_ver) > (b.version, b.conf_ver)
    }

    /// The epoch, or the zero epoch when unset.
    pub fn epoch(&self) -> meta::Epoch {
        self.epoch.unwrap_or_default()
    }

    /// The replica of this shard placed on `node_id`, if any.
    pub fn replica_on(&self, node_id: u64) -> Option<&meta::Replica> {
        self.replicas.iter().find(|r| r.node_id == node_id)
    }

    /// The replica with raft peer id `replica_id`, if any.
    pub fn replica(&self, replica_id: u64) -> Option<&meta::Replica> {
        self.replicas.iter().find(|r| r.id == replica_id)
    }
}
