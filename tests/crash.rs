//! Black-box crash test: three real server processes under a checked
//! workload while a nemesis `kill -9`s a random node at random moments and
//! restarts it, for a bounded time. At the end every acknowledged write is
//! present, every CAS counter equals its acknowledged increments (plus at
//! most those with an unknown outcome), and the replicas of every shard hash
//! equal.
//!
//! `FLOTILLA_CRASH_SECS` sets the duration (default 45; `make crash-test`
//! runs 600) and `FLOTILLA_CRASH_SEED` the schedule (default: the clock;
//! printed, so a failure can be replayed).

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::workload::{spawn_workload, verify, History};
use common::{ProcCluster, SMALL_LOGS};
use rand::{Rng, SeedableRng};

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn random_kill9_under_load_loses_nothing() {
    let secs = env_u64("FLOTILLA_CRASH_SECS").unwrap_or(45);
    let seed = env_u64("FLOTILLA_CRASH_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    });
    eprintln!("crash test: {secs}s, seed {seed} (FLOTILLA_CRASH_SEED to replay)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);

    let mut cluster = ProcCluster::new(3, 8, SMALL_LOGS);
    cluster.start_all();
    let client = cluster.client(Duration::from_secs(30)).await;
    let stop = Arc::new(AtomicBool::new(false));
    let history = Arc::new(Mutex::new(History::default()));
    let tasks = spawn_workload(&client, 8, stop.clone(), history.clone());

    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut kills = 0;
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(rng.gen_range(300..2500))).await;
        let victim = rng.gen_range(0..cluster.nodes.len());
        cluster.nodes[victim].kill9();
        kills += 1;
        tokio::time::sleep(Duration::from_millis(rng.gen_range(0..2000))).await;
        cluster.nodes[victim].start();
        cluster.nodes[victim].wait_ready(Duration::from_secs(60));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let history = std::mem::take(&mut *history.lock().unwrap());
    let (increments, unknown) = history.increments();
    eprintln!(
        "crash test: {kills} kills, {} acknowledged puts, {increments} acknowledged increments, {unknown} unknown",
        history.puts.len()
    );
    assert!(kills > 0 && history.puts.len() > 100);
    cluster.assert_all_running();
    verify(&client, &history).await;
    common::assert_replicas_identical(&mut cluster, &client).await;
}
