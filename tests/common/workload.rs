//! A checked workload: puts of unique keys and CompareAndSwap increments
//! of a few counters, with what was acknowledged, and the checks that
//! nothing acknowledged was lost and no increment applied twice.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use flotilla_client::Client;

/// What the workload saw.
#[derive(Default)]
pub struct History {
    /// Acknowledged puts.
    pub puts: Vec<(Bytes, Bytes)>,
    /// Per counter: (acknowledged increments, increments with unknown outcome).
    pub counters: HashMap<Bytes, (u64, u64)>,
}

impl History {
    /// Acknowledged increments and increments of unknown outcome, over all
    /// counters.
    pub fn increments(&self) -> (u64, u64) {
        self.counters
            .values()
            .fold((0, 0), |(a, u), (ca, cu)| (a + ca, u + cu))
    }
}

pub fn key(i: u64) -> Bytes {
    Bytes::copy_from_slice(&i.wrapping_mul(0x9e3779b97f4a7c15).to_be_bytes())
}

/// Puts of unique keys and CompareAndSwap increments of a few counters,
/// from `writers` tasks until `stop`.
pub fn spawn_workload(
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
                    if i.is_multiple_of(4) {
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
pub async fn verify(client: &Client, history: &History) {
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
