//! The placement driver in an in-process cluster: nodes that join get their
//! share of replicas and leaders while writes go on; a node down longer
//! than max-down-time is replaced; decommission empties a node, which may
//! never come back under its id; placement goes on after the meta leader
//! dies; a replica removed while it was cut off cleans itself up.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use flotilla_client::Client;
use flotilla_storage::META_SHARD_ID;
use flotilla_test_cluster::{wait_until, TestCluster};

const WAIT: Duration = Duration::from_secs(60);

fn b(s: impl AsRef<[u8]>) -> Bytes {
    Bytes::copy_from_slice(s.as_ref())
}

/// Fast placement: heartbeats and rounds every 100 ms.
async fn cluster(nodes: usize, shards: usize, max_down_ms: u64) -> TestCluster {
    let c = TestCluster::builder(nodes)
        .shards(shards)
        .configure(move |cfg| {
            cfg.placement.heartbeat_interval_ms = 100;
            cfg.placement.schedule_interval_ms = 100;
            cfg.placement.max_down_time_ms = max_down_ms;
            cfg.placement.operator_timeout_ms = 30_000;
        })
        .start()
        .await;
    c.wait_all_leaders(WAIT).await;
    c
}

/// Replicas and leaders per running node, as the replicas themselves say
/// (user shards only).
fn counts(c: &TestCluster) -> (BTreeMap<u64, usize>, BTreeMap<u64, usize>) {
    let mut replicas = BTreeMap::new();
    let mut leaders = BTreeMap::new();
    for n in c.running() {
        let all = c.router(n).meta().all();
        let user: Vec<_> = all
            .iter()
            .filter(|m| m.descriptor.id != META_SHARD_ID && !m.descriptor.replicas.is_empty())
            .collect();
        replicas.insert(n, user.len());
        leaders.insert(n, user.iter().filter(|m| m.is_leader()).count());
    }
    (replicas, leaders)
}

fn within(counts: &BTreeMap<u64, usize>, total: usize, pct: f64) -> bool {
    let even = total as f64 / counts.len() as f64;
    let slack = (even * pct / 100.0).max(1.0);
    counts.values().all(|&c| (c as f64 - even).abs() <= slack)
}

/// What a writer saw: acknowledged writes and errors.
type Written = (BTreeMap<Bytes, Bytes>, Vec<String>);

/// Writers putting unique keys until stopped; every error is a failure.
fn spawn_writers(
    client: &Client,
    n: usize,
    stop: Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<Written>> {
    (0..n)
        .map(|w| {
            let client = client.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut acked = BTreeMap::new();
                let mut errors = Vec::new();
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    // Spread over the whole key space (two-byte prefixes).
                    let h = (i.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 48) as u16;
                    let key = [&h.to_be_bytes()[..], format!("w{w}-{i}").as_bytes()].concat();
                    let key = Bytes::from(key);
                    match client.put(key.clone(), b("v")).await {
                        Ok(()) => {
                            acked.insert(key, b("v"));
                        }
                        Err(e) => errors.push(e.to_string()),
                    }
                    i += 1;
                }
                (acked, errors)
            })
        })
        .collect()
}

