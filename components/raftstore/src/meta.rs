//! What the rest of the node may read about local replicas without asking
//! their FSMs: descriptor, role and leader, updated by the replica FSMs on
//! every change. Readers (gRPC handlers, status pages) see a recent, not an
//! instantaneous, view; anything that must be exact goes through the FSM.

use std::collections::{HashMap, HashSet};

use flotilla_proto::meta::{Replica, ShardDescriptor};
use parking_lot::RwLock;

use crate::{NodeId, ReplicaId, ShardId, Term};

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

/// The local shards and their counts, kept as they change: status pages
/// and gauges read the counts every tick, and walking 10,000 shards for
/// them was a third of an idle node's CPU.
#[derive(Default)]
struct Shards {
    map: HashMap<ShardId, ShardMeta>,
    /// The shards whose local replica leads (heartbeats report them).
    led: HashSet<ShardId>,
    /// Shards whose descriptor changed, or whose entry changed while their
    /// replica leads (taking the lead among those), since the last
    /// heartbeat took them: what it must report.
    dirty: HashSet<ShardId>,
    without_leader: usize,
    down_replicas: usize,
}

impl Shards {
    fn count(&mut self, m: &ShardMeta, add: bool) {
        let f = |n: &mut usize, by: usize| *n = if add { *n + by } else { n.saturating_sub(by) };
        if m.is_leader() {
            if add {
                self.led.insert(m.descriptor.id);
                self.dirty.insert(m.descriptor.id);
            } else {
                self.led.remove(&m.descriptor.id);
            }
        }
        f(&mut self.without_leader, (m.leader_id == 0) as usize);
        f(&mut self.down_replicas, m.down_replicas as usize);
    }

    fn insert(&mut self, m: ShardMeta) -> Option<ShardMeta> {
        self.count(&m, true);
        let old = self.map.insert(m.descriptor.id, m);
        if let Some(old) = &old {
            self.count(old, false);
        }
        old
    }

    fn remove(&mut self, shard_id: ShardId) -> Option<ShardMeta> {
        let old = self.map.remove(&shard_id)?;
        self.count(&old, false);
        Some(old)
    }

    /// Changes one shard's entry, keeping the counts.
    fn update(&mut self, shard_id: ShardId, f: impl FnOnce(&mut ShardMeta)) {
        let Some(mut m) = self.map.remove(&shard_id) else {
            return;
        };
        self.count(&m, false);
        f(&mut m);
        self.count(&m, true);
        self.map.insert(shard_id, m);
    }
}

#[derive(Default)]
pub struct StoreMeta {
    shards: RwLock<Shards>,
    hashes: RwLock<HashMap<ShardId, ShardHash>>,
    /// Replicas that tick (not hibernated): the ticker's list.
    awake: RwLock<HashSet<ShardId>>,
    /// Replicas of local shards per node (this node's included), kept as
    /// descriptors change so the peer list costs no walk of every shard.
    node_refs: RwLock<HashMap<NodeId, usize>>,
}

/// Counts for status pages.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MetaCounts {
    pub replicas: usize,
    pub leaders: usize,
    pub without_leader: usize,
    /// Replicas the local leaders have not heard from lately.
    pub down_replicas: usize,
    /// Hibernated replicas (not ticking).
    pub asleep: usize,
}

impl StoreMeta {
    /// A new replica: it ticks until it hibernates.
    pub fn insert(&self, m: ShardMeta) {
        self.awake.write().insert(m.descriptor.id);
        self.count_nodes(&m.descriptor, 1);
        let old = self.shards.write().insert(m);
        if let Some(old) = old {
            self.count_nodes(&old.descriptor, -1);
        }
    }

    pub fn remove(&self, shard_id: ShardId) {
        if let Some(old) = self.shards.write().remove(shard_id) {
            self.count_nodes(&old.descriptor, -1);
        }
        self.awake.write().remove(&shard_id);
    }

    fn count_nodes(&self, d: &flotilla_proto::meta::ShardDescriptor, by: isize) {
        let mut refs = self.node_refs.write();
        for r in &d.replicas {
            let n = refs.entry(r.node_id).or_default();
            *n = n.saturating_add_signed(by);
            if *n == 0 {
                refs.remove(&r.node_id);
            }
        }
    }

