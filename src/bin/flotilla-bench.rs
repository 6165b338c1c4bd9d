//! `flotilla-bench`: a closed-loop load generator for a Flotilla cluster.
//!
//! Each of `--clients` tasks issues one request at a time for `--duration`
//! seconds (or until `--operations` are done), on keys drawn from `--keys`
//! keys (the record count): uniformly, with `--distribution zipfian` by
//! YCSB's Zipfian generator (constant 0.99: a few hot keys take most
//! requests), or `latest` (Zipfian over the most recently inserted keys).
//!
//! Workloads: `put`, `get`, `mixed` (half each), `check` (linearizability,
//! see check.rs), `wake` and `failover` (sleeping shards and a killed
//! leader, see scale.rs), and YCSB's core workloads with their own mixes and
//! default distributions:
//!
//! | workload | mix | default keys |
//! |---|---|---|
//! | `ycsb-a` | 50 % read, 50 % update | zipfian |
//! | `ycsb-b` | 95 % read, 5 % update | zipfian |
//! | `ycsb-c` | 100 % read | zipfian |
//! | `ycsb-d` | 95 % read, 5 % insert | latest |
//! | `ycsb-e` | 95 % scan (1-100 keys), 5 % insert | zipfian |
//! | `ycsb-f` | 50 % read, 50 % read-modify-write | zipfian |
//!
//! Inserts add keys past the record count (shared among clients); run
//! `--load` first so reads find the records. Keys are 8 bytes,
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
#[path = "flotilla-bench/scale.rs"]
mod scale;

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
    /// Stop after this many operations (over all clients), if sooner than
    /// --duration.
    #[arg(long)]
    operations: Option<u64>,
    /// Value size in bytes (put).
    #[arg(long, default_value_t = 128)]
    value_size: usize,
    /// Number of distinct keys.
    #[arg(long, default_value_t = 100_000)]
    keys: u64,
    /// How keys are drawn: uniform, zipfian (YCSB's, constant 0.99; the
    /// hot keys are spread over the key space like all others), or latest
    /// (zipfian over the newest inserted keys). Default: uniform for put,
    /// get and mixed; YCSB's choice for the ycsb workloads.
    #[arg(long, value_enum)]
    distribution: Option<Distribution>,
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
    /// What to drive: a Flotilla cluster, or an etcd cluster (through its
    /// v3 KV API: Put, and linearizable Range for reads and scans) for
    /// side-by-side runs with the same workload.
    #[arg(long, value_enum, default_value_t = TargetKind::Flotilla)]
    target: TargetKind,
    /// Send each Flotilla request as a unary RPC instead of over the
    /// client's BatchCommands stream (to measure what batching buys).
    #[arg(long)]
    unary: bool,
    /// Time the `check` workload may spend searching for a linearization,
    /// in seconds.
    #[arg(long, default_value_t = 60)]
    check_budget: u64,
    /// wake and failover: how many shards to write to (spread evenly over
    /// the shard list; failover takes them among the killed node's).
    #[arg(long, default_value_t = 200)]
    shards: usize,
    /// failover: the node whose server --kill-pid is.
    #[arg(long)]
    kill_node: Option<u64>,
    /// failover: the server process to `kill -9`.
    #[arg(long)]
    kill_pid: Option<u32>,
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
    /// YCSB A: 50 % read, 50 % update (zipfian).
    YcsbA,
    /// YCSB B: 95 % read, 5 % update (zipfian).
    YcsbB,
    /// YCSB C: read only (zipfian).
    YcsbC,
    /// YCSB D: 95 % read, 5 % insert (latest).
    YcsbD,
    /// YCSB E: 95 % short scan, 5 % insert (zipfian).
    YcsbE,
    /// YCSB F: 50 % read, 50 % read-modify-write (zipfian).
    YcsbF,
    /// One put to each of --shards shards, --clients at a time: on a
    /// cluster whose shards sleep, the latency of waking one with a write.
    Wake,
    /// Kills --kill-pid (kill -9), then times one put to each of up to
    /// --shards shards that --kill-node led, from the kill.
    Failover,
}

