//! In-process cluster scenarios: real RocksDB, raft-engine and gRPC on
//! loopback; links cut with transport filters; nodes stopped and restarted
//! on their data. Each test says what a client sees.

use std::time::{Duration, Instant};

use bytes::Bytes;
use flotilla_raftstore::Error as StoreError;
use flotilla_test_cluster::TestCluster;

const WAIT: Duration = Duration::from_secs(20);

fn b(s: impl AsRef<[u8]>) -> Bytes {
    Bytes::copy_from_slice(s.as_ref())
}

/// Waits until `node`'s RocksDB holds `value` under `key`.
/// Waits until the leaders on `nodes` count `want` replicas down in all
/// (what `flotilla_replicas_down` exports).
async fn wait_down_replicas(c: &TestCluster, nodes: &[u64], want: usize) {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let down: usize = nodes
            .iter()
            .map(|&n| c.router(n).meta().counts().down_replicas)
            .sum();
        if down == want {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{down} replicas down, want {want}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_local_value(c: &TestCluster, node: u64, key: &[u8], value: Option<&[u8]>) {
    let deadline = Instant::now() + WAIT;
    loop {
        let got = c
            .server(node)
            .kv_engine()
            .get(flotilla_storage::CF_DEFAULT, key)
            .unwrap();
        if got.as_deref() == value {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "node {node} has {got:?} for {key:?}, expected {value:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writes_replicate_to_all_three_nodes() {
    let c = TestCluster::builder(3).start().await;
    c.wait_all_leaders(WAIT).await;
    let client = c.client().await;
    for i in 0..50u32 {
        // Keys spread over every shard.
        let key = [(i * 5) as u8, b'k'];
        client.put(b(key), b(format!("v{i}"))).await.unwrap();
    }
    for i in 0..50u32 {
        let key = [(i * 5) as u8, b'k'];
        let v = format!("v{i}");
        assert_eq!(client.get(b(key)).await.unwrap(), Some(b(&v)));
        for node in c.node_ids() {
            wait_local_value(&c, node, &key, Some(v.as_bytes())).await;
        }
    }
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn api_operations_cross_shards_in_order() {
    let c = TestCluster::builder(3).shards(4).start().await;
    c.wait_all_leaders(WAIT).await;
    let client = c.client().await;

    // Batch put across all 4 shards, then read back in one batch.
    let pairs: Vec<(Bytes, Bytes)> = (0..=255u8).map(|i| (b([i, 1]), b([i]))).collect();
    client.batch_put(pairs.clone()).await.unwrap();
    let mut got = client
        .batch_get(
            pairs
                .iter()
                .map(|(k, _)| k.clone())
                .chain([b("absent")])
                .collect(),
        )
        .await
        .unwrap();
    got.sort_by(|a, b| a.key.cmp(&b.key));
    assert_eq!(got.len(), 256);
    assert!(got
        .iter()
        .zip(&pairs)
        .all(|(g, (k, v))| g.key == *k && g.value == *v));

    // A scan crossing every shard is one ordered result, forward and back.
    let all = client.scan(b(""), b(""), 1000, false).await.unwrap();
    assert_eq!(all.len(), 256);
    assert!(all.windows(2).all(|w| w[0].key < w[1].key));
    let back = client.scan(b(""), b(""), 1000, true).await.unwrap();
    assert_eq!(back.len(), 256);
    assert!(back.windows(2).all(|w| w[0].key > w[1].key));
    let some = client.scan(b([0x30]), b([0xa0]), 20, false).await.unwrap();
    assert_eq!(some.first().unwrap().key, b([0x30, 1]));
    assert_eq!(some.len(), 20);
    let tail = client.scan(b([0x30]), b([0xa0]), 5, true).await.unwrap();
    assert_eq!(tail.first().unwrap().key, b([0x9f, 1]));
    assert_eq!(tail.len(), 5);
    // Limits longer than a shard's share force pagination inside shards.
    let range = client
        .scan(b([0x10]), b([0xf0]), 10_000, false)
        .await
        .unwrap();
    assert_eq!(range.len(), 0xf0 - 0x10);

    // DeleteRange over several shards leaves the rest.
    client.delete_range(b([0x20]), b([0xc0])).await.unwrap();
    let left = client.scan(b(""), b(""), 1000, false).await.unwrap();
    assert_eq!(left.len(), 256 - (0xc0 - 0x20));
    assert!(left.iter().all(|p| p.key[0] < 0x20 || p.key[0] >= 0xc0));
    // An open-ended DeleteRange reaches the last shard's end.
    client.delete_range(b([0xf0]), b("")).await.unwrap();
    assert_eq!(
        client
            .scan(b([0xf0]), b(""), 100, false)
            .await
            .unwrap()
            .len(),
        0
    );

    // CompareAndSwap: absent → set, wrong expectation fails, delete.
    let k = b("counter");
    let r = client
        .compare_and_swap(k.clone(), None, Some(b("1")))
        .await
        .unwrap();
    assert!(r.succeeded && r.previous.is_none());
    let r = client
        .compare_and_swap(k.clone(), None, Some(b("x")))
        .await
        .unwrap();
    assert!(!r.succeeded);
    assert_eq!(r.previous, Some(b("1")));
    let r = client
        .compare_and_swap(k.clone(), Some(b("1")), None)
        .await
        .unwrap();
    assert!(r.succeeded);
    assert_eq!(client.get(k.clone()).await.unwrap(), None);
    client.delete(b([0x00, 1])).await.unwrap();
    assert_eq!(client.get(b([0x00, 1])).await.unwrap(), None);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_cas_increments_are_applied_exactly_once() {
    let c = TestCluster::builder(3).shards(2).start().await;
    c.wait_all_leaders(WAIT).await;
    let client = c.client().await;
    let key = b("cas-counter");
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let client = client.clone();
        let key = key.clone();
        tasks.push(tokio::spawn(async move {
            let mut done = 0;
            while done < 25 {
                let cur = client.get(key.clone()).await.unwrap();
                let n: u64 = cur
                    .as_ref()
                    .map(|v| std::str::from_utf8(v).unwrap().parse().unwrap())
                    .unwrap_or(0);
                let r = client
                    .compare_and_swap(key.clone(), cur, Some(b((n + 1).to_string())))
                    .await
                    .unwrap();
                if r.succeeded {
                    done += 1;
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(client.get(key).await.unwrap(), Some(b("200")));
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn isolated_leader_is_replaced_and_its_pending_proposals_fail() {
    let mut c = TestCluster::builder(3).shards(1).start().await;
    let old = c.wait_leader(1, &[], WAIT).await;
    let client = c.client().await;
    client.put(b("before"), b("1")).await.unwrap();

    c.isolate(old);
    // The old leader accepts a proposal it can no longer commit.
    let pending = c.direct_put(old, 1, b"orphan", b"direct");

    let others: Vec<_> = c.node_ids().into_iter().filter(|n| *n != old).collect();
    let new = c.wait_leader(1, &others, WAIT).await;
    assert_ne!(new, old);
    // Clients keep writing through the new leader. A first attempt may
    // reach the old leader, which cannot commit it: Indeterminate.
    flotilla_test_cluster::put_acked(&client, b("after"), b("2")).await;
    assert_eq!(client.get(b("after")).await.unwrap(), Some(b("2")));

    // The orphaned proposal is answered with an error, never left hanging.
    let r = tokio::time::timeout(WAIT, pending)
        .await
        .expect("pending proposal answered")
        .expect("callback not dropped");
    match r {
        Err(StoreError::Indeterminate(_))
        | Err(StoreError::StaleCommand(_))
        | Err(StoreError::NotLeader { .. }) => {}
        other => panic!("expected an error for the orphaned proposal, got {other:?}"),
    }

    c.heal();
    // The old leader rejoins as a follower and catches up.
    wait_local_value(&c, old, b"after", Some(b"2")).await;
    assert_eq!(
        c.server(old)
            .kv_engine()
            .get(flotilla_storage::CF_DEFAULT, b"orphan")
            .unwrap(),
        None
    );
    assert_eq!(client.get(b("orphan")).await.unwrap(), None);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_minority_side_cannot_write() {
    let mut c = TestCluster::builder(3).shards(1).start().await;
    c.wait_all_leaders(WAIT).await;
    let leader = c.wait_leader(1, &[], WAIT).await;
    c.isolate(leader);
    let others: Vec<_> = c.node_ids().into_iter().filter(|n| *n != leader).collect();
    c.wait_leader(1, &others, WAIT).await;

    // A write that reaches only the minority node never commits there.
    let r = minority_put(&c, leader).await;
    assert!(r.is_err(), "the minority accepted a write: {r:?}");

    c.heal();
    let client = c.client().await;
    assert_eq!(client.get(b("minority")).await.unwrap(), None);
    c.shutdown().await;
}

/// Sends a put to the minority node's replica directly and waits for the
/// outcome.
async fn minority_put(c: &TestCluster, node: u64) -> flotilla_raftstore::Result<()> {
    let rx = c.direct_put(node, 1, b"minority", b"direct");
    match tokio::time::timeout(WAIT, rx).await {
        Ok(Ok(r)) => r.map(|_| ()),
        Ok(Err(_)) => Err(StoreError::Shutdown),
        Err(_) => panic!("minority write left hanging"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stopped_node_restarts_on_its_data_and_catches_up() {
    let mut c = TestCluster::builder(3).shards(2).start().await;
    c.wait_all_leaders(WAIT).await;
    let client = c.client().await;
    client.put(b("early"), b("1")).await.unwrap();
    wait_local_value(&c, 3, b"early", Some(b"1")).await;

    c.stop_node(3).await;
    for i in 0..100u32 {
        client
            .put(b(format!("k{i:03}")), b(format!("v{i}")))
            .await
            .unwrap();
    }
    // The leaders (now on nodes 1 and 2) report node 3's replicas down:
    // one per shard, and one of the meta shard.
    wait_down_replicas(&c, &[1, 2], 3).await;
    c.restart_node(3).await;
    wait_down_replicas(&c, &[1, 2, 3], 0).await;
    for i in 0..100u32 {
        wait_local_value(
            &c,
            3,
            format!("k{i:03}").as_bytes(),
            Some(format!("v{i}").as_bytes()),
        )
        .await;
    }
    assert_eq!(
        c.server(3)
            .kv_engine()
            .get(flotilla_storage::CF_DEFAULT, b"early")
            .unwrap(),
        Some(b"1".to_vec())
    );

    // The whole cluster restarts on its data and serves everything.
    for n in c.node_ids() {
        c.stop_node(n).await;
    }
    for n in c.node_ids() {
        c.restart_node(n).await;
    }
    c.wait_all_leaders(WAIT).await;
    let client = c.client().await;
    assert_eq!(client.get(b("k042")).await.unwrap(), Some(b("v42")));
    assert_eq!(
        client
            .scan(b("k"), b("l"), 1000, false)
            .await
            .unwrap()
            .len(),
        100
    );
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixty_four_shards_on_three_nodes_all_elect_and_serve() {
    let c = TestCluster::builder(3).shards(64).start().await;
    c.wait_all_leaders(Duration::from_secs(30)).await;
    // Leaders are spread: the bootstrap layout rotates the first replica.
    let mut per_node = std::collections::BTreeMap::new();
    for shard in 1..=64 {
        *per_node.entry(c.leader_of(shard).unwrap()).or_insert(0) += 1;
    }
    assert_eq!(per_node.len(), 3, "leaders on every node: {per_node:?}");
    let client = c.client().await;
    let shards = client.list_shards().await.unwrap();
    assert_eq!(shards.len(), 64);
    for s in &shards {
        let key = s.descriptor.start_key.clone();
        let key = if key.is_empty() { b("\0") } else { key };
        client
            .put(key.clone(), b(s.descriptor.id.to_string()))
            .await
            .unwrap();
    }
    for s in &shards {
        let key = s.descriptor.start_key.clone();
        let key = if key.is_empty() { b("\0") } else { key };
        assert_eq!(
            client.get(key).await.unwrap(),
            Some(b(s.descriptor.id.to_string()))
        );
    }
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn delayed_and_one_way_links_slow_but_do_not_break_replication() {
    use flotilla_test_cluster::FilterDecision;
    use std::sync::Arc;
    let mut c = TestCluster::builder(3).shards(1).start().await;
    let leader = c.wait_leader(1, &[], WAIT).await;
    let client = c.client().await;
    client.put(b("k0"), b("v0")).await.unwrap();

    // Every message is delayed by 30 ms: writes still commit, just slower.
    c.add_filter(Arc::new(|_: &flotilla_raftstore::RaftMessage| {
        FilterDecision::Delay(Duration::from_millis(30))
    }));
    let t = Instant::now();
    client.put(b("k1"), b("v1")).await.unwrap();
    assert!(
        t.elapsed() >= Duration::from_millis(30),
        "the delay was applied"
    );
    c.heal();

    // Cut one follower's outbound link only: it still receives appends (and
    // applies them once the commit index reaches it) but cannot answer.
    let follower = c.node_ids().into_iter().find(|n| *n != leader).unwrap();
    c.add_filter(Arc::new(move |m: &flotilla_raftstore::RaftMessage| {
        if m.from_node == follower {
            FilterDecision::Drop
        } else {
            FilterDecision::Pass
        }
    }));
    for i in 2..20 {
        client
            .put(b(format!("k{i}")), b(format!("v{i}")))
            .await
            .unwrap();
    }
    wait_local_value(&c, follower, b"k19", Some(b"v19")).await;
    c.heal();
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leadership_is_not_handed_to_a_replica_that_stopped_answering() {
    let mut c = TestCluster::builder(3).shards(1).start().await;
    c.wait_all_leaders(WAIT).await;
    let client = c.client().await;
    client.put(b("before"), b("1")).await.unwrap();
    let leader = c.wait_leader(1, &[], WAIT).await;
    let dead = *c.node_ids().iter().find(|n| **n != leader).unwrap();
    let to = c
        .router(leader)
        .meta()
        .get(1)
        .unwrap()
        .descriptor
        .replica_on(dead)
        .unwrap()
        .id;
    c.stop_node(dead).await;
    // Well past two heartbeat intervals (20 ms ticks).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (tx, rx) = tokio::sync::oneshot::channel();
    c.router(leader)
        .transfer_leader(
            1,
            to,
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        )
        .unwrap();
    match rx.await.unwrap() {
        Err(StoreError::Rejected(why)) => assert!(why.contains("not answered"), "{why}"),
        other => panic!("transfer to a stopped replica: {other:?}"),
    }
    // The shard never stopped taking writes.
    client.put(b("after"), b("2")).await.unwrap();
    assert_eq!(c.leader_of(1), Some(leader));
    c.shutdown().await;
}
