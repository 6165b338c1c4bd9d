//! Read paths in an in-process cluster whose links can be cut or delayed:
//! - a leader cut off from the others answers from its lease only until the
//!   lease ends: once a new leader took writes, no linearizable read on the
//!   old one returns the old value;
//! - a follower read on a lagging follower waits until it has every write
//!   acknowledged before the read began (a stale read there does not);
//! - reads in every linearizable mode, issued while leadership moves back
//!   and forth, never go back in time.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use flotilla_client::ReadMode;
use flotilla_proto::kv::kv_client::KvClient;
use flotilla_proto::kv::{GetRequest, ShardContext};
use flotilla_raftstore::{NodeId, RaftMessage};
use flotilla_test_cluster::{FilterDecision, TestCluster};

const WAIT: Duration = Duration::from_secs(30);

/// Reads `key` of shard 1 on `node` itself (no routing, no retry) in `mode`,
/// giving up after `timeout`.
async fn get_on(
    c: &TestCluster,
    node: NodeId,
    key: &str,
    mode: ReadMode,
    timeout: Duration,
) -> Result<Option<String>, String> {
    let epoch = c
        .router(node)
        .meta()
        .get(1)
        .and_then(|m| m.descriptor.epoch);
    let mut kv = KvClient::connect(format!("http://{}", c.grpc_addr(node)))
        .await
        .map_err(|e| e.to_string())?;
    let req = GetRequest {
        context: Some(ShardContext {
            shard_id: 1,
            epoch,
            replica_id: 0,
            read_mode: mode as i32,
        }),
        key: Bytes::from(key.to_string()),
    };
    let r = match tokio::time::timeout(timeout, kv.get(req)).await {
        Err(_) => return Err("no answer in time".into()),
        Ok(Err(status)) => return Err(status.to_string()),
        Ok(Ok(r)) => r.into_inner(),
    };
    match r.error {
        Some(e) => Err(e.message),
        None => Ok(r
            .found
            .then(|| String::from_utf8(r.value.to_vec()).unwrap())),
    }
}

