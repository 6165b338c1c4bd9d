//! Read paths under leadership changes, in an in-process cluster: reads
//! (ReadIndex) issued while leadership moves back and forth never go back
//! in time: each returns at least every write acknowledged before it began.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use flotilla_test_cluster::TestCluster;

const WAIT: Duration = Duration::from_secs(30);

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
    for _ in 0..4 {
        let (client, key, acked, stop) = (client.clone(), key.clone(), acked.clone(), stop.clone());
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
                    "read {seen} after write {floor} was acknowledged"
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
