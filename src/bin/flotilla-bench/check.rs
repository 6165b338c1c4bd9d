//! The `check` workload: clients put, get and compare-and-swap a few keys,
//! recording every operation with its invocation and return times; at the
//! end the history is checked for linearizability per key
//! (`flotilla-checker`).
//!
//! Keys are fresh for every run (a random run id is mixed into them), so
//! every register starts absent as the checker assumes. Written values are
//! unique (`c<client>-<seq>`), so a read names the write it saw. A write whose call failed is recorded with an unknown outcome
//! (it may have applied: the client retries writes); a read that failed is
//! left out (it observed nothing).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use flotilla_checker::{Input, Op, Output, Verdict};
use flotilla_client::{Client, ReadMode};
use rand::{Rng, SeedableRng};
use serde_json::json;

pub struct CheckArgs {
    /// Reads go through one of these at random (one per read mode tried).
    pub readers: Vec<Client>,
    pub clients: usize,
    pub duration: Duration,
    pub keys: u64,
    pub seed: u64,
    pub budget: Duration,
    pub json: bool,
}

/// Key `i` of run `run`: spread over the key space like the other
/// workloads, and never used by another run.
fn key_of(run: u64, i: u64) -> Bytes {
    let mut k = super::key_of(i).to_vec();
    k.extend_from_slice(&run.to_be_bytes());
    Bytes::from(k)
}

/// The read mode of each read, by (client, invocation time), to name it
/// when a read shows up in a violation.
type ReadModes = std::collections::HashMap<(u64, u64), ReadMode>;

/// One client's loop; returns its operations.
#[allow(clippy::too_many_arguments)]
async fn run_client(
    client: Client,
    readers: Vec<Client>,
    run: u64,
    id: u64,
    keys: u64,
    seed: u64,
    t0: Instant,
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
) -> (Vec<Op>, ReadModes) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut ops = Vec::new();
    let mut modes = ReadModes::new();
    let mut last_seen: std::collections::HashMap<u64, Option<Bytes>> = Default::default();
    let mut seq = 0u64;
    let now = || t0.elapsed().as_nanos() as u64;
    while !stop.load(Ordering::Relaxed) {
        let k = rng.gen_range(0..keys);
        let key = key_of(run, k);
        let roll = rng.gen_range(0..10);
        let call = now();
        let (input, output) = if roll < 4 {
            let reader = &readers[rng.gen_range(0..readers.len())];
            match reader.get(key.clone()).await {
                Ok(v) => {
                    modes.insert((id, call), reader.read_mode());
                    last_seen.insert(k, v.clone());
                    (Input::Get, Output::Read(v))
                }
                Err(_) => continue,
            }
        } else {
            seq += 1;
            let value = Some(Bytes::from(format!("c{id}-{seq}")));
            if roll < 8 {
                let out = match client.put(key.clone(), value.clone().unwrap()).await {
                    Ok(()) => Output::Written,
                    Err(_) => Output::Unknown,
                };
                (Input::Put(value), out)
            } else {
                let expected = last_seen.get(&k).cloned().flatten();
                let out = match client
                    .compare_and_swap(key.clone(), expected.clone(), value.clone())
                    .await
                {
                    Ok(r) if r.succeeded => Output::Swapped(true),
                    Ok(r) => {
                        last_seen.insert(k, r.previous.clone());
                        Output::NotSwappedSaw(r.previous)
                    }
                    Err(_) => Output::Unknown,
                };
                (
                    Input::Cas {
                        expected,
                        new: value,
                    },
                    out,
                )
            }
        };
        let ret = now();
        done.fetch_add(1, Ordering::Relaxed);
        ops.push(Op {
            client: id,
            key,
            input,
            output,
            call,
            ret,
        });
    }
    (ops, modes)
}

/// Runs the workload and checks it. Returns whether the history is
/// linearizable (false on a violation or an inconclusive check).
pub async fn run(client: &Client, a: CheckArgs) -> anyhow::Result<bool> {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let run: u64 = rand::random();
    eprintln!("run id {run:016x} (in every key)");
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..a.clients as u64 {
        tasks.push(tokio::spawn(run_client(
            client.clone(),
            a.readers.clone(),
            run,
            c,
            a.keys.max(1),
            a.seed.wrapping_add(c + 1),
            t0,
            stop.clone(),
            done.clone(),
        )));
    }
    let secs = a.duration.as_secs().max(1);
    for sec in 1..=secs {
        tokio::time::sleep_until((t0 + Duration::from_secs(sec)).into()).await;
        eprintln!(
            "[{sec:>4}s] {:>9} operations recorded",
            done.load(Ordering::Relaxed)
        );
    }
    stop.store(true, Ordering::Relaxed);
    let mut history = Vec::new();
    let mut modes = ReadModes::new();
    for t in tasks {
        let (ops, m) = t.await?;
        history.extend(ops);
        modes.extend(m);
    }
    let summary = flotilla_checker::summarize(&history);
    let started = Instant::now();
    let verdict = flotilla_checker::check(&history, a.budget);
    let took = started.elapsed().as_secs_f64();
    let (name, ok) = match &verdict {
        Verdict::Linearizable => ("linearizable", true),
        Verdict::Violation { .. } => ("NOT linearizable", false),
        Verdict::Unknown { .. } => ("unknown (check budget exhausted)", false),
    };
    if a.json {
        println!(
            "{}",
            json!({
                "operations": summary.ops, "keys": summary.keys, "unknown_outcome": summary.unknown,
                "verdict": match verdict { Verdict::Linearizable => "linearizable", Verdict::Violation{..} => "violation", Verdict::Unknown{..} => "unknown" },
                "check_seconds": took,
            })
        );
    } else {
        println!(
            "{} operations on {} keys ({} with unknown outcome), checked in {took:.2}s: {name}",
            summary.ops, summary.keys, summary.unknown
        );
    }
    match verdict {
        Verdict::Violation { key, ops } => {
            eprintln!(
                "violation on key 0x{}; smallest history without a linearization (times in ns):",
                key.iter().map(|b| format!("{b:02x}")).collect::<String>()
            );
            for op in &ops {
                match modes.get(&(op.client, op.call)) {
                    Some(m) => eprintln!("  {op}  [read mode {m:?}]"),
                    None => eprintln!("  {op}"),
                }
            }
        }
        Verdict::Unknown { key } => eprintln!(
            "the search for key 0x{} ran out of time; raise --check-budget",
            key.iter().map(|b| format!("{b:02x}")).collect::<String>()
        ),
        Verdict::Linearizable => {}
    }
    Ok(ok)
}