impl Workload {
    /// (read, update, insert, scan, read-modify-write) weights in percent.
    fn mix(self) -> [u32; 5] {
        match self {
            Workload::Put => [0, 100, 0, 0, 0],
            Workload::Get => [100, 0, 0, 0, 0],
            Workload::Mixed => [50, 50, 0, 0, 0],
            Workload::YcsbA => [50, 50, 0, 0, 0],
            Workload::YcsbB => [95, 5, 0, 0, 0],
            Workload::YcsbC => [100, 0, 0, 0, 0],
            Workload::YcsbD => [95, 0, 5, 0, 0],
            Workload::YcsbE => [0, 0, 5, 95, 0],
            Workload::YcsbF => [50, 0, 0, 0, 50],
            Workload::Check | Workload::Wake | Workload::Failover => {
                unreachable!("{self:?} has its own loop")
            }
        }
    }

    fn default_distribution(self) -> Distribution {
        match self {
            Workload::Put
            | Workload::Get
            | Workload::Mixed
            | Workload::Check
            | Workload::Wake
            | Workload::Failover => Distribution::Uniform,
            Workload::YcsbD => Distribution::Latest,
            _ => Distribution::Zipfian,
        }
    }

    /// One put per shard, timed from its own start (wake, failover): no
    /// key space, no mix.
    fn per_shard(self) -> bool {
        matches!(self, Workload::Wake | Workload::Failover)
    }

    /// YCSB names its operations read/update; put/get/mixed keep theirs.
    fn names(self) -> (&'static str, &'static str) {
        match self {
            Workload::Put | Workload::Get | Workload::Mixed => ("get", "put"),
            _ => ("read", "update"),
        }
    }

    /// Picks the next operation.
    fn pick(self, rng: &mut impl Rng) -> Op {
        let mix = self.mix();
        let mut x = rng.gen_range(0..100);
        for (w, op) in mix
            .iter()
            .zip([Op::Read, Op::Update, Op::Insert, Op::Scan, Op::Rmw])
        {
            if x < *w {
                return op;
            }
            x -= w;
        }
        Op::Read
    }
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum TargetKind {
    Flotilla,
    Etcd,
}

type EtcdKv = flotilla_proto::etcd::kv_client::KvClient<tonic::transport::Channel>;

/// The system under load. Each bench client keeps to one etcd endpoint
/// (clients spread over them round robin); Flotilla's client routes each
/// key to its shard's leader itself.
#[derive(Clone)]
enum Target {
    Flotilla {
        client: Client,
        readers: Vec<Client>,
    },
    Etcd(Vec<EtcdKv>),
}

impl Target {
    async fn connect(args: &Args) -> anyhow::Result<Target> {
        match args.target {
            TargetKind::Flotilla => {
                let client = Client::connect(ClientConfig {
                    endpoints: args.endpoints.clone(),
                    batch_commands: !args.unary,
                    ..Default::default()
                })
                .await
                .with_context(|| format!("connecting to {}", args.endpoints.join(",")))?;
                let readers = read_clients(&client, args.read_mode);
                Ok(Target::Flotilla { client, readers })
            }
            TargetKind::Etcd => {
                let mut kvs = Vec::new();
                for ep in &args.endpoints {
                    let ch = tonic::transport::Channel::from_shared(format!("http://{ep}"))?
                        .connect_timeout(Duration::from_secs(3))
                        .timeout(Duration::from_secs(10))
                        .connect()
                        .await
                        .with_context(|| format!("connecting to etcd at {ep}"))?;
                    kvs.push(EtcdKv::new(ch));
                }
                Ok(Target::Etcd(kvs))
            }
        }
    }

    fn etcd(kvs: &[EtcdKv], client: usize) -> EtcdKv {
        kvs[client % kvs.len()].clone()
    }

    async fn read(&self, client: usize, rng: &mut impl Rng, key: Bytes) -> bool {
        match self {
            Target::Flotilla { readers, .. } => {
                let reader = &readers[rng.gen_range(0..readers.len())];
                reader.get(key).await.is_ok()
            }
            Target::Etcd(kvs) => {
                let req = flotilla_proto::etcd::RangeRequest {
                    key,
                    ..Default::default()
                };
                Self::etcd(kvs, client).range(req).await.is_ok()
            }
        }
    }

    async fn write(&self, client: usize, key: Bytes, value: Bytes) -> bool {
        match self {
            Target::Flotilla { client, .. } => client.put(key, value).await.is_ok(),
            Target::Etcd(kvs) => {
                let req = flotilla_proto::etcd::PutRequest {
                    key,
                    value,
                    ..Default::default()
                };
                Self::etcd(kvs, client).put(req).await.is_ok()
            }
        }
    }

