//! The initial layout of a new cluster, and writing it to a node's disks.
//!
//! Every node of a new cluster derives the same layout from the same
//! `--initial-cluster` and `--initial-shards K`, so no node has to tell
//! another what it created:
//!
//! - shard ids are `1..=K`; shard `i` (0-based) covers
//!   `[split(i), split(i + 1))` where `split(0) = ""`, `split(K) = +inf` and
//!   the inner split keys cut the two-byte prefix space evenly
//!   (`i * 65536 / K` big-endian, trailing zero bytes trimmed, so K = 8 gives
//!   `\x20`, `\x40`, ... `\xe0`);
//! - shard `i` has `min(3, nodes)` voters on the nodes at positions
//!   `i, i+1, ...` (mod the node count) of the sorted node list; its first
//!   replica campaigns at start-up, which spreads leaders over nodes;
//! - replica ids follow the shard ids: `K + 1 + i * R + j` for replica `j`;
//! - the meta shard (id 0, data in column family `cluster`) has voters on the
//!   first 5 nodes of the sorted list when there are 5 or more, else on the
//!   first `min(3, nodes)`; its replica ids follow the user shards' and its
//!   data starts with the node registry (ids), the directory of the K shards and
//!   the id allocator's next id (one past the last id used here).
//!
//! The node writes its replicas' raft states to raft-engine first (synced),
//! then, in one synced RocksDB batch, their shard and apply states, the whole
//! directory and, last, the `NodeIdent` that marks the node bootstrapped. A
//! crash in between leaves no `NodeIdent`, and the next start bootstraps
//! again over the partial state.

use flotilla_proto::local::{NodeIdent, ShardLocalState, ShardState};
use flotilla_proto::meta::{Epoch, Node, Replica, ReplicaRole, ShardDescriptor};
use flotilla_proto::Message as _;
use flotilla_storage::keys::cluster;
use flotilla_storage::replica_storage::{initial_apply_state, initial_raft_state};
use flotilla_storage::{KvEngine, RaftLogEngine, CF_CLUSTER, META_SHARD_ID};
use raft_engine::LogBatch;
use rocksdb::WriteBatch;

use crate::{NodeId, Result};

/// The largest replica count of a bootstrapped shard.
pub const MAX_INITIAL_REPLICAS: usize = 3;

/// Start key of shard `i` of `k`.
pub fn split_key(i: usize, k: usize) -> Vec<u8> {
    if i == 0 {
        return Vec::new();
    }
    let v = ((i as u64) << 16) / k as u64;
    let mut key = vec![(v >> 8) as u8, v as u8];
    while key.len() > 1 && key.last() == Some(&0) {
        key.pop();
    }
    key
}

/// The shards of a new cluster of `nodes` with `k` shards.
pub fn initial_layout(nodes: &[NodeId], k: usize) -> Vec<ShardDescriptor> {
    assert!(
        (1..=65536).contains(&k),
        "initial shard count must be in 1..=65536"
    );
    let mut nodes = nodes.to_vec();
    nodes.sort_unstable();
    nodes.dedup();
    let r = nodes.len().min(MAX_INITIAL_REPLICAS);
    (0..k)
        .map(|i| {
            let replicas = (0..r)
                .map(|j| Replica {
                    id: (k + 1 + i * r + j) as u64,
                    node_id: nodes[(i + j) % nodes.len()],
                    role: ReplicaRole::Voter as i32,
                })
                .collect();
            ShardDescriptor {
                id: (i + 1) as u64,
                start_key: split_key(i, k).into(),
                end_key: if i + 1 == k {
                    Vec::new().into()
                } else {
                    split_key(i + 1, k).into()
                },
                epoch: Some(Epoch {
                    conf_ver: 1,
                    version: 1,
                }),
                replicas,
            }
        })
        .collect()
}

/// The meta shard of a new cluster whose user shards are `layout` (see the
/// module doc), and the first id the allocator may hand out.
pub fn meta_layout(nodes: &[NodeId], layout: &[ShardDescriptor]) -> (ShardDescriptor, u64) {
    let mut nodes = nodes.to_vec();
    nodes.sort_unstable();
    nodes.dedup();
    let count = if nodes.len() >= 5 {
        5
    } else {
        nodes.len().min(3)
    };
    let first_free = layout
        .iter()
        .flat_map(|d| std::iter::once(d.id).chain(d.replicas.iter().map(|r| r.id)))
        .max()
        .unwrap_or(0)
        + 1;
    let replicas = nodes[..count]
        .iter()
        .enumerate()
        .map(|(j, n)| Replica {
            id: first_free + j as u64,
            node_id: *n,
            role: ReplicaRole::Voter as i32,
        })
        .collect();
    let meta = ShardDescriptor {
        id: META_SHARD_ID,
        start_key: Default::default(),
        end_key: Default::default(),
        epoch: Some(Epoch {
            conf_ver: 1,
            version: 1,
        }),
        replicas,
    };
    (meta, first_free + count as u64)
}

