//! The node's view of the shard directory: every shard of the cluster by
//! range, hosted here or not. Routing requests are answered from it.
//!
//! Today it is loaded from the layout written at bootstrap and refreshed
//! from local replicas' descriptors; the meta shard of the placement issue
//! becomes its source later without changing how routes are answered
//! (`route`, `list`), which is why it is a separate object.

use std::collections::BTreeMap;

use bytes::Bytes;
use flotilla_proto::meta::ShardDescriptor;
use parking_lot::RwLock;

#[derive(Default)]
pub struct Directory {
    by_start: RwLock<BTreeMap<Bytes, ShardDescriptor>>,
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
    /// shards it overlaps with an older version are removed.
    pub fn update(&self, desc: ShardDescriptor) {
        // A replica waiting for its first snapshot knows no range yet; the
        // meta shard's range is in another key space.
        if desc.replicas.is_empty() || desc.id == flotilla_storage::META_SHARD_ID {
            return;
        }
        let mut m = self.by_start.write();
        if m.values()
            .any(|d| d.id == desc.id && d.is_newer_than(&desc))
        {
            return;
        }
        m.retain(|_, d| !(d.id == desc.id || d.overlaps(&desc.start_key, &desc.end_key)));
        m.insert(desc.start_key.clone(), desc);
    }

    /// The shard whose range holds `key`.
    pub fn route(&self, key: &[u8]) -> Option<ShardDescriptor> {
        let m = self.by_start.read();
        m.range::<[u8], _>((std::ops::Bound::Unbounded, std::ops::Bound::Included(key)))
            .next_back()
            .map(|(_, d)| d)
            .filter(|d| d.contains(key))
            .cloned()
    }

    pub fn get(&self, shard_id: u64) -> Option<ShardDescriptor> {
        self.by_start
            .read()
            .values()
            .find(|d| d.id == shard_id)
            .cloned()
    }

    /// Every shard, ordered by start key.
    pub fn list(&self) -> Vec<ShardDescriptor> {
        self.by_start.read().values().cloned().collect()
    }

    /// Shards overlapping `[start, end)` (empty end = +inf).
    pub fn overlapping(&self, start: &[u8], end: &[u8]) -> Vec<ShardDescriptor> {
        self.by_start
            .read()
            .values()
            .filter(|d| d.overlaps(start, end))
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
    }
}