    async fn scan(&self, client: usize, rng: &mut impl Rng, start: Bytes, len: usize) -> bool {
        match self {
            Target::Flotilla { readers, .. } => {
                let reader = &readers[rng.gen_range(0..readers.len())];
                reader.scan(start, Bytes::new(), len, false).await.is_ok()
            }
            Target::Etcd(kvs) => {
                // range_end "\0": every key from `start` on.
                let req = flotilla_proto::etcd::RangeRequest {
                    key: start,
                    range_end: Bytes::from_static(&[0]),
                    limit: len as i64,
                    ..Default::default()
                };
                Self::etcd(kvs, client).range(req).await.is_ok()
            }
        }
    }

    /// Writes keys `0..n` once.
    async fn load(&self, n: u64, value_size: usize, rng: &mut impl Rng) -> anyhow::Result<()> {
        match self {
            Target::Flotilla { client, .. } => {
                let mut i = 0;
                while i < n {
                    let end = (i + 256).min(n);
                    let pairs = (i..end)
                        .map(|k| (key_of(k), random_value(rng, value_size)))
                        .collect();
                    client.batch_put(pairs).await.context("loading keys")?;
                    i = end;
                }
            }
            Target::Etcd(_) => {
                // The slice of etcd's API used here has no batch put: 64
                // loaders at once.
                let next = Arc::new(AtomicU64::new(0));
                let mut tasks = Vec::new();
                for c in 0..64 {
                    let (this, next) = (self.clone(), next.clone());
                    let mut rng = rand::rngs::StdRng::seed_from_u64(rng.gen());
                    tasks.push(tokio::spawn(async move {
                        loop {
                            let k = next.fetch_add(1, Ordering::Relaxed);
                            if k >= n {
                                return true;
                            }
                            let v = random_value(&mut rng, value_size);
                            if !this.write(c, key_of(k), v).await {
                                return false;
                            }
                        }
                    }));
                }
                for t in tasks {
                    anyhow::ensure!(t.await?, "loading keys into etcd failed");
                }
            }
        }
        Ok(())
    }
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum Distribution {
    Uniform,
    Zipfian,
    Latest,
}

/// Draws key numbers in `0..n`, or for `Latest` near the newest inserted
/// key.
#[derive(Clone, Debug)]
enum KeyChooser {
    Uniform(u64),
    Zipfian(Zipfian),
    Latest(Zipfian),
}

impl KeyChooser {
    fn new(d: Distribution, n: u64) -> Self {
        match d {
            Distribution::Uniform => KeyChooser::Uniform(n.max(1)),
            Distribution::Zipfian => KeyChooser::Zipfian(Zipfian::new(n.max(1), 0.99)),
            Distribution::Latest => KeyChooser::Latest(Zipfian::new(n.max(1), 0.99)),
        }
    }

