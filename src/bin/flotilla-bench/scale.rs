//! The `wake` and `failover` workloads: what a client sees when it comes
//! back to shards that sleep (hibernate), and when the node leading them
//! dies. `scripts/scale-bench.sh` (`make bench-scale`) runs both on a
//! cluster of 10,000 shards.
//!
//! - `wake`: one put to each of `--shards` shards, spread evenly over the
//!   shard list, `--clients` at a time. On a cluster whose shards all
//!   sleep, each put wakes its shard (leader and followers), so each
//!   latency is the time to answer a write to a sleeping shard.
//! - `failover`: sends `kill -9` to `--kill-pid` (the server of
//!   `--kill-node`) and at once one put to each of up to `--shards` shards
//!   that node led, all in parallel. Each latency runs from the kill to the
//!   put's acknowledgment, the client's retries included: how long that
//!   shard could not take a write. A put that fails (the client's own
//!   deadline, an indeterminate outcome) is sent again until `--duration`
//!   has passed since the kill, then counted as an error.
//!
//! Each put writes a fresh value to a key inside its shard: the shard's
//! start key (`\0` for the first shard).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;

use anyhow::Context as _;
use bytes::Bytes;
use flotilla_client::{Client, ShardInfo};
use rand::SeedableRng;

use crate::{random_value, Stats};

/// A key inside the shard, if one is known.
fn key_in(s: &ShardInfo) -> Option<Bytes> {
    let d = &s.descriptor;
    let key = if d.start_key.is_empty() {
        Bytes::from_static(&[0])
    } else {
        d.start_key.clone()
    };
    (d.end_key.is_empty() || key < d.end_key).then_some(key)
}

/// Up to `n` items spread evenly over `all`.
fn spread<T: Clone>(all: &[T], n: usize) -> Vec<T> {
    if n >= all.len() {
        return all.to_vec();
    }
    (0..n).map(|i| all[i * all.len() / n].clone()).collect()
}

pub struct ScaleArgs {
    pub shards: usize,
    pub clients: usize,
    pub value_size: usize,
    pub seed: u64,
    pub duration: Duration,
}

/// One put to each of `args.shards` shards, `args.clients` at a time.
pub async fn wake(client: &Client, args: ScaleArgs) -> anyhow::Result<Stats> {
    let shards = client.list_shards().await.context("listing shards")?;
    let keys: Vec<Bytes> = spread(&shards, args.shards)
        .iter()
        .filter_map(key_in)
        .collect();
    eprintln!(
        "waking {} of {} shards, {} at a time",
        keys.len(),
        shards.len(),
        args.clients
    );
    let keys = Arc::new(Mutex::new(keys));
    let stats = Arc::new(Mutex::new(Stats::default()));
    let mut tasks = Vec::new();
    for c in 0..args.clients.max(1) {
        let (client, keys, stats) = (client.clone(), keys.clone(), stats.clone());
        let mut rng = rand::rngs::StdRng::seed_from_u64(args.seed.wrapping_add(c as u64));
        let value_size = args.value_size;
        tasks.push(tokio::spawn(async move {
            loop {
                let Some(key) = keys.lock().unwrap().pop() else {
                    return;
                };
                let value = random_value(&mut rng, value_size);
                let t = Instant::now();
                let ok = client.put(key, value).await.is_ok();
                let us = (t.elapsed().as_micros() as u64).max(1);
                stats.lock().unwrap().record("wake-put", us, ok);
            }
        }));
    }
    gather(tasks, stats).await
}

/// Waits for the workload's tasks, then hands back what they recorded.
async fn gather(tasks: Vec<JoinHandle<()>>, stats: Arc<Mutex<Stats>>) -> anyhow::Result<Stats> {
    for t in tasks {
        t.await?;
    }
    let stats = std::mem::take(&mut *stats.lock().unwrap());
    Ok(stats)
}

/// Kills node `node`'s process `pid` and times one put to each of up to
/// `args.shards` shards it led, from the kill.
pub async fn failover(
    client: &Client,
    node: u64,
    pid: u32,
    args: ScaleArgs,
) -> anyhow::Result<Stats> {
    let shards = client.list_shards().await.context("listing shards")?;
    let led: Vec<ShardInfo> = shards
        .iter()
        .filter(|s| s.leader_node == node)
        .cloned()
        .collect();
    anyhow::ensure!(
        !led.is_empty(),
        "node {node} leads none of the {} shards",
        shards.len()
    );
    let keys: Vec<Bytes> = spread(&led, args.shards)
        .iter()
        .filter_map(key_in)
        .collect();
    // Connections to every node first, so the puts below time the
    // failover, not the client's first handshakes.
    for (_, addr) in client.nodes() {
        let _ = client.node_status(&addr).await;
    }
    let killed = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .context("running kill")?;
    let since = Instant::now();
    anyhow::ensure!(killed.success(), "kill -9 {pid} failed");
    eprintln!(
        "killed node {node} (pid {pid}), which led {} of {} shards; writing to {} of them",
        led.len(),
        shards.len(),
        keys.len()
    );
    let stats = Arc::new(Mutex::new(Stats::default()));
    let mut tasks = Vec::new();
    for (i, key) in keys.into_iter().enumerate() {
        let (client, stats) = (client.clone(), stats.clone());
        let mut rng = rand::rngs::StdRng::seed_from_u64(args.seed.wrapping_add(i as u64));
        let (value_size, duration) = (args.value_size, args.duration);
        tasks.push(tokio::spawn(async move {
            let ok = loop {
                let value = random_value(&mut rng, value_size);
                if client.put(key.clone(), value).await.is_ok() {
                    break true;
                }
                if since.elapsed() >= duration {
                    break false;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            };
            let us = (since.elapsed().as_micros() as u64).max(1);
            stats.lock().unwrap().record("failover-put", us, ok);
        }));
    }
    gather(tasks, stats).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_proto::meta::ShardDescriptor;

    fn shard(start: &'static [u8], end: &'static [u8]) -> ShardInfo {
        ShardInfo {
            descriptor: ShardDescriptor {
                start_key: Bytes::from_static(start),
                end_key: Bytes::from_static(end),
                ..Default::default()
            },
            leader_node: 1,
        }
    }

    #[test]
    fn keys_fall_inside_their_shard() {
        assert_eq!(key_in(&shard(b"", b"m")).unwrap(), &b"\0"[..]);
        assert_eq!(key_in(&shard(b"m", b"")).unwrap(), &b"m"[..]);
        assert!(key_in(&shard(b"", b"\0")).is_none());
    }

    #[test]
    fn spread_takes_evenly_and_at_most_all() {
        let all: Vec<u32> = (0..10).collect();
        assert_eq!(spread(&all, 5), vec![0, 2, 4, 6, 8]);
        assert_eq!(spread(&all, 20), all);
        assert!(spread(&all, 0).is_empty());
    }
}