fn some(v: &str) -> Result<Option<String>, String> {
    Ok(Some(v.to_string()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cut_off_leader_serves_lease_reads_only_until_its_lease_ends() {
    let mut c = TestCluster::builder(3).shards(1).start().await;
    let client = c.client().await;
    let short = Duration::from_millis(300);

    // A write renews the leader's lease (it committed through a quorum);
    // right after, cut the leader off. Inside the lease it still answers,
    // alone: only the lease can do that. (Retried, in case a slow machine
    // let the lease lapse before the read.)
    let mut old = 0;
    for attempt in 0.. {
        assert!(
            attempt < 5,
            "the cut-off leader never answered from its lease"
        );
        c.heal();
        old = c.wait_leader(1, &[], WAIT).await;
        client
            .put(Bytes::from("k"), Bytes::from("v1"))
            .await
            .unwrap();
        c.isolate(old);
        if get_on(&c, old, "k", ReadMode::Leader, short).await == some("v1") {
            break;
        }
    }
    // A quorum round cannot complete without the others.
    assert!(get_on(&c, old, "k", ReadMode::LeaderReadIndex, short)
        .await
        .is_err());

    // The others elect a leader and take a write.
    let others: Vec<NodeId> = c.node_ids().into_iter().filter(|n| *n != old).collect();
    let new = c.wait_leader(1, &others, WAIT).await;
    // (A first attempt may reach the old leader: Indeterminate.)
    flotilla_test_cluster::put_acked(&client, "k", "v2").await;

    // The old leader's lease ended before the new leader could exist: no
    // linearizable read there returns v1 (they fail or time out).
    let t = Instant::now();
    for mode in [
        ReadMode::Leader,
        ReadMode::LeaderReadIndex,
        ReadMode::Follower,
    ] {
        let r = get_on(&c, old, "k", mode, Duration::from_secs(2)).await;
        assert!(
            r.is_err(),
            "{mode:?} read on the cut-off old leader returned {r:?}"
        );
    }
    assert!(t.elapsed() < Duration::from_secs(10));
    // A stale read says what it has: the old value.
    assert_eq!(
        get_on(&c, old, "k", ReadMode::Stale, short).await,
        some("v1")
    );
    // On the new leader, the new value, from any mode.
    for mode in [
        ReadMode::Leader,
        ReadMode::LeaderReadIndex,
        ReadMode::Follower,
    ] {
        assert_eq!(get_on(&c, new, "k", mode, WAIT).await, some("v2"));
    }

    // Healed, the old leader's replica catches up and serves follower reads.
    c.heal();
    flotilla_test_cluster::wait_until("the old leader serves v2 as a follower", || async {
        get_on(&c, old, "k", ReadMode::Follower, short).await == some("v2")
    })
    .await;
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn follower_reads_on_a_lagging_follower_see_every_acknowledged_write() {
    let mut c = TestCluster::builder(3).shards(1).start().await;
    let leader = c.wait_leader(1, &[], WAIT).await;
    let follower = c.node_ids().into_iter().find(|n| *n != leader).unwrap();
    let client = c.client().await;
    client
        .put(Bytes::from("k"), Bytes::from("0"))
        .await
        .unwrap();

    // Everything sent to the follower arrives 100 ms late (half the test
    // cluster's election timeout, so it keeps its leader): writes commit
    // without it, and it applies them late.
    c.add_filter(Arc::new(move |m: &RaftMessage| {
        if m.to_node == follower {
            FilterDecision::Delay(Duration::from_millis(100))
        } else {
            FilterDecision::Pass
        }
    }));
    let mut stale_behind = 0;
    for i in 1..=5 {
        let v = i.to_string();
        client
            .put(Bytes::from("k"), Bytes::from(v.clone()))
            .await
            .unwrap();
        let stale = get_on(&c, follower, "k", ReadMode::Stale, WAIT).await;
        if stale != some(&v) {
            stale_behind += 1;
        }
        assert_eq!(
            get_on(&c, follower, "k", ReadMode::Follower, WAIT).await,
            some(&v),
            "a follower read missed write {i}, acknowledged before it began"
        );
    }
    assert!(
        stale_behind > 0,
        "the follower never lagged: the test shows nothing"
    );
    c.heal();
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reads_during_leader_transfers_never_go_back() {
    let c = TestCluster::builder(3).shards(1).start().await;
    c.wait_all_leaders(WAIT).await;
    let client = c.client().await;
    let key = Bytes::from_static(b"counter");
    client.put(key.clone(), Bytes::from("0")).await.unwrap();

    let acked = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (client, key, acked, stop) = (client.clone(), key.clone(), acked.clone(), stop.clone());
        tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                // A failed write may still apply later; only acks count.
                if client
                    .put(key.clone(), Bytes::from(n.to_string()))
                    .await
                    .is_ok()
                {
                    acked.store(n, Ordering::SeqCst);
                }
            }
        })
    };
    let mut readers = Vec::new();
    let modes = [
        ReadMode::Leader,
        ReadMode::LeaderReadIndex,
        ReadMode::Follower,
        ReadMode::Leader,
    ];
    for mode in modes {
        let client = client.with_read_mode(mode);
        let (key, acked, stop) = (key.clone(), acked.clone(), stop.clone());
        readers.push(tokio::spawn(async move {
            let mut reads = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let floor = acked.load(Ordering::SeqCst);
                let Ok(Some(v)) = client.get(key.clone()).await else {
                    continue;
                };
                let seen: u64 = std::str::from_utf8(&v).unwrap().parse().unwrap();
                assert!(
                    seen >= floor,
                    "{mode:?} read {seen} after write {floor} was acknowledged"
                );
                reads += 1;
            }
            reads
        }));
    }

    // Move leadership around every replica a few times.
    for round in 0..6u64 {
        let to = round % 3 + 1;
        client.transfer_leader(1, to).await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    let mut reads = 0;
    for r in readers {
        reads += r.await.unwrap();
    }
    assert!(reads > 100, "only {reads} reads completed");
    assert!(acked.load(Ordering::SeqCst) > 50);
    c.shutdown().await;
}
