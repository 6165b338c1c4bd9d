//! What the rest of the node may read about local replicas without asking
//! their FSMs: descriptor, role and leader, updated by the replica FSMs on
//! every change. Readers (gRPC handlers, status pages) see a recent, not an
//! instantaneous, view; anything that must be exact goes through the FSM.

use std::collections::HashMap;

use flotilla_proto::meta::{Replica, ShardDescriptor};
use parking_lot::RwLock;

use crate::{ReplicaId, ShardId, Term};

#[derive(Clone, Debug)]
pub struct ShardMeta {
    pub descriptor: ShardDescriptor,
    pub replica_id: ReplicaId,
    /// 0 when unknown.
    pub leader_id: ReplicaId,
    pub term: Term,
    /// On a leader: other replicas it has not heard from within two
    /// election timeouts.
    pub down_replicas: u32,
}

impl ShardMeta {
    pub fn is_leader(&self) -> bool {
        self.leader_id != 0 && self.leader_id == self.replica_id
    }

    pub fn leader(&self) -> Option<&Replica> {
        self.descriptor.replica(self.leader_id)
    }
}

/// The latest hash a local replica computed of its shard.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ShardHash {
    pub index: u64,
    pub hash: u64,
    pub keys: u64,
}

#[derive(Default)]
pub struct StoreMeta {
    shards: RwLock<HashMap<ShardId, ShardMeta>>,
    hashes: RwLock<HashMap<ShardId, ShardHash>>,
}

/// Counts for status pages.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MetaCounts {
    pub replicas: usize,
    pub leaders: usize,
    pub without_leader: usize,
    /// Replicas the local leaders have not heard from lately.
    pub down_replicas: usize,
}

impl StoreMeta {
    pub fn insert(&self, m: ShardMeta) {
        self.shards.write().insert(m.descriptor.id, m);
    }

    pub fn remove(&self, shard_id: ShardId) {
        self.shards.write().remove(&shard_id);
    }

    pub fn set_leader(&self, shard_id: ShardId, leader_id: ReplicaId, term: Term) {
        if let Some(m) = self.shards.write().get_mut(&shard_id) {
            m.leader_id = leader_id;
            m.term = term;
        }
    }

    pub fn set_down_replicas(&self, shard_id: ShardId, down: u32) {
        if let Some(m) = self.shards.write().get_mut(&shard_id) {
            m.down_replicas = down;
        }
    }

    pub fn set_descriptor(&self, desc: flotilla_proto::meta::ShardDescriptor) {
        if let Some(m) = self.shards.write().get_mut(&desc.id) {
            m.descriptor = desc;
        }
    }

    pub fn set_hash(&self, shard_id: ShardId, index: u64, hash: u64, keys: u64) {
        self.hashes
            .write()
            .insert(shard_id, ShardHash { index, hash, keys });
    }

    pub fn hash(&self, shard_id: ShardId) -> Option<ShardHash> {
        self.hashes.read().get(&shard_id).copied()
    }

    pub fn get(&self, shard_id: ShardId) -> Option<ShardMeta> {
        self.shards.read().get(&shard_id).cloned()
    }

    /// A local initialized shard other than `shard_id` whose range meets
    /// `[start, end)` (the meta shard's data lives apart and never does).
    pub fn overlapping(&self, shard_id: ShardId, start: &[u8], end: &[u8]) -> Option<ShardId> {
        self.shards
            .read()
            .values()
            .find(|m| {
                let d = &m.descriptor;
                d.id != shard_id
                    && d.id != flotilla_storage::META_SHARD_ID
                    && !d.replicas.is_empty()
                    && d.overlaps(start, end)
            })
            .map(|m| m.descriptor.id)
    }

    pub fn all(&self) -> Vec<ShardMeta> {
        self.shards.read().values().cloned().collect()
    }

    pub fn counts(&self) -> MetaCounts {
        let shards = self.shards.read();
        let mut c = MetaCounts {
            replicas: shards.len(),
            ..Default::default()
        };
        for m in shards.values() {
            if m.is_leader() {
                c.leaders += 1;
            }
            if m.leader_id == 0 {
                c.without_leader += 1;
            }
            c.down_replicas += m.down_replicas as usize;
        }
        c
    }
}
