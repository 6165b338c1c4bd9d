//! Crashes at the moments between two writes, injected with fail points
//! into real server processes (`FAILPOINTS=name=action`; a panic there
//! aborts the process like a power cut). After a restart every shard is
//! consistent: replicas hash equal, every acknowledged write is present and
//! no CompareAndSwap increment was applied twice. Also: a failed fsync stops
//! the node, and a torn raft-engine tail is tolerated.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::ProcCluster;
use flotilla_client::Client;

/// Compaction every half second once 100 entries pile up, so snapshots and
/// log truncation happen within a test.
const SMALL_LOGS: &str = "
[raftstore]
raft-log-gc-ticks = 5
raft-log-gc-threshold = 10
raft-log-gc-count-limit = 100
";

/// What the workload saw.
#[derive(Default)]
struct History {
    /// Acknowledged puts.
    puts: Vec<(Bytes, Bytes)>,
    /// Per counter: (acknowledged increments, increments with unknown outcome).
    counters: HashMap<Bytes, (u64, u64)>,
}

fn key(i: u64) -> Bytes {
    Bytes::copy_from_slice(&i.wrapping_mul(0x9e3779b97f4a7c15).to_be_bytes())
}

/// Puts of unique keys and CompareAndSwap increments of a few counters,
/// from `writers` tasks until `stop`.
fn spawn_workload(
    client: &Client,
    writers: u64,
    stop: Arc<AtomicBool>,
    history: Arc<Mutex<History>>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..writers)
        .map(|w| {
            let client = client.clone();
            let stop = stop.clone();
            let history = history.clone();
            tokio::spawn(async move {
                let counter = Bytes::from(format!("counter-{}", w % 3));
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    if i % 4 == 0 {
                        let Ok(cur) = client.get(counter.clone()).await else {
                            continue;
                        };
                        let n: u64 = cur
                            .as_ref()
                            .map(|v| std::str::from_utf8(v).unwrap().parse().unwrap())
                            .unwrap_or(0);
                        let next = Bytes::from((n + 1).to_string());
                        match client
                            .compare_and_swap(counter.clone(), cur, Some(next))
                            .await
                        {
                            Ok(r) if r.succeeded => {
                                history
                                    .lock()
                                    .unwrap()
                                    .counters
                                    .entry(counter.clone())
                                    .or_default()
                                    .0 += 1
                            }
                            Ok(_) => {}
                            Err(e) if e.is_indeterminate() => {
                                history
                                    .lock()
                                    .unwrap()
                                    .counters
                                    .entry(counter.clone())
                                    .or_default()
                                    .1 += 1
                            }
                            Err(_) => {}
                        }
                    } else {
                        let k = key((w << 40) | i);
                        let v = Bytes::from(format!("{w}-{i}"));
                        if client.put(k.clone(), v.clone()).await.is_ok() {
                            history.lock().unwrap().puts.push((k, v));
                        }
                    }
                }
            })
        })
        .collect()
}

/// Every acknowledged put is there; each counter counts its acknowledged
/// increments, plus at most those whose outcome was unknown.
async fn verify(client: &Client, history: &History) {
    let keys: Vec<Bytes> = history.puts.iter().map(|(k, _)| k.clone()).collect();
    let mut found = HashMap::new();
    for chunk in keys.chunks(500) {
        for p in client.batch_get(chunk.to_vec()).await.unwrap() {
            found.insert(p.key, p.value);
        }
    }
    for (k, v) in &history.puts {
        assert_eq!(found.get(k), Some(v), "acknowledged write {k:?} lost");
    }
    for (counter, (acked, unknown)) in &history.counters {
        let v: u64 = client
            .get(counter.clone())
            .await
            .unwrap()
            .map(|v| std::str::from_utf8(&v).unwrap().parse().unwrap())
            .unwrap_or(0);
        assert!(
            *acked <= v && v <= acked + unknown,
            "{counter:?} = {v}, but {acked} increments were acknowledged and {unknown} unknown"
        );
    }
}

