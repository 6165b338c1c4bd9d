//! The fault suite (`make chaos`): real server processes under two checked
//! workloads while a nemesis injects faults on a seeded random schedule.
//!
//! - Workloads: `flotilla-bench check --read-mode mixed` (put, get and
//!   compare-and-swap on a few keys; reads in the leader, leader-read-index
//!   and follower modes at random; the history is checked for
//!   linearizability by flotilla-checker), and the crash test's workload
//!   (unique puts and CAS counters) whose acknowledged writes must all be
//!   there at the end.
//! - Faults, one at a time, each healed before the next: a partition
//!   (random minority against the majority), the node leading the most
//!   shards isolated, a one-way partition (a node hears everyone but
//!   nobody hears it), `kill -9` and restart, SIGSTOP then SIGCONT,
//!   leadership transfers of random shards, moving a replica away and
//!   back (membership changes through joint consensus), and splitting a
//!   random shard between the keys the workloads use. The placement driver
//!   runs the whole time (re-adding replicas, balancing leaders). Links are
//!   cut with proxies between the nodes (`common::net`): no privileges
//!   needed.
//! - Verdict: the test passes only when the history is linearizable, every
//!   acknowledged write is present, every counter matches its acknowledged
//!   increments, every shard is back to three voters, and the replicas of
//!   every shard hash equal.
//!
//! `FLOTILLA_CHAOS_SECS` (default 60; `make chaos` runs 600),
//! `FLOTILLA_CHAOS_SEED` (default: the clock; printed) and
//! `FLOTILLA_CHAOS_NODES` (3 or 5) shape the run.

mod common;

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::workload::{spawn_workload, verify, History};
use common::{ProcCluster, SMALL_LOGS};
use flotilla_client::Client;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

fn ms(rng: &mut StdRng, lo: u64, hi: u64) -> Duration {
    Duration::from_millis(rng.gen_range(lo..hi))
}

const FAULTS: [&str; 8] = [
    "partition",
    "isolate-leader",
    "one-way",
    "kill-9",
    "pause",
    "transfer-leaders",
    "move-replica",
    "split",
];

/// The running node with the most leaders (a paused or dead node does not
/// answer and is skipped).
async fn busiest(cluster: &ProcCluster, client: &Client) -> usize {
    let mut best = (0, 0);
    for (i, n) in cluster.nodes.iter().enumerate() {
        let status = tokio::time::timeout(Duration::from_secs(1), client.node_status(&n.grpc));
        if let Ok(Ok(s)) = status.await {
            if s.leaders >= best.1 {
                best = (i, s.leaders);
            }
        }
    }
    best.0
}