/// Writes the initial state of node `node_id` for `layout` (user shards).
pub fn bootstrap_node(
    kv: &KvEngine,
    raft: &RaftLogEngine,
    node_id: NodeId,
    nodes: &[Node],
    layout: &[ShardDescriptor],
) -> Result<()> {
    let ids: Vec<NodeId> = nodes.iter().map(|n| n.id).collect();
    let (meta, next_id) = meta_layout(&ids, layout);
    let hosted: Vec<_> = layout
        .iter()
        .chain(std::iter::once(&meta))
        .filter_map(|d| d.replica_on(node_id).map(|r| (d, r.id)))
        .collect();

    let mut lb = LogBatch::default();
    for (d, _) in &hosted {
        RaftLogEngine::put_raft_state(&mut lb, d.id, &initial_raft_state());
    }
    raft.write(&mut lb, true)?;

    let mut wb = WriteBatch::default();
    for (d, replica_id) in &hosted {
        let state = ShardLocalState {
            shard: Some((*d).clone()),
            state: ShardState::Normal as i32,
            replica_id: *replica_id,
        };
        kv.put_shard_state(&mut wb, d.id, &state);
        kv.put_apply_state(&mut wb, d.id, &initial_apply_state());
    }
    for d in layout {
        kv.put_directory_entry(&mut wb, d);
    }
    if meta.replica_on(node_id).is_some() {
        // The meta shard's data as of its initial log index.
        let cf = kv.cf(CF_CLUSTER);
        wb.put_cf(cf, cluster::NEXT_ID, next_id.to_be_bytes());
        // Ids only: each node registers the address it listens on itself
        // (nodes may reach one another through different addresses, and
        // every replica must start from the same data).
        for n in nodes {
            let n = Node {
                id: n.id,
                ..Default::default()
            };
            wb.put_cf(cf, cluster::node_key(n.id), n.encode_to_vec());
        }
        for d in layout {
            wb.put_cf(cf, cluster::shard_key(d.id), d.encode_to_vec());
        }
    }
    kv.put_node_ident(
        &mut wb,
        &NodeIdent {
            node_id,
            nodes: nodes.to_vec(),
            initial_shards: layout.len() as u64,
        },
    );
    kv.write(wb, true)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eight_shards_cut_the_key_space_evenly() {
        let l = initial_layout(&[3, 1, 2], 8);
        assert_eq!(l.len(), 8);
        assert_eq!(l[0].start_key.as_ref(), b"");
        assert_eq!(l[0].end_key.as_ref(), b"\x20");
        assert_eq!(l[7].start_key.as_ref(), b"\xe0");
        assert!(l[7].end_key.is_empty());
        for w in l.windows(2) {
            assert_eq!(w[0].end_key, w[1].start_key);
        }
        // Three distinct nodes per shard; the first replica rotates.
        for (i, d) in l.iter().enumerate() {
            let mut nodes: Vec<_> = d.replicas.iter().map(|r| r.node_id).collect();
            assert_eq!(nodes[0], (i % 3 + 1) as u64);
            nodes.sort();
            assert_eq!(nodes, vec![1, 2, 3]);
        }
        // Replica ids are unique and above the shard ids.
        let mut ids: Vec<_> = l
            .iter()
            .flat_map(|d| d.replicas.iter().map(|r| r.id))
            .collect();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), 24);
        assert!(ids[0] > 8);
    }

    #[test]
    fn odd_counts_and_many_shards_stay_ordered() {
        for k in [1usize, 3, 7, 300, 1000] {
            let l = initial_layout(&[1], k);
            assert_eq!(l.len(), k);
            assert!(l[0].start_key.is_empty() && l[k - 1].end_key.is_empty());
            for w in l.windows(2) {
                assert!(w[0].start_key < w[1].start_key, "k={k}");
                assert_eq!(w[0].end_key, w[1].start_key);
            }
            assert_eq!(l[0].replicas.len(), 1);
        }
    }
}