/// Node 3 runs with `failpoint` armed under load until it crashes there,
/// restarts clean, and the cluster must be consistent.
async fn crash_at(failpoint: &str) {
    let mut cluster = ProcCluster::new(3, 4, SMALL_LOGS);
    cluster.start_all();
    let client = cluster.client(Duration::from_secs(20)).await;
    let stop = Arc::new(AtomicBool::new(false));
    let history = Arc::new(Mutex::new(History::default()));
    let tasks = spawn_workload(&client, 6, stop.clone(), history.clone());

    cluster.nodes[2].kill9();
    cluster.nodes[2].start_with(&[("FAILPOINTS", failpoint)]);
    let status = cluster.nodes[2].wait_exit(Duration::from_secs(60));
    assert!(
        !status.success(),
        "node 3 should have crashed at {failpoint}"
    );
    assert!(
        cluster.nodes[2].log_text().contains("fatal"),
        "the crash is logged"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    cluster.nodes[2].start();
    cluster.nodes[2].wait_ready(Duration::from_secs(60));
    tokio::time::sleep(Duration::from_millis(1000)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let history = std::mem::take(&mut *history.lock().unwrap());
    assert!(history.puts.len() > 100, "the workload made progress");
    verify(&client, &history).await;
    common::assert_replicas_identical(&cluster, &client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn crash_between_the_raft_log_write_and_apply() {
    crash_at("raft_after_log_write=400*off->panic").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn crash_before_the_apply_write() {
    crash_at("apply_before_write=300*off->panic").await;
}

/// Node 3 misses enough of the log to need a snapshot, and crashes while
/// installing it at `failpoint`; the restart finishes the install.
async fn crash_installing_a_snapshot(failpoint: &str) {
    let mut cluster = ProcCluster::new(3, 2, SMALL_LOGS);
    cluster.start_all();
    let client = cluster.client(Duration::from_secs(20)).await;
    for i in 0..50u64 {
        client.put(key(i), Bytes::from("before")).await.unwrap();
    }
    cluster.nodes[2].kill9();
    // One write at a time: one log entry each, far past the count limit.
    let mut acked = Vec::new();
    for i in 50..700u64 {
        let v = Bytes::from(format!("v{i}"));
        client.put(key(i), v.clone()).await.unwrap();
        acked.push((key(i), v));
    }
    // Give the leaders a few GC rounds to truncate.
    tokio::time::sleep(Duration::from_secs(2)).await;

    cluster.nodes[2].start_with(&[("FAILPOINTS", failpoint)]);
    let status = cluster.nodes[2].wait_exit(Duration::from_secs(60));
    assert!(
        !status.success(),
        "node 3 should have crashed at {failpoint}"
    );
    cluster.nodes[2].start();
    cluster.nodes[2].wait_ready(Duration::from_secs(60));
    let history = History {
        puts: acked,
        ..Default::default()
    };
    verify(&client, &history).await;
    common::assert_replicas_identical(&cluster, &client).await;
    assert!(
        cluster.nodes[2]
            .log_text()
            .contains("finishing a snapshot install interrupted by a restart"),
        "the restart finished the interrupted install"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn crash_after_clearing_the_range_for_a_snapshot() {
    crash_installing_a_snapshot("snapshot_after_clear=panic").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn crash_between_ingest_and_the_apply_state_update() {
    crash_installing_a_snapshot("snapshot_after_ingest=panic").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_fsync_stops_the_node() {
    let mut cluster = ProcCluster::new(3, 2, "");
    cluster.start_all();
    let client = cluster.client(Duration::from_secs(20)).await;
    cluster.nodes[0].kill9();
    cluster.nodes[0].start_with(&[("FAILPOINTS", "log_fd::sync::err=20*off->return")]);
    for i in 0..300u64 {
        client.put(key(i), Bytes::from("x")).await.unwrap();
        if !cluster.nodes[0].is_running() {
            break;
        }
    }
    let status = cluster.nodes[0].wait_exit(Duration::from_secs(30));
    assert!(!status.success());
    let log = cluster.nodes[0].log_text();
    assert!(
        log.contains("fatal") && log.contains("sync"),
        "a clear log line:\n{log}"
    );
    // The others go on.
    client
        .put(Bytes::from("after"), Bytes::from("1"))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_torn_raft_log_tail_is_tolerated() {
    let mut cluster = ProcCluster::new(3, 2, "");
    cluster.start_all();
    let client = cluster.client(Duration::from_secs(20)).await;
    for i in 0..200u64 {
        client.put(key(i), Bytes::from("v")).await.unwrap();
    }
    cluster.nodes[2].kill9();
    // A write cut short by the crash: garbage after the last record.
    let raft_dir = cluster.data_dir(2).join("raft");
    let mut logs: Vec<_> = std::fs::read_dir(&raft_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "raftlog"))
        .collect();
    logs.sort();
    let last = logs.last().expect("a raft log file");
    let mut data = std::fs::read(last).unwrap();
    data.extend_from_slice(&[0xA5; 777]);
    std::fs::write(last, data).unwrap();

    cluster.nodes[2].start();
    cluster.nodes[2].wait_ready(Duration::from_secs(60));
    for i in 200..220u64 {
        client.put(key(i), Bytes::from("v")).await.unwrap();
    }
    common::assert_replicas_identical(&cluster, &client).await;
}