/// Runs one fault and heals it; returns what it did, for the log.
async fn inject(
    fault: &str,
    cluster: &mut ProcCluster,
    client: &Client,
    rng: &mut StdRng,
) -> String {
    let net = cluster.net.clone().expect("a cluster with a net");
    let ids: Vec<u64> = cluster.nodes.iter().map(|n| n.id).collect();
    let n = ids.len();
    let hold = ms(rng, 1000, 4000);
    match fault {
        "partition" => {
            let mut shuffled = ids.clone();
            shuffled.shuffle(rng);
            let (minority, majority) = shuffled.split_at((n - 1) / 2);
            net.partition(minority, majority);
            tokio::time::sleep(hold).await;
            net.heal();
            format!("{minority:?} | {majority:?} for {hold:?}")
        }
        "isolate-leader" => {
            let i = busiest(cluster, client).await;
            let id = ids[i];
            let others: Vec<u64> = ids.iter().copied().filter(|x| *x != id).collect();
            net.partition(&[id], &others);
            tokio::time::sleep(hold).await;
            net.heal();
            format!("node {id} (most leaders) isolated for {hold:?}")
        }
        "one-way" => {
            let id = *ids.choose(rng).unwrap();
            net.block(ids.iter().filter(|x| **x != id).map(|x| (id, *x)));
            tokio::time::sleep(hold).await;
            net.heal();
            format!("node {id} cannot send for {hold:?}")
        }
        "kill-9" => {
            let i = rng.gen_range(0..n);
            let down = ms(rng, 0, 3000);
            cluster.nodes[i].kill9();
            tokio::time::sleep(down).await;
            cluster.nodes[i].start();
            cluster.nodes[i].wait_ready(Duration::from_secs(60));
            format!("node {} killed, down {down:?}", ids[i])
        }
        "pause" => {
            let i = rng.gen_range(0..n);
            let pause = ms(rng, 500, 3000);
            cluster.nodes[i].signal("STOP");
            tokio::time::sleep(pause).await;
            cluster.nodes[i].signal("CONT");
            format!("node {} paused for {pause:?}", ids[i])
        }
        "transfer-leaders" => {
            let Ok(shards) = client.list_shards().await else {
                return "no shard list".into();
            };
            let mut moved = 0;
            for s in shards.choose_multiple(rng, 3) {
                let to = s.descriptor.replicas.choose(rng).unwrap().node_id;
                let call = client.transfer_leader(s.descriptor.id, to);
                if let Ok(Ok(())) = tokio::time::timeout(Duration::from_secs(5), call).await {
                    moved += 1;
                }
            }
            format!("{moved} of 3 leadership transfers done")
        }
        "move-replica" => {
            let Ok(shards) = client.list_shards().await else {
                return "no shard list".into();
            };
            let s = shards.choose(rng).unwrap();
            let id = s.descriptor.id;
            let Some(node) = s
                .descriptor
                .replicas
                .iter()
                .map(|r| r.node_id)
                .find(|x| *x != s.leader_node)
            else {
                return format!("shard {id}: no follower to move");
            };
            let t = Duration::from_secs(20);
            let removed = tokio::time::timeout(t, client.remove_replica(id, node)).await;
            let added = tokio::time::timeout(t, client.add_replica(id, node, true)).await;
            format!(
                "shard {id}: replica on node {node} removed: {}, added back: {}",
                matches!(removed, Ok(Ok(_))),
                matches!(added, Ok(Ok(_)))
            )
        }
        "split" => {
            let Ok(shards) = client.list_shards().await else {
                return "no shard list".into();
            };
            let d = shards.choose(rng).unwrap().descriptor.clone();
            // Between the keys the workloads use, where there are some.
            let Ok(pairs) = client
                .scan(d.start_key.clone(), d.end_key.clone(), 100, false)
                .await
            else {
                return format!("shard {}: no scan", d.id);
            };
            let Some(key) = pairs.get(pairs.len() / 2).map(|p| p.key.clone()) else {
                return format!("shard {}: empty, not split", d.id);
            };
            let call = client.split_shard(d.id, key.clone());
            match tokio::time::timeout(Duration::from_secs(10), call).await {
                Ok(Ok((_, right))) => {
                    format!("shard {} split at {key:?}: new shard {}", d.id, right.id)
                }
                Ok(Err(e)) => format!("shard {} not split at {key:?}: {e}", d.id),
                Err(_) => format!("shard {} split at {key:?}: no answer in 10s", d.id),
            }
        }
        other => unreachable!("{other}"),
    }
}

/// Sums counters over the nodes' /metrics (since each node's last start):
/// `(series prefix, total)` for every series whose name starts with one of
/// `names`.
fn node_counters(cluster: &ProcCluster, names: &[&str]) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for n in &cluster.nodes {
        let Some((200, text)) = n.http_get("/metrics") else {
            continue;
        };
        for line in text.lines() {
            if !names.iter().any(|name| line.starts_with(name)) {
                continue;
            }
            if let Some((series, v)) = line.rsplit_once(' ') {
                *out.entry(series.to_string()).or_default() += v.parse::<f64>().unwrap_or(0.0);
            }
        }
    }
    out
}