    /// `inserted`: keys `0..inserted` exist (the records and the inserts so
    /// far).
    fn next(&self, rng: &mut impl Rng, inserted: u64) -> u64 {
        match self {
            KeyChooser::Uniform(n) => rng.gen_range(0..*n),
            KeyChooser::Zipfian(z) => z.next(rng),
            KeyChooser::Latest(z) => inserted.saturating_sub(1).saturating_sub(z.next(rng)),
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

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Op {
    Read,
    Update,
    Insert,
    Scan,
    /// Read a key, then write it (YCSB F).
    Rmw,
}

/// Latencies (microseconds) and errors per operation name. One `Stats` is
/// shared by every client task (behind a mutex): a histogram per task would
/// be ~200 KiB each, and recording into 256 of them missed the cache often
/// enough to cost the load generator ~5 % of its CPU.
#[derive(Default)]
struct Stats {
    /// At most one entry per operation name.
    ops: Vec<(&'static str, Histogram<u64>, u64)>,
}

impl Stats {
    fn entry(&mut self, op: &'static str) -> &mut (&'static str, Histogram<u64>, u64) {
        let i = match self.ops.iter().position(|e| e.0 == op) {
            Some(i) => i,
            None => {
                let h = Histogram::new_with_bounds(1, 60_000_000, 3).unwrap();
                self.ops.push((op, h, 0));
                self.ops.len() - 1
            }
        };
        &mut self.ops[i]
    }

    fn record(&mut self, op: &'static str, us: u64, ok: bool) {
        let e = self.entry(op);
        if ok {
            e.1.saturating_record(us);
        } else {
            e.2 += 1;
        }
    }

    /// Acknowledged writes (puts, updates, inserts, read-modify-writes).
    fn writes(&self) -> u64 {
        self.ops
            .iter()
            .filter(|(op, ..)| ["put", "update", "insert", "rmw"].contains(op))
            .map(|(_, h, _)| h.len())
            .sum()
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
    // The client's retries, with RUST_LOG=flotilla_client=debug.
    if let Ok(filter) = std::env::var("RUST_LOG") {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_ansi(false)
            .with_writer(std::io::stderr)
            .init();
    }
    let target = Target::connect(&args).await?;

    if args.workload == Workload::Check {
        let Target::Flotilla { client, readers } = &target else {
            anyhow::bail!("the check workload drives Flotilla only");
        };
        anyhow::ensure!(
            args.read_mode != ReadModeArg::Stale,
            "--read-mode stale is not linearizable; the check workload takes leader, leader-read-index, follower or mixed"
        );
        let ok = check::run(
            client,
            check::CheckArgs {
                readers: readers.clone(),
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
    if args.workload.per_shard() {
        let Target::Flotilla { client, .. } = &target else {
            anyhow::bail!("the wake and failover workloads drive Flotilla only");
        };
        let scale_args = scale::ScaleArgs {
            shards: args.shards,
            clients: args.clients,
            value_size: args.value_size,
            seed: args.seed,
            duration: Duration::from_secs(args.duration),
        };
        let started = Instant::now();
        let stats = if args.workload == Workload::Wake {
            scale::wake(client, scale_args).await?
        } else {
            let (Some(node), Some(pid)) = (args.kill_node, args.kill_pid) else {
                anyhow::bail!("the failover workload needs --kill-node and --kill-pid");
            };
            scale::failover(client, node, pid, scale_args).await?
        };
        report(
            &args,
            Distribution::Uniform,
            stats,
            started.elapsed().as_secs_f64(),
            None,
        );
        return Ok(());
    }

    let mut rng = rand::rngs::StdRng::seed_from_u64(args.seed);

    if args.load {
        let t = Instant::now();
        target.load(args.keys, args.value_size, &mut rng).await?;
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
    // Keys 0..inserted exist: the records, then inserts take the next.
    let inserted = Arc::new(AtomicU64::new(args.keys));
    let started = Instant::now();
    let mut tasks = Vec::new();
    let stats = Arc::new(std::sync::Mutex::new(Stats::default()));
    let distribution = args
        .distribution
        .unwrap_or(args.workload.default_distribution());
    let chooser = KeyChooser::new(distribution, args.keys);
    let (read_name, update_name) = args.workload.names();
    for c in 0..args.clients {
        let target = target.clone();
        let stop = stop.clone();
        let done_ops = done_ops.clone();
        let done_errs = done_errs.clone();
        let inserted = inserted.clone();
        let stats = stats.clone();
        let value_size = args.value_size;
        let chooser = chooser.clone();
        let workload = args.workload;
        let operations = args.operations;
        let seed = args.seed.wrapping_add(c as u64 + 1);
        tasks.push(tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            while !stop.load(Ordering::Relaxed) {
                if operations.is_some_and(|n| {
                    done_ops.load(Ordering::Relaxed) + done_errs.load(Ordering::Relaxed) >= n
                }) {
                    break;
                }
                let op = workload.pick(&mut rng);
                let existing = inserted.load(Ordering::Relaxed);
                let key = key_of(chooser.next(&mut rng, existing));
                let t = Instant::now();
                let (name, ok) = match op {
                    Op::Read => (read_name, target.read(c, &mut rng, key).await),
                    Op::Update => {
                        let value = random_value(&mut rng, value_size);
                        (update_name, target.write(c, key, value).await)
                    }
                    Op::Insert => {
                        let key = key_of(inserted.fetch_add(1, Ordering::Relaxed));
                        let value = random_value(&mut rng, value_size);
                        ("insert", target.write(c, key, value).await)
                    }
                    Op::Scan => {
                        let len = rng.gen_range(1..=100);
                        ("scan", target.scan(c, &mut rng, key, len).await)
                    }
                    Op::Rmw => {
                        let value = random_value(&mut rng, value_size);
                        let ok = target.read(c, &mut rng, key.clone()).await
                            && target.write(c, key, value).await;
                        ("rmw", ok)
                    }
                };
                let us = (t.elapsed().as_micros() as u64).max(1);
                stats.lock().unwrap().record(name, us, ok);
                if ok {
                    done_ops.fetch_add(1, Ordering::Relaxed);
                } else {
                    done_errs.fetch_add(1, Ordering::Relaxed);
                }
            }
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
        if tasks.iter().all(|t| t.is_finished()) {
            break;
        }
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await?;
    }
    let stats = std::mem::take(&mut *stats.lock().unwrap());
    let elapsed = started.elapsed().as_secs_f64();
    let fsyncs_after = fsyncs(&metrics_eps).await;
    let fsync_per_write = match (fsyncs_before, fsyncs_after) {
        (Some(b), Some(a)) if stats.writes() > 0 => Some((a - b) / stats.writes() as f64),
        _ => None,
    };
    report(&args, distribution, stats, elapsed, fsync_per_write);
    Ok(())
}

/// Prints the summary: a table, or one JSON object with `-o json`.
fn report(
    args: &Args,
    distribution: Distribution,
    mut stats: Stats,
    elapsed: f64,
    fsync_per_write: Option<f64>,
) {
    // Rows by operation name, as before the stats were shared (first
    // recorded depends on which task ran first).
    stats.ops.sort_by_key(|(op, ..)| *op);

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
    let rows: Vec<_> = stats
        .ops
        .iter()
        .map(|(op, h, errors)| row(op, h, *errors))
        .collect();
    let summary = json!({
        "workload": args.workload.to_possible_value().map(|v| v.get_name().to_string()),
        "target": args.target.to_possible_value().map(|v| v.get_name().to_string()),
        "clients": args.clients,
        "unary": args.unary,
        "duration_s": elapsed,
        "value_size": args.value_size,
        "keys": args.keys,
        "distribution": format!("{distribution:?}").to_lowercase(),
        "read_mode": format!("{:?}", args.read_mode).to_lowercase(),
        "ops": rows,
        "raft_engine_fsyncs_per_write": fsync_per_write,
    });
    if args.output == Output::Json {
        println!("{summary}");
        return;
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
    if args.workload.per_shard() {
        let shards: u64 = stats.ops.iter().map(|(_, h, e)| h.len() + e).sum();
        println!(
            "{shards} shards, one put each, {:.1}s, {}-byte values",
            elapsed, args.value_size
        );
    } else {
        println!(
            "{} clients, {:.1}s, {}-byte values, {} keys",
            args.clients, elapsed, args.value_size, args.keys
        );
    }
    if let Some(f) = fsync_per_write {
        println!("raft-engine fsyncs per acknowledged write: {f:.4}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shares(c: &KeyChooser, n: u64, draws: u32) -> Vec<f64> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut counts = vec![0u32; n as usize];
        for _ in 0..draws {
            let k = c.next(&mut rng, n);
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
    fn ycsb_mixes_and_the_latest_distribution() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let mut count = |w: Workload, op: Op| {
            (0..10_000).filter(|_| w.pick(&mut rng) == op).count() as f64 / 10_000.0
        };
        assert!((0.45..0.55).contains(&count(Workload::YcsbA, Op::Update)));
        assert!((0.93..0.97).contains(&count(Workload::YcsbB, Op::Read)));
        assert_eq!(count(Workload::YcsbC, Op::Read), 1.0);
        assert!((0.03..0.07).contains(&count(Workload::YcsbD, Op::Insert)));
        assert!((0.93..0.97).contains(&count(Workload::YcsbE, Op::Scan)));
        assert!((0.45..0.55).contains(&count(Workload::YcsbF, Op::Rmw)));
        assert_eq!(Workload::YcsbD.default_distribution(), Distribution::Latest);
        // Latest: most draws land among the newest keys, none past them.
        let c = KeyChooser::new(Distribution::Latest, 1000);
        let draws: Vec<u64> = (0..10_000).map(|_| c.next(&mut rng, 5000)).collect();
        assert!(draws.iter().all(|k| *k < 5000));
        let recent = draws.iter().filter(|k| **k >= 4900).count();
        assert!(recent > 5000, "{recent} of 10,000 among the newest 100");
    }

    #[test]
    fn a_seed_replays_the_same_keys() {
        let c = KeyChooser::new(Distribution::Zipfian, 100_000);
        let draw = || {
            let mut rng = rand::rngs::StdRng::seed_from_u64(42);
            (0..100)
                .map(|_| c.next(&mut rng, 100_000))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(), draw());
        // One key space.
        assert_eq!(
            KeyChooser::new(Distribution::Zipfian, 1).next(&mut rand::thread_rng(), 1),
            0
        );
    }
}
