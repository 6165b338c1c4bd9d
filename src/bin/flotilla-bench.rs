//! `flotilla-bench`: a closed-loop load generator for a Flotilla cluster.
//!
//! Each of `--clients` tasks issues one request at a time for `--duration`
//! seconds, on keys drawn from `--keys` keys: uniformly, or with
//! `--distribution zipfian` by YCSB's Zipfian generator (constant 0.99: a
//! few hot keys take most requests). Keys are 8 bytes,
//! spread evenly over the key space (a splitmix64 permutation of the key
//! number), so every shard gets its share; values are random bytes (seeded),
//! so compression does not flatter stored sizes. Latencies go into HDR histograms
//! (microsecond precision). With `--metrics-endpoints`, the bench reads the
//! nodes' raft-engine fsync counters before and after the run and reports
//! fsyncs per acknowledged write.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use clap::{Parser, ValueEnum};
use flotilla_client::{Client, ClientConfig, ReadMode};
use hdrhistogram::Histogram;
use rand::{Rng, SeedableRng};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[path = "flotilla-bench/check.rs"]
mod check;

#[derive(Parser, Debug)]
#[command(version, about = "Load generator for Flotilla")]
struct Args {
    /// Workload.
    #[arg(value_enum)]
    workload: Workload,
    /// Comma-separated gRPC addresses of cluster nodes.
    #[arg(long, default_value = "127.0.0.1:20161", value_delimiter = ',')]
    endpoints: Vec<String>,
    /// Comma-separated status (HTTP) addresses whose /metrics give the
    /// raft-engine fsync count; empty to skip.
    #[arg(long, default_value = "", value_delimiter = ',')]
    metrics_endpoints: Vec<String>,
    /// Concurrent clients (each with one request in flight).
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// Run time in seconds.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Value size in bytes (put).
    #[arg(long, default_value_t = 128)]
    value_size: usize,
    /// Number of distinct keys.
    #[arg(long, default_value_t = 100_000)]
    keys: u64,
    /// How keys are drawn: uniform, or zipfian (YCSB's, constant 0.99; the
    /// hot keys are spread over the key space like all others).
    #[arg(long, value_enum, default_value_t = Distribution::Uniform)]
    distribution: Distribution,
    /// Write every key once before the run (useful before `get`).
    #[arg(long)]
    load: bool,
    /// Random seed (key choice and values).
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Output format of the summary.
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    output: Output,
    /// How reads are served: leader (lease, else ReadIndex), leader-read-index
    /// (always a quorum round), follower (any replica, via ReadIndex), stale
    /// (any replica, local state), or mixed (each read picks one of the
    /// three linearizable modes at random).
    #[arg(long, value_enum, default_value_t = ReadModeArg::Leader)]
    read_mode: ReadModeArg,
    /// Time the `check` workload may spend searching for a linearization,
    /// in seconds.
    #[arg(long, default_value_t = 60)]
    check_budget: u64,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum Workload {
    /// Writes only.
    Put,
    /// Linearizable reads only.
    Get,
    /// Half reads, half writes.
    Mixed,
    /// Put, get and compare-and-swap on a few keys (use a small --keys),
    /// recording the history and checking it for linearizability; exits 1
    /// unless it is linearizable.
    Check,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum Distribution {
    Uniform,
    Zipfian,
}

/// Draws key numbers in `0..n`.
#[derive(Clone, Debug)]
enum KeyChooser {
    Uniform(u64),
    Zipfian(Zipfian),
}

impl KeyChooser {
    fn new(d: Distribution, n: u64) -> Self {
        match d {
            Distribution::Uniform => KeyChooser::Uniform(n.max(1)),
            Distribution::Zipfian => KeyChooser::Zipfian(Zipfian::new(n.max(1), 0.99)),
        }
    }

    fn next(&self, rng: &mut impl Rng) -> u64 {
        match self {
            KeyChooser::Uniform(n) => rng.gen_range(0..*n),
            KeyChooser::Zipfian(z) => z.next(rng),
        }
    }
}

/// YCSB's Zipfian generator (Gray et al., "Quickly generating
/// billion-record synthetic databases"): rank `i` is drawn with probability
/// proportional to `1 / (i + 1)^theta`. Rank 0 is the hottest; `key_of`
/// scatters ranks over the key space, as YCSB's scrambled variant does.
#[derive(Clone, Debug)]
struct Zipfian {
    n: u64,
    theta: f64,
    alpha: f64,
    zetan: f64,
    eta: f64,
}

impl Zipfian {
    fn new(n: u64, theta: f64) -> Self {
        let zeta = |n: u64| (1..=n).map(|i| 1.0 / (i as f64).powf(theta)).sum::<f64>();
        let zetan = zeta(n);
        let zeta2 = zeta(2.min(n));
        Zipfian {
            n,
            theta,
            alpha: 1.0 / (1.0 - theta),
            zetan,
            eta: (1.0 - (2.0 / n as f64).powf(1.0 - theta)) / (1.0 - zeta2 / zetan),
        }
    }

    fn next(&self, rng: &mut impl Rng) -> u64 {
        let u: f64 = rng.gen();
        let uz = u * self.zetan;
        if uz < 1.0 || self.n == 1 {
            return 0;
        }
        if uz < 1.0 + 0.5f64.powf(self.theta) {
            return 1;
        }
        let r = (self.n as f64 * (self.eta * u - self.eta + 1.0).powf(self.alpha)) as u64;
        r.min(self.n - 1)
    }
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum ReadModeArg {
    Leader,
    LeaderReadIndex,
    Follower,
    Stale,
    Mixed,
}

const LINEARIZABLE_MODES: [ReadMode; 3] = [
    ReadMode::Leader,
    ReadMode::LeaderReadIndex,
    ReadMode::Follower,
];

/// The clients reads go through: one per mode the run uses.
fn read_clients(client: &Client, arg: ReadModeArg) -> Vec<Client> {
    let one = |m| vec![client.with_read_mode(m)];
    match arg {
        ReadModeArg::Leader => one(ReadMode::Leader),
        ReadModeArg::LeaderReadIndex => one(ReadMode::LeaderReadIndex),
        ReadModeArg::Follower => one(ReadMode::Follower),
        ReadModeArg::Stale => one(ReadMode::Stale),
        ReadModeArg::Mixed => LINEARIZABLE_MODES
            .iter()
            .map(|m| client.with_read_mode(*m))
            .collect(),
    }
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum Output {
    Table,
    Json,
}

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e3779b97f4a7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d049bb133111eb);
    x ^ (x >> 31)
}

/// Incompressible values, so stored sizes are honest.
fn random_value(rng: &mut impl Rng, size: usize) -> Bytes {
    let mut v = vec![0u8; size];
    rng.fill(&mut v[..]);
    v.into()
}

fn key_of(i: u64) -> Bytes {
    Bytes::copy_from_slice(&splitmix64(i).to_be_bytes())
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Op {
    Put,
    Get,
}

struct Stats {
    put: Histogram<u64>,
    get: Histogram<u64>,
    put_errors: u64,
    get_errors: u64,
}

impl Stats {
    fn new() -> Self {
        Stats {
            put: Histogram::new_with_bounds(1, 60_000_000, 3).unwrap(),
            get: Histogram::new_with_bounds(1, 60_000_000, 3).unwrap(),
            put_errors: 0,
            get_errors: 0,
        }
    }

    fn merge(&mut self, o: &Stats) {
        self.put.add(&o.put).unwrap();
        self.get.add(&o.get).unwrap();
        self.put_errors += o.put_errors;
        self.get_errors += o.get_errors;
    }
}

/// Sum of raft-engine fsyncs reported by the nodes' /metrics.
async fn fsyncs(endpoints: &[String]) -> Option<f64> {
    if endpoints.is_empty() {
        return None;
    }
    let mut total = 0.0;
    for ep in endpoints.iter().filter(|e| !e.is_empty()) {
        let mut s = tokio::net::TcpStream::connect(ep).await.ok()?;
        s.write_all(format!("GET /metrics HTTP/1.0\r\nHost: {ep}\r\n\r\n").as_bytes())
            .await
            .ok()?;
        let mut body = String::new();
        s.read_to_string(&mut body).await.ok()?;
        total += body
            .lines()
            .find(|l| l.starts_with("raft_engine_sync_log_duration_seconds_count"))
            .and_then(|l| l.split_whitespace().last())
            .and_then(|v| v.parse::<f64>().ok())?;
    }
    Some(total)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let client = Client::connect(ClientConfig {
        endpoints: args.endpoints.clone(),
        ..Default::default()
    })
    .await
    .with_context(|| format!("connecting to {}", args.endpoints.join(",")))?;

    if args.workload == Workload::Check {
        anyhow::ensure!(
            args.read_mode != ReadModeArg::Stale,
            "--read-mode stale is not linearizable; the check workload takes leader, leader-read-index, follower or mixed"
        );
        let ok = check::run(
            &client,
            check::CheckArgs {
                readers: read_clients(&client, args.read_mode),
                clients: args.clients,
                duration: Duration::from_secs(args.duration),
                keys: args.keys,
                seed: args.seed,
                budget: Duration::from_secs(args.check_budget),
                json: args.output == Output::Json,
            },
        )
        .await?;
        std::process::exit(if ok { 0 } else { 1 });
    }

    let mut rng = rand::rngs::StdRng::seed_from_u64(args.seed);

    if args.load {
        let t = Instant::now();
        let mut i = 0;
        while i < args.keys {
            let end = (i + 256).min(args.keys);
            let pairs = (i..end)
                .map(|k| (key_of(k), random_value(&mut rng, args.value_size)))
                .collect();
            client.batch_put(pairs).await.context("loading keys")?;
            i = end;
        }
        eprintln!(
            "loaded {} keys in {:.1}s",
            args.keys,
            t.elapsed().as_secs_f64()
        );
    }

    let metrics_eps: Vec<String> = args
        .metrics_endpoints
        .iter()
        .filter(|e| !e.is_empty())
        .cloned()
        .collect();
    let fsyncs_before = fsyncs(&metrics_eps).await;
    let stop = Arc::new(AtomicBool::new(false));
    let done_ops = Arc::new(AtomicU64::new(0));
    let done_errs = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    let readers = read_clients(&client, args.read_mode);
    let chooser = KeyChooser::new(args.distribution, args.keys);
    for c in 0..args.clients {
        let client = client.clone();
        let readers = readers.clone();
        let stop = stop.clone();
        let done_ops = done_ops.clone();
        let done_errs = done_errs.clone();
        let value_size = args.value_size;
        let chooser = chooser.clone();
        let workload = args.workload;
        let seed = args.seed.wrapping_add(c as u64 + 1);
        tasks.push(tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let mut stats = Stats::new();
            while !stop.load(Ordering::Relaxed) {
                let key = key_of(chooser.next(&mut rng));
                let op = match workload {
                    Workload::Put => Op::Put,
                    Workload::Get => Op::Get,
                    Workload::Check => unreachable!("handled above"),
                    Workload::Mixed => {
                        if rng.gen_bool(0.5) {
                            Op::Put
                        } else {
                            Op::Get
                        }
                    }
                };
                let t = Instant::now();
                let ok = match op {
                    Op::Put => {
                        let value = random_value(&mut rng, value_size);
                        client.put(key, value).await.is_ok()
                    }
                    Op::Get => {
                        let reader = &readers[rng.gen_range(0..readers.len())];
                        reader.get(key).await.is_ok()
                    }
                };
                let us = (t.elapsed().as_micros() as u64).max(1);
                match (op, ok) {
                    (Op::Put, true) => stats.put.saturating_record(us),
                    (Op::Get, true) => stats.get.saturating_record(us),
                    (Op::Put, false) => stats.put_errors += 1,
                    (Op::Get, false) => stats.get_errors += 1,
                }
                if ok {
                    done_ops.fetch_add(1, Ordering::Relaxed);
                } else {
                    done_errs.fetch_add(1, Ordering::Relaxed);
                }
            }
            stats
        }));
    }

    let mut last = 0;
    for sec in 1..=args.duration {
        tokio::time::sleep_until((started + Duration::from_secs(sec)).into()).await;
        let now = done_ops.load(Ordering::Relaxed);
        eprintln!(
            "[{sec:>4}s] {:>8} ops/s  total {:>9}  errors {}",
            now - last,
            now,
            done_errs.load(Ordering::Relaxed)
        );
        last = now;
    }
    stop.store(true, Ordering::Relaxed);
    let mut stats = Stats::new();
    for t in tasks {
        stats.merge(&t.await?);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let fsyncs_after = fsyncs(&metrics_eps).await;
    let fsync_per_write = match (fsyncs_before, fsyncs_after) {
        (Some(b), Some(a)) if !stats.put.is_empty() => Some((a - b) / stats.put.len() as f64),
        _ => None,
    };

    let row = |name: &str, h: &Histogram<u64>, errors: u64| {
        let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        json!({
            "op": name,
            "count": h.len(),
            "errors": errors,
            "ops_per_sec": h.len() as f64 / elapsed,
            "p50_ms": ms(0.5),
            "p90_ms": ms(0.9),
            "p99_ms": ms(0.99),
            "p999_ms": ms(0.999),
            "max_ms": h.max() as f64 / 1000.0,
        })
    };
    let mut rows = Vec::new();
    if !stats.put.is_empty() || stats.put_errors > 0 {
        rows.push(row("put", &stats.put, stats.put_errors));
    }
    if !stats.get.is_empty() || stats.get_errors > 0 {
        rows.push(row("get", &stats.get, stats.get_errors));
    }
    let summary = json!({
        "workload": format!("{:?}", args.workload).to_lowercase(),
        "clients": args.clients,
        "duration_s": elapsed,
        "value_size": args.value_size,
        "keys": args.keys,
        "distribution": format!("{:?}", args.distribution).to_lowercase(),
        "read_mode": format!("{:?}", args.read_mode).to_lowercase(),
        "ops": rows,
        "raft_engine_fsyncs_per_write": fsync_per_write,
    });
    if args.output == Output::Json {
        println!("{summary}");
        return Ok(());
    }
    let mut t = comfy_table::Table::new();
    t.load_preset(comfy_table::presets::UTF8_BORDERS_ONLY);
    t.set_header(vec![
        "OP", "COUNT", "ERRORS", "OPS/S", "P50 ms", "P90 ms", "P99 ms", "P99.9 ms", "MAX ms",
    ]);
    for r in &rows {
        let f = |k: &str| format!("{:.2}", r[k].as_f64().unwrap_or(0.0));
        t.add_row(vec![
            r["op"].as_str().unwrap().to_string(),
            r["count"].to_string(),
            r["errors"].to_string(),
            format!("{:.0}", r["ops_per_sec"].as_f64().unwrap_or(0.0)),
            f("p50_ms"),
            f("p90_ms"),
            f("p99_ms"),
            f("p999_ms"),
            f("max_ms"),
        ]);
    }
    println!("{t}");
    println!(
        "{} clients, {:.1}s, {}-byte values, {} keys",
        args.clients, elapsed, args.value_size, args.keys
    );
    if let Some(f) = fsync_per_write {
        println!("raft-engine fsyncs per acknowledged write: {f:.4}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shares(c: &KeyChooser, n: u64, draws: u32) -> Vec<f64> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut counts = vec![0u32; n as usize];
        for _ in 0..draws {
            let k = c.next(&mut rng);
            assert!(k < n, "{k} out of 0..{n}");
            counts[k as usize] += 1;
        }
        counts.iter().map(|c| *c as f64 / draws as f64).collect()
    }

    #[test]
    fn zipfian_draws_are_skewed_towards_low_ranks_and_uniform_ones_are_not() {
        let n = 1000;
        let z = shares(&KeyChooser::new(Distribution::Zipfian, n), n, 200_000);
        // With theta 0.99 and 1,000 keys, rank 0 takes about 13 %, rank 1
        // about half of that, and the top 1 % of ranks about 40 %.
        assert!((0.10..0.17).contains(&z[0]), "rank 0: {}", z[0]);
        assert!(z[1] < z[0] && z[1] > z[0] / 3.0, "rank 1: {}", z[1]);
        let top: f64 = z[..10].iter().sum();
        assert!((0.30..0.50).contains(&top), "top 1 %: {top}");
        let u = shares(&KeyChooser::new(Distribution::Uniform, n), n, 200_000);
        assert!(
            u.iter().all(|s| *s < 0.002),
            "uniform max {:?}",
            u.iter().cloned().fold(0.0, f64::max)
        );
    }

    #[test]
    fn a_seed_replays_the_same_keys() {
        let c = KeyChooser::new(Distribution::Zipfian, 100_000);
        let draw = || {
            let mut rng = rand::rngs::StdRng::seed_from_u64(42);
            (0..100).map(|_| c.next(&mut rng)).collect::<Vec<_>>()
        };
        assert_eq!(draw(), draw());
        // One key space.
        assert_eq!(
            KeyChooser::new(Distribution::Zipfian, 1).next(&mut rand::thread_rng()),
            0
        );
    }
}