    /// The replica of `shard_id` stopped (true) or resumed (false) ticking.
    pub fn set_asleep(&self, shard_id: ShardId, asleep: bool) {
        if asleep {
            self.awake.write().remove(&shard_id);
        } else {
            self.awake.write().insert(shard_id);
        }
    }

    /// Whether a hosted replica of `shard_id` is hibernating.
    pub fn is_asleep(&self, shard_id: ShardId) -> bool {
        self.shards.read().map.contains_key(&shard_id) && !self.awake.read().contains(&shard_id)
    }

    /// The replicas that tick.
    pub fn awake(&self) -> Vec<ShardId> {
        self.awake.read().iter().copied().collect()
    }

    /// Local shards with a replica on `node`: those led from there (or
    /// whose leader is not known here), then the others.
    pub fn shards_with_replica_on(&self, node: NodeId) -> (Vec<ShardId>, Vec<ShardId>) {
        let shards = self.shards.read();
        let mut led_there = Vec::new();
        let mut others = Vec::new();
        for m in shards.map.values() {
            if m.descriptor.replica_on(node).is_none() {
                continue;
            }
            if m.leader().is_none_or(|l| l.node_id == node) {
                led_there.push(m.descriptor.id);
            } else {
                others.push(m.descriptor.id);
            }
        }
        (led_there, others)
    }

    /// The other nodes holding replicas of local shards.
    pub fn peer_nodes(&self, this: NodeId) -> HashSet<NodeId> {
        self.node_refs
            .read()
            .keys()
            .copied()
            .filter(|n| *n != this)
            .collect()
    }

    pub fn set_leader(&self, shard_id: ShardId, leader_id: ReplicaId, term: Term) {
        self.shards.write().update(shard_id, |m| {
            m.leader_id = leader_id;
            m.term = term;
        });
    }

    pub fn set_down_replicas(&self, shard_id: ShardId, down: u32) {
        self.shards
            .write()
            .update(shard_id, |m| m.down_replicas = down);
    }

    pub fn set_descriptor(&self, desc: flotilla_proto::meta::ShardDescriptor) {
        let old = {
            let mut shards = self.shards.write();
            let shards = &mut *shards;
            let Some(m) = shards.map.get_mut(&desc.id) else {
                return;
            };
            shards.dirty.insert(desc.id);
            std::mem::replace(&mut m.descriptor, desc.clone())
        };
        self.count_nodes(&old, -1);
        self.count_nodes(&desc, 1);
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
        self.shards.read().map.get(&shard_id).cloned()
    }

