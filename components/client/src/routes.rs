//! The client's route cache: shards ordered by start key, with the leader's
//! node when known, and the node address book.

use std::collections::HashMap;

use flotilla_proto::admin::ShardRoute;
use flotilla_proto::meta::{Node, ShardDescriptor};
use flotilla_proto::ShardMap;

#[derive(Clone, Debug)]
pub struct CachedShard {
    pub desc: ShardDescriptor,
    /// 0 when unknown.
    pub leader_node: u64,
}

impl CachedShard {
    fn of((desc, leader_node): &(ShardDescriptor, u64)) -> Self {
        CachedShard {
            desc: desc.clone(),
            leader_node: *leader_node,
        }
    }
}

/// Shards by range with their leader's node (`ShardMap`: loading all
/// routes of 10,000 shards costs O(n log n), not O(n²)).
#[derive(Default)]
pub struct RouteCache {
    shards: ShardMap<u64>,
    pub nodes: HashMap<u64, String>,
}

impl RouteCache {
    pub fn locate(&self, key: &[u8]) -> Option<CachedShard> {
        self.shards.locate(key).map(CachedShard::of)
    }

    /// The shard holding the greatest keys below `end` (empty = +inf).
    pub fn locate_before(&self, end: &[u8]) -> Option<CachedShard> {
        self.shards.locate_before(end).map(CachedShard::of)
    }

    /// Installs a descriptor, replacing older ones it overlaps, unless the
    /// cache already holds a newer version of it.
    pub fn insert(&mut self, desc: ShardDescriptor, leader_node: u64) {
        self.shards.insert(desc, leader_node);
    }

    pub fn insert_route(&mut self, r: ShardRoute) {
        if let Some(desc) = r.shard {
            self.insert(desc, r.leader_node_id);
        }
    }

    pub fn set_nodes(&mut self, nodes: Vec<Node>) {
        for n in nodes {
            self.nodes.insert(n.id, n.address);
        }
    }

    pub fn set_leader(&mut self, shard_id: u64, node_id: u64) {
        if let Some(l) = self.shards.get_mut(shard_id) {
            *l = node_id;
        }
    }

    pub fn invalidate(&mut self, shard_id: u64) {
        self.shards.remove(shard_id);
    }

    pub fn by_id(&self, shard_id: u64) -> Option<CachedShard> {
        self.shards.get(shard_id).map(CachedShard::of)
    }

    pub fn all(&self) -> Vec<CachedShard> {
        self.shards.iter().map(CachedShard::of).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    // Ranges, epochs and overlaps are `ShardMap`'s, tested there; this is
    // what the cache adds: leaders.
    #[test]
    fn leaders_follow_the_shard() {
        let mut c = RouteCache::default();
        c.insert(
            ShardDescriptor {
                id: 1,
                end_key: Bytes::from_static(b"m"),
                ..Default::default()
            },
            0,
        );
        assert_eq!(c.locate(b"a").unwrap().leader_node, 0);
        c.set_leader(1, 3);
        assert_eq!(c.by_id(1).unwrap().leader_node, 3);
        assert_eq!(c.locate_before(b"m").unwrap().leader_node, 3);
        c.set_leader(9, 2); // unknown shard: nothing
        assert_eq!(c.all().len(), 1);
        c.invalidate(1);
        assert!(c.locate(b"a").is_none() && c.by_id(1).is_none());
    }
}
