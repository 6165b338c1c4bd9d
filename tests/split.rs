//! Splits and the meta shard in an in-process cluster: a split under
//! concurrent writes and scans loses nothing; a client holding the old
//! route keeps working; a follower cut off during the split catches up and
//! creates its replica of the new shard; the meta shard's ids stay unique
//! when its leader dies; every node routes to shards it does not host.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use flotilla_storage::META_SHARD_ID;
use flotilla_test_cluster::{wait_until, TestCluster};

const WAIT: Duration = Duration::from_secs(30);

fn b(s: impl AsRef<[u8]>) -> Bytes {
    Bytes::copy_from_slice(s.as_ref())
}

async fn cluster(nodes: usize, shards: usize) -> TestCluster {
    let c = TestCluster::builder(nodes)
        .shards(shards)
        .configure(|cfg| cfg.placement.heartbeat_interval_ms = 200)
        .start()
        .await;
    c.wait_all_leaders(WAIT).await;
    c
}

/// Writers put `w{writer}-{i}` keys over the whole key space while the test
/// splits; returns each acknowledged key with its value.
fn spawn_writers(
    client: &flotilla_client::Client,
    writers: usize,
    stop: Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<BTreeMap<Bytes, Bytes>>> {
    (0..writers)
        .map(|w| {
            let client = client.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut acked = BTreeMap::new();
                let mut i = 0u32;
                while !stop.load(Ordering::Relaxed) {
                    // Spread keys over the letters, so every split has
                    // writes on both sides.
                    let key = b(format!("{}{w}-{i:06}", (b'a' + (i % 26) as u8) as char));
                    let value = b(format!("v{i}"));
                    match client.put(key.clone(), value.clone()).await {
                        Ok(()) => {
                            acked.insert(key, value);
                        }
                        Err(e) => panic!("put {key:?} failed during splits: {e}"),
                    }
                    i += 1;
                }
                acked
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn splits_under_concurrent_writes_and_scans_lose_nothing() {
    let c = cluster(3, 1).await;
    let client = c.client().await;
    // A second client whose routes are cached before the splits.
    let stale = c.client().await;
    stale.put(b("m-before"), b("1")).await.unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let writers = spawn_writers(&client, 4, stop.clone());
    // Scans run during the splits and must come back ordered without gaps
    // in what they saw before.
    let scanner = {
        let client = client.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut scans = 0;
            while !stop.load(Ordering::Relaxed) {
                let pairs = client.scan(b(""), b(""), 100_000, false).await.unwrap();
                assert!(
                    pairs.windows(2).all(|w| w[0].key < w[1].key),
                    "a scan across splitting shards came back out of order"
                );
                scans += 1;
            }
            scans
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (left, right) = client.split_shard(1, b("m")).await.unwrap();
    assert_eq!(left.id, 1);
    assert_eq!(left.end_key, b("m"));
    assert_eq!(right.start_key, b("m"));
    assert!(right.end_key.is_empty());
    assert_eq!(left.epoch.unwrap().version, 2);
    assert_eq!(right.epoch.unwrap().version, 2);
    assert_ne!(right.id, META_SHARD_ID);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_, r2) = client.split_shard(right.id, b("t")).await.unwrap();
    let (_, l2) = client.split_shard(1, b("f")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);

    let mut acked = BTreeMap::new();
    for w in writers {
        acked.extend(w.await.unwrap());
    }
    assert!(scanner.await.unwrap() > 0);
    assert!(
        acked.len() > 100,
        "only {} writes acknowledged",
        acked.len()
    );

    // Every acknowledged write is there, in order, across the four shards.
    let pairs = client.scan(b(""), b(""), 1_000_000, false).await.unwrap();
    let got: BTreeMap<Bytes, Bytes> = pairs.into_iter().map(|p| (p.key, p.value)).collect();
    for (k, v) in &acked {
        assert_eq!(got.get(k), Some(v), "acknowledged write of {k:?} lost");
    }
    // The client with the old route is told the new layout and retries.
    assert_eq!(stale.get(b("m-before")).await.unwrap(), Some(b("1")));
    stale.put(b("z-after"), b("2")).await.unwrap();
    assert_eq!(client.get(b("z-after")).await.unwrap(), Some(b("2")));

    // Four shards, distinct ids, contiguous ranges, on every node's route
    // table.
    let shards = client.list_shards().await.unwrap();
    let ids: Vec<u64> = shards.iter().map(|s| s.descriptor.id).collect();
    assert_eq!(ids, vec![1, l2.id, right.id, r2.id], "shards by start key");
    for w in shards.windows(2) {
        assert_eq!(w[0].descriptor.end_key, w[1].descriptor.start_key);
    }
    for id in ids {
        c.wait_leader(id, &[], WAIT).await;
        c.assert_replicas_identical(id).await;
    }
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_follower_cut_off_during_a_split_catches_up_and_creates_the_new_shard() {
    let mut c = cluster(3, 1).await;
    let client = c.client().await;
    for i in 0..200u32 {
        client.put(b(format!("k{i:04}")), b("v1")).await.unwrap();
    }
    let leader = c.wait_leader(1, &[], WAIT).await;
    let cut = *c.node_ids().iter().find(|n| **n != leader).unwrap();
    c.isolate(cut);
    let (_, right) = client.split_shard(1, b("k0100")).await.unwrap();
    for i in 0..200u32 {
        flotilla_test_cluster::put_acked(&client, b(format!("k{i:04}")), b("v2")).await;
    }
    assert!(c.router(cut).meta().get(right.id).is_none());
    c.heal();
    wait_until("the cut-off node applies the split", || async {
        c.router(cut).meta().get(right.id).is_some()
    })
    .await;
    for id in [1, right.id] {
        c.assert_replicas_identical(id).await;
    }
    // The rejoined node's replicas serve follower reads of the new data.
    let follower = client.with_read_mode(flotilla_proto::kv::ReadMode::Follower);
    for i in (0..200u32).step_by(17) {
        assert_eq!(
            follower.get(b(format!("k{i:04}"))).await.unwrap(),
            Some(b("v2"))
        );
    }
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ids_stay_unique_when_the_meta_leader_dies_and_nodes_route_new_shards() {
    let mut c = cluster(4, 2).await;
    let client = c.client().await;
    let (_, r1) = client.split_shard(1, b(b"\x40")).await.unwrap();
    let meta_leader = c.wait_leader(META_SHARD_ID, &[], WAIT).await;
    c.stop_node(meta_leader).await;
    let (_, r2) = client.split_shard(2, b(b"\xc0")).await.unwrap();
    let mut ids = vec![1, 2, r1.id, r2.id];
    ids.extend(r1.replicas.iter().chain(&r2.replicas).map(|r| r.id));
    let n = ids.len();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), n, "an id was handed out twice: {ids:?}");
    c.restart_node(meta_leader).await;

    // Every node's directory learns every shard from the meta shard, also
    // node 4, which hosts neither half of shard 1.
    for node in c.node_ids() {
        let nodes = flotilla_client::ClientConfig {
            endpoints: vec![c.grpc_addr(node)],
            ..Default::default()
        };
        let only = flotilla_client::Client::connect(nodes).await.unwrap();
        wait_until("a node lists the four shards", || async {
            only.list_shards().await.map(|s| s.len()).unwrap_or(0) == 4
        })
        .await;
    }
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shards_past_the_size_or_key_threshold_split_by_themselves() {
    let c = TestCluster::builder(3)
        .shards(1)
        .configure(|cfg| {
            cfg.placement.heartbeat_interval_ms = 200;
            cfg.placement.split_check_interval_ms = 200;
            cfg.placement.split_size_bytes = 64 << 10;
            cfg.placement.split_keys = 1000;
        })
        .start()
        .await;
    c.wait_all_leaders(WAIT).await;
    let client = c.client().await;
    // 4,000 keys of ~40 bytes: past the key threshold four times over.
    let mut expected = BTreeMap::new();
    for chunk in (0..4000u32).collect::<Vec<_>>().chunks(100) {
        let pairs: Vec<(Bytes, Bytes)> = chunk
            .iter()
            .map(|i| (b(format!("key{i:05}")), b(format!("value-{i:030}"))))
            .collect();
        client.batch_put(pairs.clone()).await.unwrap();
        expected.extend(pairs);
    }
    wait_until("the shard splits down to the key threshold", || async {
        let shards = client.list_shards().await.unwrap();
        shards.len() >= 4 && {
            let mut ok = true;
            for s in &shards {
                let d = &s.descriptor;
                let n = client
                    .scan(d.start_key.clone(), d.end_key.clone(), 10_000, false)
                    .await
                    .unwrap()
                    .len();
                ok &= n <= 1000;
            }
            ok
        }
    })
    .await;
    let got: BTreeMap<Bytes, Bytes> = client
        .scan(b(""), b(""), 10_000, false)
        .await
        .unwrap()
        .into_iter()
        .map(|p| (p.key, p.value))
        .collect();
    assert_eq!(got, expected);
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hot_shard_splits_at_the_middle_of_its_load() {
    let c = TestCluster::builder(3)
        .shards(1)
        .configure(|cfg| {
            cfg.placement.heartbeat_interval_ms = 200;
            cfg.placement.split_check_interval_ms = 500;
            cfg.placement.split_qps = 200;
        })
        .start()
        .await;
    c.wait_all_leaders(WAIT).await;
    let client = c.client().await;
    for i in 0..100u32 {
        client.put(b(format!("hot{i:03}")), b("v")).await.unwrap();
    }
    // Reads spread over hot000..hot099 from 8 clients: far past 200/s,
    // with no data worth a size split.
    let stop = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..8u32)
        .map(|r| {
            let client = client.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut i = r;
                while !stop.load(Ordering::Relaxed) {
                    let key = b(format!("hot{:03}", i % 100));
                    assert_eq!(client.get(key).await.unwrap(), Some(b("v")));
                    i += 7;
                }
            })
        })
        .collect();
    wait_until("the hot shard splits", || async {
        client.list_shards().await.unwrap().len() >= 2
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        r.await.unwrap();
    }
    let shards = client.list_shards().await.unwrap();
    // The split key lies among the hot keys, not at an end of the range.
    let cut = &shards[1].descriptor.start_key;
    assert!(
        cut > &b("hot010") && cut < &b("hot090"),
        "split at {cut:?}, away from the middle of the load"
    );
    assert_eq!(
        client.scan(b(""), b(""), 1000, false).await.unwrap().len(),
        100
    );
    c.shutdown().await;
}