/// Waits until the placement driver gave every shard back three voters
/// (a move the nemesis left half done, a replica a failed add left out).
async fn wait_fully_replicated(client: &Client) {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let short: Vec<(u64, usize)> = match client.list_shards().await {
            Ok(shards) => shards
                .iter()
                .map(|s| {
                    let voters = s
                        .descriptor
                        .replicas
                        .iter()
                        .filter(|r| r.role == flotilla_proto::meta::ReplicaRole::Voter as i32)
                        .count();
                    (s.descriptor.id, voters)
                })
                .filter(|(_, v)| *v != 3)
                .collect(),
            Err(_) => vec![(0, 0)],
        };
        if short.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "shards without three voters (id, voters): {short:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nemesis_under_checked_workloads_keeps_histories_linearizable() {
    let secs = env_u64("FLOTILLA_CHAOS_SECS").unwrap_or(60);
    let nodes = env_u64("FLOTILLA_CHAOS_NODES").unwrap_or(3) as usize;
    let seed = env_u64("FLOTILLA_CHAOS_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    });
    eprintln!(
        "chaos: {nodes} nodes, {secs}s of faults, seed {seed} (FLOTILLA_CHAOS_SEED to replay)"
    );
    let mut rng = StdRng::seed_from_u64(seed);

    let mut cluster = ProcCluster::with_net(nodes, 8, SMALL_LOGS);
    cluster.start_all();
    let client = cluster.client(Duration::from_secs(30)).await;

    // The checked history: a few keys, so operations contend.
    let keys = (secs / 10).max(8);
    let bench = Command::new(env!("CARGO_BIN_EXE_flotilla-bench"))
        .args(["check", "--clients", "8", "--read-mode", "mixed"])
        .args(["--duration", &(secs + 5).to_string()])
        .args(["--keys", &keys.to_string()])
        .args(["--check-budget", "300", "--seed", &seed.to_string()])
        .arg("--endpoints")
        .arg(cluster.endpoints().join(","))
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(cluster.dir.path().join("bench.log")).unwrap())
        .spawn()
        .expect("start flotilla-bench");

    // Acknowledged writes that must survive.
    let stop = Arc::new(AtomicBool::new(false));
    let history = Arc::new(Mutex::new(History::default()));
    let tasks = spawn_workload(&client, 4, stop.clone(), history.clone());

    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs(secs);
    let mut counts: BTreeMap<&str, u32> = BTreeMap::new();
    tokio::time::sleep(Duration::from_secs(1)).await;
    while Instant::now() < deadline {
        let fault = *FAULTS.choose(&mut rng).unwrap();
        let what = inject(fault, &mut cluster, &client, &mut rng).await;
        *counts.entry(fault).or_default() += 1;
        eprintln!(
            "chaos [{:>6.1}s] {fault}: {what}",
            t0.elapsed().as_secs_f64()
        );
        cluster.assert_all_running();
        tokio::time::sleep(ms(&mut rng, 500, 2000)).await;
    }
    cluster.net.as_ref().unwrap().heal();

    let out = bench.wait_with_output().unwrap();
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = std::fs::read_to_string(cluster.dir.path().join("bench.log")).unwrap_or_default();
    let stderr: String = stderr
        .lines()
        .filter(|l| !l.starts_with('['))
        .collect::<Vec<_>>()
        .join("\n");
    let faults: u32 = counts.values().sum();
    eprintln!("chaos: {faults} faults: {counts:?}");
    eprintln!("chaos: checked history: {}", stdout.trim());
    let ops = common::assert_linearizable(out.status, &stdout, &stderr);
    assert!(ops > 100, "only {ops} operations checked");
    assert!(faults > 0);

    let history = std::mem::take(&mut *history.lock().unwrap());
    let (increments, unknown) = history.increments();
    eprintln!(
        "chaos: {} acknowledged puts, {increments} acknowledged increments, {unknown} unknown",
        history.puts.len()
    );
    verify(&client, &history).await;
    let seen = node_counters(
        &cluster,
        &[
            "flotilla_raft_leader_changes_total",
            "flotilla_raft_read_paths_total",
            "flotilla_raft_lease_renewals_total",
            "flotilla_raft_messages_received_total{outcome=\"vote_held_off\"}",
        ],
    );
    eprintln!("chaos: counters of the nodes since their last start:");
    for (series, v) in &seen {
        eprintln!("  {series} {v}");
    }
    wait_fully_replicated(&client).await;
    common::assert_replicas_identical(&mut cluster, &client).await;
    eprintln!("chaos: every acknowledged write present; replicas identical; linearizable");
}
