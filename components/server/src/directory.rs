//! The node's view of the shard directory: every shard of the cluster by
//! range, hosted here or not. Routing requests are answered from it.
//!
//! Today it is loaded from the layout written at bootstrap and refreshed
//! from local replicas' descriptors; the meta shard of the placement issue
//! becomes its source later without changing how routes are answered
//! (`route`, `list`), which is why it is a separate object.

use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;

use bytes::Bytes;
use flotilla_proto::meta::ShardDescriptor;
use parking_lot::RwLock;

/// Disjoint ranges by start key, and where each shard id sits: a heartbeat
/// refreshes every shard of the cluster, so an update costs O(log n), not a
/// scan of the whole directory.
#[derive(Default)]
struct Ranges {
    by_start: BTreeMap<Bytes, ShardDescriptor>,
    start_of: HashMap<u64, Bytes>,
}

impl Ranges {
    fn remove(&mut self, start: &Bytes) {
        if let Some(d) = self.by_start.remove(start) {
            self.start_of.remove(&d.id);
        }
    }

    /// Start keys of the shards meeting `[start, end)` (empty end = +inf):
    /// the one starting at or before `start`, if it reaches past it, and
    /// those starting inside.
    fn overlapping(&self, start: &[u8], end: &[u8]) -> Vec<Bytes> {
        let mut found = Vec::new();
        if let Some((k, d)) = self
            .by_start
            .range::<[u8], _>((Bound::Unbounded, Bound::Included(start)))
            .next_back()
        {
            if d.overlaps(start, end) {
                found.push(k.clone());
            }
        }
        let upper = if end.is_empty() {
            Bound::Unbounded
        } else {
            Bound::Excluded(end)
        };
        found.extend(
            self.by_start
                .range::<[u8], _>((Bound::Excluded(start), upper))
                .map(|(k, _)| k.clone()),
        );
        found
    }
}

#[derive(Default)]
pub struct Directory {
    ranges: RwLock<Ranges>,
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
        let mut r = self.ranges.write();
        if let Some(start) = r.start_of.get(&desc.id).cloned() {
            if r.by_start[&start].is_newer_than(&desc) {
                return;
            }
            r.remove(&start);
        }
        for start in r.overlapping(&desc.start_key, &desc.end_key) {
            r.remove(&start);
        }
        r.start_of.insert(desc.id, desc.start_key.clone());
        r.by_start.insert(desc.start_key.clone(), desc);
    }

    /// The shard whose range holds `key`.
    pub fn route(&self, key: &[u8]) -> Option<ShardDescriptor> {
        let r = self.ranges.read();
        r.by_start
            .range::<[u8], _>((Bound::Unbounded, Bound::Included(key)))
            .next_back()
            .map(|(_, d)| d)
            .filter(|d| d.contains(key))
            .cloned()
    }

    pub fn get(&self, shard_id: u64) -> Option<ShardDescriptor> {
        let r = self.ranges.read();
        r.start_of
            .get(&shard_id)
            .and_then(|s| r.by_start.get(s))
            .cloned()
    }

    /// Every shard, ordered by start key.
    pub fn list(&self) -> Vec<ShardDescriptor> {
        self.ranges.read().by_start.values().cloned().collect()
    }

    /// Shards overlapping `[start, end)` (empty end = +inf).
    pub fn overlapping(&self, start: &[u8], end: &[u8]) -> Vec<ShardDescriptor> {
        let r = self.ranges.read();
        r.overlapping(start, end)
            .iter()
            .map(|k| r.by_start[k].clone())
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
