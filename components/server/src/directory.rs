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
    use flotilla_proto::meta::Epoch;

    fn shard(id: u64, s: &str, e: &str, version: u64) -> ShardDescriptor {
        ShardDescriptor {
            id,
            start_key: Bytes::copy_from_slice(s.as_bytes()),
            end_key: Bytes::copy_from_slice(e.as_bytes()),
            epoch: Some(Epoch {
                conf_ver: 1,
                version,
            }),
            replicas: vec![flotilla_proto::meta::Replica {
                id: id + 100,
                node_id: 1,
                role: 0,
            }],
        }
    }

    #[test]
    fn routes_keys_to_their_ranges_and_newer_epochs_win() {
        let d = Directory::new(vec![shard(1, "", "m", 1), shard(2, "m", "", 1)]);
        assert_eq!(d.route(b"").unwrap().id, 1);
        assert_eq!(d.route(b"l").unwrap().id, 1);
        assert_eq!(d.route(b"m").unwrap().id, 2);
        assert_eq!(d.route(b"zzz").unwrap().id, 2);
        // A split of 2 at "t" replaces the overlapping older descriptor.
        d.update(shard(2, "m", "t", 2));
        d.update(shard(3, "t", "", 2));
        assert_eq!(d.route(b"x").unwrap().id, 3);
        assert_eq!(d.list().len(), 3);
        // A stale descriptor is ignored.
        d.update(shard(2, "m", "", 1));
        assert_eq!(d.route(b"x").unwrap().id, 3);
        assert_eq!(d.overlapping(b"a", b"n").len(), 2);
        assert_eq!(d.overlapping(b"t", b"").len(), 1);
        assert_eq!(d.overlapping(b"", b"").len(), 3);
        assert_eq!(d.get(2).unwrap().end_key, Bytes::from_static(b"t"));
        // A merge-like descriptor covering several ranges replaces them all.
        d.update(shard(4, "a", "z", 3));
        let ids: Vec<_> = d.list().iter().map(|s| s.id).collect();
        assert_eq!(ids, vec![4], "{:?}", d.list());
        assert!(d.get(1).is_none() && d.get(3).is_none());
        assert_eq!(d.route(b"b").unwrap().id, 4);
        assert!(d.route(b"").is_none());
    }
}
