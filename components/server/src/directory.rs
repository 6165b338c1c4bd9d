//! The node's view of the shard directory: every shard of the cluster by
//! range, hosted here or not. Routing requests are answered from it.
//!
//! Today it is loaded from the layout written at bootstrap and refreshed
//! from local replicas' descriptors; the meta shard of the placement issue
//! becomes its source later without changing how routes are answered
//! (`route`, `list`), which is why it is a separate object.

use flotilla_proto::meta::ShardDescriptor;
use flotilla_proto::ShardMap;
use parking_lot::RwLock;

/// Every shard of the cluster by range (`ShardMap`: O(log n) per update,
/// as a heartbeat refreshes all of them).
#[derive(Default)]
pub struct Directory {
    ranges: RwLock<ShardMap<()>>,
}

impl Directory {
    pub fn new(shards: Vec<ShardDescriptor>) -> Self {
        let d = Directory::default();
        for s in shards {
            d.update(s);
        }
        d
    }

    /// Installs `desc` unless a newer version of the same shard is known;
    /// shards it overlaps are removed.
    pub fn update(&self, desc: ShardDescriptor) {
        // A replica waiting for its first snapshot knows no range yet; the
        // meta shard's range is in another key space.
        if desc.replicas.is_empty() || desc.id == flotilla_storage::META_SHARD_ID {
            return;
        }
        self.ranges.write().insert(desc, ());
    }

    /// The shard whose range holds `key`.
    pub fn route(&self, key: &[u8]) -> Option<ShardDescriptor> {
        self.ranges.read().locate(key).map(|(d, _)| d.clone())
    }

    pub fn get(&self, shard_id: u64) -> Option<ShardDescriptor> {
        self.ranges.read().get(shard_id).map(|(d, _)| d.clone())
    }

    /// Every shard, ordered by start key.
    pub fn list(&self) -> Vec<ShardDescriptor> {
        self.ranges.read().iter().map(|(d, _)| d.clone()).collect()
    }

    /// Shards overlapping `[start, end)` (empty end = +inf).
    pub fn overlapping(&self, start: &[u8], end: &[u8]) -> Vec<ShardDescriptor> {
        self.ranges
            .read()
            .overlapping(start, end)
            .map(|(d, _)| d.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use flotilla_proto::meta::Replica;

    // Ranges, epochs and overlaps are `ShardMap`'s, tested there; this is
    // what the directory adds.
    #[test]
    fn keeps_user_shards_with_replicas_only() {
        let desc = |id: u64, replicas: Vec<Replica>| ShardDescriptor {
            id,
            start_key: Bytes::from_static(b"a"),
            end_key: Bytes::from_static(b"b"),
            replicas,
            ..Default::default()
        };
        let one = vec![Replica {
            id: 7,
            node_id: 1,
            role: 0,
        }];
        let d = Directory::new(vec![
            desc(flotilla_storage::META_SHARD_ID, one.clone()),
            desc(5, vec![]),
        ]);
        assert!(d.list().is_empty(), "{:?}", d.list());
        d.update(desc(5, one));
        assert_eq!(d.route(b"a").unwrap().id, 5);
        assert_eq!(d.get(5).unwrap().id, 5);
        assert_eq!(d.overlapping(b"", b"").len(), 1);
    }
}