/// Every shard has `want` replicas, all on running nodes.
fn fully_replicated(c: &TestCluster, want: usize) -> bool {
    let running = c.running();
    let mut shards: HashMap<u64, Vec<u64>> = HashMap::new();
    for n in &running {
        for m in c.router(*n).meta().all() {
            if m.descriptor.id == META_SHARD_ID || m.descriptor.replicas.is_empty() {
                continue;
            }
            let nodes: Vec<u64> = m.descriptor.replicas.iter().map(|r| r.node_id).collect();
            shards.insert(m.descriptor.id, nodes);
        }
    }
    !shards.is_empty()
        && shards
            .values()
            .all(|nodes| nodes.len() == want && nodes.iter().all(|n| running.contains(n)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_joining_nodes_get_an_even_share_while_writes_go_on() {
    let mut c = cluster(3, 64, 60_000).await;
    let client = c.client().await;
    let stop = Arc::new(AtomicBool::new(false));
    let writers = spawn_writers(&client, 4, stop.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;

    c.join_node(4, "").await.unwrap();
    c.join_node(5, "").await.unwrap();
    let started = std::time::Instant::now();
    let deadline = started + Duration::from_secs(90);
    loop {
        let (replicas, leaders) = counts(&c);
        if within(&replicas, 64 * 3, 10.0) && within(&leaders, 64, 10.0) {
            eprintln!(
                "balanced after {:?}: replicas {replicas:?}, leaders {leaders:?}",
                started.elapsed()
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not balanced: replicas {replicas:?}, leaders {leaders:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The meta shard grew to five replicas with the cluster.
    wait_until("the meta shard has five replicas", || async {
        c.router(c.leader_of(META_SHARD_ID).unwrap_or(1))
            .meta()
            .get(META_SHARD_ID)
            .is_some_and(|m| m.descriptor.replicas.len() == 5)
    })
    .await;

    stop.store(true, Ordering::Relaxed);
    let mut acked = BTreeMap::new();
    let mut errors = Vec::new();
    for w in writers {
        let (a, e) = w.await.unwrap();
        acked.extend(a);
        errors.extend(e);
    }
    assert!(errors.is_empty(), "client-visible errors: {errors:?}");
    let got: BTreeMap<Bytes, Bytes> = client
        .scan(b(""), b(""), 1_000_000, false)
        .await
        .unwrap()
        .into_iter()
        .map(|p| (p.key, p.value))
        .collect();
    for k in acked.keys() {
        assert!(got.contains_key(k), "acknowledged write {k:?} lost");
    }
    let ops = client.list_operators().await.unwrap();
    assert!(ops
        .iter()
        .any(|o| o.kind == "move-replica" && o.status == "done"));
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_down_past_max_down_time_is_replaced() {
    let mut c = cluster(4, 16, 1500).await;
    let client = c.client().await;
    for i in 0..200u32 {
        client.put(b(format!("k{i:04}")), b("v")).await.unwrap();
    }
    let victim = 2;
    c.stop_node(victim).await;
    wait_until("every shard has 3 replicas on running nodes", || async {
        fully_replicated(&c, 3)
    })
    .await;
    let nodes = client.list_nodes().await.unwrap();
    let down = nodes
        .iter()
        .find(|n| n.node.as_ref().unwrap().id == victim)
        .unwrap();
    assert_eq!(down.liveness, "down");
    for i in (0..200u32).step_by(7) {
        assert_eq!(
            client.get(b(format!("k{i:04}"))).await.unwrap(),
            Some(b("v"))
        );
    }
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn decommission_empties_a_node_that_may_never_come_back() {
    let mut c = cluster(4, 16, 60_000).await;
    let client = c.client().await;
    for i in 0..100u32 {
        client.put(b(format!("k{i:04}")), b("v")).await.unwrap();
    }
    // Node 1 holds meta shard replicas and probably leads it.
    let n = client.decommission_node(1).await.unwrap();
    assert_eq!(n.state(), flotilla_proto::meta::NodeState::Decommissioning);
    wait_until("node 1 is removed", || async {
        client.list_nodes().await.is_ok_and(|nodes| {
            nodes.iter().any(|i| {
                let n = i.node.as_ref().unwrap();
                n.id == 1 && n.state() == flotilla_proto::meta::NodeState::Removed
            })
        })
    })
    .await;
    wait_until("node 1 holds nothing", || async {
        c.router(1).meta().all().is_empty()
    })
    .await;
    assert!(fully_replicated(&c, 3));
    for i in 0..100u32 {
        assert_eq!(
            client.get(b(format!("k{i:04}"))).await.unwrap(),
            Some(b("v"))
        );
    }
    // The node hears it from its next heartbeat and refuses requests: the
    // registry write invalidated the record the meta leader answered its
    // heartbeats with.
    let kv = flotilla_proto::kv::kv_client::KvClient::connect(format!("http://{}", c.grpc_addr(1)))
        .await
        .unwrap();
    wait_until("node 1 refuses requests", || {
        let mut kv = kv.clone();
        async move {
            let get = flotilla_proto::kv::GetRequest {
                context: None,
                key: b("k0000"),
            };
            kv.get(get)
                .await
                .is_err_and(|s| s.message().contains("was removed from the cluster"))
        }
    })
    .await;
    drop(kv);
    // The removed id cannot join again, even with an empty data dir.
    c.stop_node(1).await;
    let err = c.join_node(1, "").await.unwrap_err().to_string();
    assert!(err.contains("already taken"), "{err}");
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn placement_goes_on_after_the_meta_leader_dies() {
    let mut c = cluster(4, 8, 1500).await;
    let meta_leader = c.wait_leader(META_SHARD_ID, &[], WAIT).await;
    c.stop_node(meta_leader).await;
    // Another node takes over the meta shard and replaces the dead one's
    // replicas (the meta shard's too).
    wait_until("every shard has 3 replicas on running nodes", || async {
        fully_replicated(&c, 3)
    })
    .await;
    wait_until(
        "the meta shard lives on the three running nodes",
        || async {
            c.leader_of(META_SHARD_ID).is_some_and(|l| {
                c.router(l).meta().get(META_SHARD_ID).is_some_and(|m| {
                    m.descriptor.replicas.len() == 3
                        && m.descriptor.replica_on(meta_leader).is_none()
                })
            })
        },
    )
    .await;
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_removed_while_cut_off_cleans_itself_up() {
    let mut c = cluster(4, 1, 60_000).await;
    let client = c.client().await;
    for i in 0..50u32 {
        client.put(b(format!("k{i:04}")), b("v")).await.unwrap();
    }
    let holders: Vec<u64> = c
        .router(1)
        .meta()
        .get(1)
        .unwrap()
        .descriptor
        .replicas
        .iter()
        .map(|r| r.node_id)
        .collect();
    let leader = c.wait_leader(1, &[], WAIT).await;
    let cut = *holders.iter().find(|n| **n != leader).unwrap();
    let spare = *c.node_ids().iter().find(|n| !holders.contains(n)).unwrap();
    wait_until("the cut node applied the writes", || async {
        c.server(cut)
            .kv_engine()
            .get(flotilla_storage::CF_DEFAULT, b"k0049")
            .unwrap()
            .is_some()
    })
    .await;
    // Raft cannot reach the cut node; its heartbeats to the meta shard
    // still go through (the filter only drops raft messages).
    c.isolate(cut);
    client.move_replica(1, cut, spare).await.unwrap();
    wait_until("the cut-off replica destroys itself", || async {
        c.router(cut).meta().get(1).is_none()
    })
    .await;
    assert_eq!(
        c.server(cut)
            .kv_engine()
            .get(flotilla_storage::CF_DEFAULT, b"k0001")
            .unwrap(),
        None
    );
    c.heal();
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_spread_over_zones_first() {
    let c = TestCluster::builder(4)
        .shards(8)
        .configure(|cfg| {
            cfg.placement.heartbeat_interval_ms = 100;
            cfg.placement.schedule_interval_ms = 100;
            cfg.server.labels = match cfg.server.node_id {
                1 | 2 => "zone=a",
                3 => "zone=b",
                _ => "zone=c",
            }
            .into();
        })
        .start()
        .await;
    c.wait_all_leaders(WAIT).await;
    let zone = |n: u64| match n {
        1 | 2 => "a",
        3 => "b",
        _ => "c",
    };
    // The bootstrap layout puts some shards on nodes 1 and 2, both in zone
    // a; the placement driver moves one of them to zone c.
    wait_until("every shard spans three zones", || async {
        let mut zones: HashMap<u64, Vec<&str>> = HashMap::new();
        for n in c.running() {
            for m in c.router(n).meta().all() {
                let d = m.descriptor;
                if d.id != META_SHARD_ID && !d.replicas.is_empty() {
                    zones.insert(d.id, d.replicas.iter().map(|r| zone(r.node_id)).collect());
                }
            }
        }
        zones.len() == 8
            && zones.values().all(|z| {
                let mut z = z.clone();
                z.sort_unstable();
                z == ["a", "b", "c"]
            })
    })
    .await;
    let client = c.client().await;
    let nodes = client.list_nodes().await.unwrap();
    assert!(nodes
        .iter()
        .all(|n| n.node.as_ref().unwrap().labels.contains_key("zone")));
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leaders_come_back_to_a_restarted_node_without_overshooting() {
    let shards = 24;
    let mut c = cluster(3, shards, 600_000).await;
    c.stop_node(3).await;
    for s in 1..=shards as u64 {
        c.wait_leader(s, &[1, 2], WAIT).await;
    }
    c.restart_node(3).await;
    wait_until("leaders spread over the three nodes again", || {
        let (_, leaders) = counts(&c);
        async move { leaders.len() == 3 && within(&leaders, shards, 0.0) }
    })
    .await;
    // Balanced, it stays so: no round moves more leaders than the imbalance
    // it sees (led lists lag the transfers a round started or finished).
    for _ in 0..40 {
        let (_, leaders) = counts(&c);
        assert!(
            leaders.values().all(|&n| n <= shards / 3 + 2),
            "a node took more than its share: {leaders:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    c.shutdown().await;
}

/// Idle nodes' heartbeats bring the registry records the meta leader last
/// confirmed: they are answered without reading (and so waking) the meta
/// shard, except every tenth interval; a change still reaches the node (see
/// the decommission test).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_heartbeats_leave_the_meta_shard_unread() {
    let c = cluster(3, 2, 60_000).await;
    let checks = |answer: &str| {
        flotilla_server::metrics::META_REGISTRY_CHECKS
            .with_label_values(&[answer])
            .get()
    };
    // Other tests of this binary run clusters too: only growth counts.
    let cached = checks("cached");
    wait_until(
        "30 heartbeats answered from the confirmed records",
        || async { checks("cached") >= cached + 30 },
    )
    .await;
    c.shutdown().await;
}