    /// A local initialized shard other than `shard_id` whose range meets
    /// `[start, end)` (the meta shard's data lives apart and never does).
    pub fn overlapping(&self, shard_id: ShardId, start: &[u8], end: &[u8]) -> Option<ShardId> {
        self.shards
            .read()
            .map
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

    /// The shards whose local replica leads.
    pub fn led_ids(&self) -> Vec<ShardId> {
        self.shards.read().led.iter().copied().collect()
    }

    /// Descriptors of the led shards that changed (or were taken over)
    /// since the last call; every led one when `all`. Costs what changed,
    /// not what is hosted.
    pub fn take_changed_led(&self, all: bool) -> Vec<ShardDescriptor> {
        let mut shards = self.shards.write();
        let dirty = std::mem::take(&mut shards.dirty);
        let ids: Vec<ShardId> = if all {
            shards.led.iter().copied().collect()
        } else {
            dirty
                .into_iter()
                .filter(|id| shards.led.contains(id))
                .collect()
        };
        ids.iter()
            .map(|id| shards.map[id].descriptor.clone())
            .collect()
    }

    pub fn all(&self) -> Vec<ShardMeta> {
        self.shards.read().map.values().cloned().collect()
    }

    pub fn counts(&self) -> MetaCounts {
        let shards = self.shards.read();
        let replicas = shards.map.len();
        MetaCounts {
            replicas,
            leaders: shards.led.len(),
            without_leader: shards.without_leader,
            down_replicas: shards.down_replicas,
            asleep: replicas.saturating_sub(self.awake.read().len()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_proto::meta::{Replica, ShardDescriptor};

    fn shard(id: ShardId, nodes: &[NodeId]) -> ShardMeta {
        ShardMeta {
            descriptor: ShardDescriptor {
                id,
                replicas: nodes
                    .iter()
                    .map(|&n| Replica {
                        id: id * 10 + n,
                        node_id: n,
                        role: 0,
                    })
                    .collect(),
                ..Default::default()
            },
            replica_id: id * 10 + 1,
            leader_id: 0,
            term: 0,
            down_replicas: 0,
        }
    }

    fn peers(m: &StoreMeta) -> Vec<NodeId> {
        let mut p: Vec<_> = m.peer_nodes(1).into_iter().collect();
        p.sort_unstable();
        p
    }

    #[test]
    fn peer_nodes_follow_descriptors_and_sleep_is_tracked() {
        let m = StoreMeta::default();
        m.insert(shard(1, &[1, 2, 3]));
        m.insert(shard(2, &[1, 2, 4]));
        assert_eq!(peers(&m), vec![2, 3, 4]);
        // A membership change moves shard 2's replica from node 4 to 5.
        m.set_descriptor(shard(2, &[1, 2, 5]).descriptor);
        assert_eq!(peers(&m), vec![2, 3, 5]);
        m.remove(1);
        assert_eq!(peers(&m), vec![2, 5]);
        assert!(!m.is_asleep(2));
        m.set_asleep(2, true);
        assert!(m.is_asleep(2) && m.awake().is_empty());
        assert_eq!(m.counts().asleep, 1);
        m.set_asleep(2, false);
        assert_eq!(m.awake(), vec![2]);
        m.remove(2);
        assert!(peers(&m).is_empty() && m.awake().is_empty());
    }

    #[test]
    fn counts_follow_leaders_and_down_replicas() {
        let m = StoreMeta::default();
        let c = |m: &StoreMeta| {
            let c = m.counts();
            (c.replicas, c.leaders, c.without_leader, c.down_replicas)
        };
        m.insert(shard(1, &[1, 2, 3]));
        m.insert(shard(2, &[1, 2, 3]));
        assert_eq!(c(&m), (2, 0, 2, 0));
        m.set_leader(1, 11, 2); // this node's replica leads
        m.set_leader(2, 22, 2); // another's does
        assert_eq!(c(&m), (2, 1, 0, 0));
        let led = |m: &StoreMeta| m.led_ids();
        assert_eq!(led(&m), vec![1]);
        let changed = |m: &StoreMeta, all| -> Vec<ShardId> {
            m.take_changed_led(all).iter().map(|d| d.id).collect()
        };
        // Taking the lead is a change; reporting it once is enough.
        assert_eq!(changed(&m, false), vec![1]);
        assert!(changed(&m, false).is_empty());
        m.set_descriptor(shard(1, &[1, 2, 4]).descriptor);
        m.set_descriptor(shard(2, &[1, 2, 4]).descriptor); // not led here
        assert_eq!(changed(&m, false), vec![1]);
        assert_eq!(changed(&m, true), vec![1]);
        m.set_down_replicas(1, 2);
        assert_eq!(c(&m), (2, 1, 0, 2));
        m.set_down_replicas(1, 1);
        m.set_leader(1, 0, 3);
        assert_eq!(c(&m), (2, 0, 1, 1));
        assert!(led(&m).is_empty());
        // Re-inserting a shard replaces its counts; removing drops them.
        m.insert(shard(1, &[1, 2, 3]));
        assert_eq!(c(&m), (2, 0, 1, 0));
        m.remove(1);
        m.remove(2);
        assert_eq!(c(&m), (0, 0, 0, 0));
    }

    #[test]
    fn shards_on_a_node_put_those_it_leads_first() {
        let m = StoreMeta::default();
        for id in 1..=4 {
            m.insert(shard(id, &[1, 2, 3]));
        }
        m.insert(shard(5, &[1, 3, 4]));
        // Shard 1 is led from node 2, shard 2 from here, shard 3 from node
        // 3; shard 4's leader is unknown here (it might be on node 2).
        m.set_leader(1, 12, 2);
        m.set_leader(2, 21, 2);
        m.set_leader(3, 33, 2);
        let (mut first, mut rest) = m.shards_with_replica_on(2);
        first.sort_unstable();
        rest.sort_unstable();
        assert_eq!((first, rest), (vec![1, 4], vec![2, 3]));
    }
}
