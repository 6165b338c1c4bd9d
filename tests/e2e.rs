//! End to end with real `flotilla-server` processes on free loopback ports:
//! the node leading the most shards is killed with SIGKILL while a client
//! writes; writes go on; the node restarts on its data; every acknowledged
//! write is read back.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::ProcCluster;

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
    let mut busiest = (0, 0);
    for (i, n) in cluster.nodes.iter().enumerate() {
        let s = client.node_status(&n.grpc).await.unwrap();
        if s.leaders >= busiest.1 {
            busiest = (i, s.leaders);
        }
    }
    let victim = busiest.0;
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
