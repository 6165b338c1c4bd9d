//! Membership changes in an in-process cluster: a new replica is added as a
//! learner, catches up by snapshot and is promoted; replicas are replaced
//! atomically with joint consensus; a removed replica destroys itself and is
//! not recreated by late messages.

use std::time::Duration;

use bytes::Bytes;
use flotilla_proto::admin::replica_change::Kind;
use flotilla_proto::admin::ReplicaChange;
use flotilla_proto::meta::ReplicaRole;
use flotilla_test_cluster::{wait_until, TestCluster};

const WAIT: Duration = Duration::from_secs(30);

fn b(s: impl AsRef<[u8]>) -> Bytes {
    Bytes::copy_from_slice(s.as_ref())
}

fn change(kind: Kind, replica_id: u64, node_id: u64) -> ReplicaChange {
    ReplicaChange {
        kind: kind as i32,
        replica_id,
        node_id,
    }
}

/// Four nodes; the one shard starts on nodes 1-3.
async fn four_nodes() -> TestCluster {
    let c = TestCluster::builder(4)
        .shards(1)
        .configure(|cfg| {
            cfg.raftstore.raft_log_gc_ticks = 5;
            cfg.raftstore.raft_log_gc_threshold = 10;
            cfg.raftstore.raft_log_gc_count_limit = 100;
        })
        .start()
        .await;
    c.wait_leader(1, &[], WAIT).await;
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_replica_catches_up_by_snapshot_and_becomes_a_voter() {
    let c = four_nodes().await;
    assert!(c.router(4).meta().get(1).is_none());
    let client = c.client().await;
    for i in 0..300u32 {
        client.put(b(format!("k{i:04}")), b("v")).await.unwrap();
    }
    // Nothing older than the last few entries is left in the log.
    let leader = c.wait_leader(1, &[], WAIT).await;
    wait_until("log compacted", || async {
        c.replica_status(leader, 1).await.truncated_index > 100
    })
    .await;

    c.change_replicas(1, vec![change(Kind::AddLearner, 1001, 4)])
        .await
        .unwrap();
    wait_until("the learner installed a snapshot", || async {
        match c.router(4).meta().get(1) {
            Some(_) => c.replica_status(4, 1).await.truncated_index > 100,
            None => false,
        }
    })
    .await;
    let desc = c
        .change_replicas(1, vec![change(Kind::AddVoter, 1001, 4)])
        .await
        .unwrap();
    assert_eq!(desc.replicas.len(), 4);
    assert!(desc
        .replicas
        .iter()
        .all(|r| r.role == ReplicaRole::Voter as i32));
    assert_eq!(desc.epoch().conf_ver, 3);

    client.put(b("after"), b("x")).await.unwrap();
    let kv = c.server(4).kv_engine();
    wait_until("the new voter applies new writes", || async {
        kv.get(flotilla_storage::CF_DEFAULT, b"after")
            .unwrap()
            .is_some()
    })
    .await;
    assert_eq!(
        kv.scan(flotilla_storage::CF_DEFAULT, b"k", b"l", 1000, false)
            .unwrap()
            .0
            .len(),
        300
    );
    c.assert_replicas_identical(1).await;
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_is_replaced_atomically_and_the_removed_one_cleans_up() {
    let c = four_nodes().await;
    let client = c.client().await;
    for i in 0..50u32 {
        client.put(b(format!("k{i:04}")), b("v")).await.unwrap();
    }
    let leader = c.wait_leader(1, &[], WAIT).await;
    let desc = c.descriptor(leader, 1);
    let outgoing = desc.replicas.iter().find(|r| r.node_id != leader).unwrap();

    c.change_replicas(1, vec![change(Kind::AddLearner, 2001, 4)])
        .await
        .unwrap();
    wait_until("the learner caught up", || async {
        c.router(4).meta().get(1).is_some()
            && c.server(4)
                .kv_engine()
                .get(flotilla_storage::CF_DEFAULT, b"k0049")
                .unwrap()
                .is_some()
    })
    .await;
    // Promote the new replica and demote the old one in one joint change.
    c.change_replicas(
        1,
        vec![
            change(Kind::AddVoter, 2001, 4),
            change(Kind::DemoteToLearner, outgoing.id, outgoing.node_id),
        ],
    )
    .await
    .unwrap();
    // The joint configuration is left by itself.
    wait_until("joint configuration left", || async {
        let d = c.descriptor(leader, 1);
        d.replicas
            .iter()
            .all(|r| r.role == ReplicaRole::Voter as i32 || r.role == ReplicaRole::Learner as i32)
            && d.replica(outgoing.id).unwrap().role == ReplicaRole::Learner as i32
    })
    .await;
    c.change_replicas(1, vec![change(Kind::Remove, outgoing.id, outgoing.node_id)])
        .await
        .unwrap();

    // The removed replica destroys itself: no replica, no data, a tombstone.
    let gone = outgoing.node_id;
    wait_until("the removed replica is destroyed", || async {
        c.router(gone).meta().get(1).is_none()
    })
    .await;
    assert_eq!(
        c.server(gone)
            .kv_engine()
            .get(flotilla_storage::CF_DEFAULT, b"k0001")
            .unwrap(),
        None
    );
    let state = c.server(gone).kv_engine().shard_state(1).unwrap().unwrap();
    assert_eq!(
        state.state,
        flotilla_proto::local::ShardState::Tombstone as i32
    );

    // The shard goes on with its new members; late traffic does not bring
    // the removed replica back.
    for i in 50..80u32 {
        client.put(b(format!("k{i:04}")), b("v")).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(c.router(gone).meta().get(1).is_none());
    let d = c.descriptor(leader, 1);
    assert_eq!(d.replicas.len(), 3);
    assert!(d.replica_on(gone).is_none());
    c.assert_replicas_identical(1).await;
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn invalid_membership_changes_are_refused() {
    let c = four_nodes().await;
    let leader = c.wait_leader(1, &[], WAIT).await;
    let desc = c.descriptor(leader, 1);
    let leader_replica = desc.replica_on(leader).unwrap().id;
    let other = desc.replicas.iter().find(|r| r.node_id != leader).unwrap();
    // Two replicas on one node.
    let refused =
        |r: flotilla_raftstore::Result<_>| matches!(r, Err(flotilla_raftstore::Error::Rejected(_)));
    assert!(refused(
        c.change_replicas(1, vec![change(Kind::AddLearner, 3001, other.node_id)])
            .await
    ));
    // The leader removing itself.
    assert!(refused(
        c.change_replicas(1, vec![change(Kind::Remove, leader_replica, leader)])
            .await
    ));
    // A voter removed together with another change.
    assert!(refused(
        c.change_replicas(
            1,
            vec![
                change(Kind::Remove, other.id, other.node_id),
                change(Kind::AddLearner, 3002, 4)
            ]
        )
        .await
    ));
    // A replica named by a node that holds none.
    assert!(refused(
        c.change_replicas(1, vec![change(Kind::Remove, 0, 4)]).await
    ));
    // Nothing changed.
    let after = c.descriptor(leader, 1);
    assert_eq!(after.epoch(), desc.epoch());
    c.shutdown().await;
}
