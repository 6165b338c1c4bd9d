//! End to end with real `flotilla-server` processes on free loopback ports:
//! the node leading the most shards is killed with SIGKILL while a client
//! writes; writes go on; the node restarts on its data; every acknowledged
//! write is read back. A node that joins with `--join` gets replicas while
//! writes go on, and a decommissioned node is emptied and may not rejoin.
//! Every node paused at once (SIGSTOP, as a VM pause does) calls no peer
//! down once resumed. `flotilla-bench wake` and `failover`, as `make
//! bench-scale` runs them, get every write answered.

mod common;

use std::os::unix::process::ExitStatusExt;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::ProcCluster;

/// The index of the node that leads the most shards.
async fn busiest_leader(cluster: &ProcCluster, client: &flotilla_client::Client) -> usize {
    let mut busiest = (0, 0);
    for (i, n) in cluster.nodes.iter().enumerate() {
        let s = client.node_status(&n.grpc).await.unwrap();
        if s.leaders >= busiest.1 {
            busiest = (i, s.leaders);
        }
    }
    busiest.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill9_the_busiest_leader_under_writes_loses_nothing() {
    let mut cluster = ProcCluster::new(3, 8, "");
    cluster.start_all();
    let client = cluster.client(Duration::from_secs(20)).await;

    let acked: Arc<Mutex<Vec<(Bytes, Bytes)>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..4u64 {
        let client = client.clone();
        let acked = acked.clone();
        let stop = stop.clone();
        writers.push(tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                // Keys spread over every shard.
                let n = (w << 32) | i;
                let key = Bytes::copy_from_slice(&n.wrapping_mul(0x9e3779b97f4a7c15).to_be_bytes());
                let value = Bytes::from(format!("w{w}-{i}"));
                if client.put(key.clone(), value.clone()).await.is_ok() {
                    acked.lock().unwrap().push((key, value));
                }
                i += 1;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // Kill -9 the node that leads the most shards.
    let victim = busiest_leader(&cluster, &client).await;
    let before_kill = acked.lock().unwrap().len();
    assert!(before_kill > 0, "no write acknowledged before the kill");
    cluster.nodes[victim].kill9();

    // Writes go on without the victim.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let now = acked.lock().unwrap().len();
        if now > before_kill + 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "writes stalled after the kill ({now} acked)"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The victim comes back on its data and catches up.
    cluster.nodes[victim].start();
    cluster.nodes[victim].wait_ready(Duration::from_secs(60));
    tokio::time::sleep(Duration::from_millis(1000)).await;
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }

    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() > before_kill + 200);
    let keys: Vec<Bytes> = acked.iter().map(|(k, _)| k.clone()).collect();
    let mut found = std::collections::HashMap::new();
    for chunk in keys.chunks(500) {
        for p in client.batch_get(chunk.to_vec()).await.unwrap() {
            found.insert(p.key, p.value);
        }
    }
    for (k, v) in &acked {
        assert_eq!(found.get(k), Some(v), "acknowledged write {k:?} lost");
    }

    // The restarted node hosts all its replicas again (8 shards and the
    // meta shard's) and exports metrics.
    let s = client
        .node_status(&cluster.nodes[victim].grpc)
        .await
        .unwrap();
    assert_eq!(s.replicas, 9);
    let (code, body) = cluster.nodes[victim].http_get("/metrics").unwrap();
    assert_eq!(code, 200);
    assert!(body.contains("flotilla_raft_log_writes_total"));
    assert!(body.contains("raft_engine_sync_log_duration_seconds"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_agree_after_restarts() {
    let mut cluster = ProcCluster::new(3, 4, "");
    cluster.start_all();
    let client = cluster.client(Duration::from_secs(20)).await;
    for i in 0..200u32 {
        client
            .put(
                Bytes::from(i.to_be_bytes().to_vec()),
                Bytes::from(vec![7u8; 64]),
            )
            .await
            .unwrap();
    }
    common::assert_replicas_identical(&mut cluster, &client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_joining_node_gets_replicas_and_a_decommissioned_one_is_emptied() {
    let config = "[placement]\nheartbeat-interval-ms = 200\nschedule-interval-ms = 200\n";
    let mut cluster = ProcCluster::new(3, 8, config);
    cluster.start_all();
    let client = cluster.client(Duration::from_secs(20)).await;

    let acked: Arc<Mutex<Vec<Bytes>>> = Arc::default();
    let errors: Arc<Mutex<Vec<String>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (client, acked, errors, stop) =
            (client.clone(), acked.clone(), errors.clone(), stop.clone());
        tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let key = Bytes::from(format!("{:02x}-{i}", (i * 37) % 256));
                match client.put(key.clone(), Bytes::from_static(b"v")).await {
                    Ok(()) => acked.lock().unwrap().push(key),
                    Err(e) => errors.lock().unwrap().push(e.to_string()),
                }
                i += 1;
            }
        })
    };

    // Node 4 joins and gets its share of the 8 shards' 24 replicas.
    let four = cluster.add_joining_node();
    cluster.nodes[four].start();
    cluster.nodes[four].wait_ready(Duration::from_secs(30));
    let grpc4 = cluster.nodes[four].grpc.clone();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = client.node_status(&grpc4).await.unwrap();
        if s.replicas >= 5 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node 4 holds {} replicas",
            s.replicas
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Node 2 is decommissioned: emptied, marked removed, then stopped.
    client.decommission_node(2).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let nodes = client.list_nodes().await.unwrap();
        let two = nodes
            .iter()
            .find(|n| n.node.as_ref().unwrap().id == 2)
            .unwrap();
        if two.node.as_ref().unwrap().state() == flotilla_proto::meta::NodeState::Removed {
            break;
        }
        assert!(Instant::now() < deadline, "node 2 not removed: {two:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let grpc2 = cluster.nodes[1].grpc.clone();
    assert_eq!(client.node_status(&grpc2).await.unwrap().replicas, 0);
    cluster.nodes[1].kill9();
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    assert!(
        errors.lock().unwrap().is_empty(),
        "client errors: {:?}",
        errors.lock().unwrap()
    );

    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() > 100,
        "only {} writes acknowledged",
        acked.len()
    );
    for chunk in acked.chunks(500) {
        let found = client.batch_get(chunk.to_vec()).await.unwrap();
        assert_eq!(found.len(), chunk.len(), "acknowledged writes lost");
    }
    // Node 2's id may never come back, not even with an empty data dir.
    let again = cluster.add_joining_node();
    let n = &mut cluster.nodes[again];
    let at = n.args.iter().position(|a| a == "--node-id").unwrap() + 1;
    n.args[at] = "2".into();
    n.start();
    let status = n.wait_exit(Duration::from_secs(30));
    assert!(!status.success());
    assert!(n.log_text().contains("already taken"), "{}", n.log_text());
}

/// After a pause of the whole cluster, each node reads its peers' buffered
/// heartbeats one after the other: the first peer heard must not get the
/// other called down (its followers would wake and campaign against a
/// healthy leader).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pausing_every_node_at_once_calls_no_peer_down() {
    let mut cluster = ProcCluster::new(3, 4, "");
    cluster.start_all();
    let client = cluster.client(Duration::from_secs(20)).await;
    client
        .put(Bytes::from("before"), Bytes::from("1"))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    for _ in 0..3 {
        for n in cluster.nodes.iter_mut() {
            n.signal("STOP");
        }
        // Two election timeouts (1 s by default).
        tokio::time::sleep(Duration::from_millis(2500)).await;
        for n in cluster.nodes.iter_mut() {
            n.signal("CONT");
        }
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    let downs: Vec<f64> = cluster
        .nodes
        .iter()
        .map(|n| n.metric("flotilla_peer_node_events_total{event=\"node_down\"}"))
        .collect();
    assert_eq!(
        downs, [0.0; 3],
        "peers called down after the pauses, by node"
    );
    for n in &cluster.nodes {
        let stalls = n.metric("flotilla_liveness_stalls_total");
        assert!(stalls >= 1.0, "node {} saw no stall", n.id);
    }
    client
        .put(Bytes::from("after"), Bytes::from("2"))
        .await
        .unwrap();
}

/// The bench's scale workloads against real processes: one write to each
/// of 16 (sleeping) shards, then `kill -9` of the node leading the most
/// shards and one write to each of up to 8 shards it led. Every write is
/// acknowledged, and the bench really killed the node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_wake_and_failover_get_every_write_answered() {
    let mut cluster = ProcCluster::new(3, 24, "");
    cluster.start_all();
    let client = cluster.client(Duration::from_secs(20)).await;
    let endpoints = cluster.endpoints().join(",");
    let bench = |args: &[&str]| -> serde_json::Value {
        let out = Command::new(env!("CARGO_BIN_EXE_flotilla-bench"))
            .args(args)
            .args(["--endpoints", &endpoints, "-o", "json"])
            .output()
            .expect("run flotilla-bench");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "flotilla-bench {args:?}: {stderr}");
        serde_json::from_slice(&out.stdout).expect("a JSON summary")
    };
    let only_row = |summary: &serde_json::Value, op: &str| -> (u64, u64) {
        let ops = summary["ops"].as_array().unwrap();
        assert_eq!(ops.len(), 1, "{summary}");
        assert_eq!(ops[0]["op"], op);
        (
            ops[0]["count"].as_u64().unwrap(),
            ops[0]["errors"].as_u64().unwrap(),
        )
    };

    let wake = bench(&["wake", "--shards", "16", "--clients", "2"]);
    assert_eq!(only_row(&wake, "wake-put"), (16, 0), "{wake}");

    let victim = busiest_leader(&cluster, &client).await;
    let (node, pid) = (cluster.nodes[victim].id, cluster.nodes[victim].pid());
    let failover = bench(&[
        "failover",
        "--kill-node",
        &node.to_string(),
        "--kill-pid",
        &pid.to_string(),
        "--shards",
        "8",
        "--duration",
        "30",
    ]);
    let (count, errors) = only_row(&failover, "failover-put");
    assert!(count >= 1 && errors == 0, "{failover}");
    let status = cluster.nodes[victim].wait_exit(Duration::from_secs(10));
    assert_eq!(
        status.signal(),
        Some(9),
        "the node was not killed: {status}"
    );
}
