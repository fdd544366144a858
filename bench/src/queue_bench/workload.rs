//! The three runs against a [`Store`]: the pipelined append of many devices, the drain
//! (read and ack everything), and the one-at-a-time latency run at a fixed rate.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use tokio::time::MissedTickBehavior;

use crate::store::Store;
use crate::sys;

/// Process counters at one moment, to take differences of.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Snapshot {
    at: Instant,
    cpu_s: f64,
    write_bytes: u64,
}

impl Snapshot {
    pub(crate) fn now() -> Self {
        Self {
            at: Instant::now(),
            cpu_s: sys::cpu_seconds(),
            write_bytes: sys::write_bytes(),
        }
    }
}

/// What one phase cost: wall time, CPU time and bytes written, between two snapshots.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Cost {
    pub(crate) seconds: f64,
    pub(crate) cpu_seconds: f64,
    pub(crate) write_bytes: u64,
}

impl Cost {
    pub(crate) fn between(start: Snapshot, end: Snapshot) -> Self {
        Self {
            seconds: end.at.duration_since(start.at).as_secs_f64(),
            cpu_seconds: end.cpu_s - start.cpu_s,
            write_bytes: end.write_bytes.saturating_sub(start.write_bytes),
        }
    }
}

/// Payloads to cycle through: distinct pseudo-random bytes (xorshift), at most about
/// 4 MiB of them in all, made before any measurement.
pub(crate) fn payload_pool(size: usize) -> Vec<Bytes> {
    let count = ((4 << 20) / size.max(1)).clamp(16, 1024);
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..count)
        .map(|_| {
            let mut bytes = Vec::with_capacity(size + 8);
            while bytes.len() < size {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                bytes.extend_from_slice(&state.to_le_bytes());
            }
            bytes.truncate(size);
            Bytes::from(bytes)
        })
        .collect()
}

/// The append phase's result: its cost and every record's submit → durable latency.
pub(crate) struct Append {
    pub(crate) cost: Cost,
    pub(crate) latencies: Vec<Duration>,
    /// Times a device found the store's input full and waited.
    pub(crate) busy: u64,
}

/// `devices` tasks, each keeping up to `window` records outstanding (handed over, not
/// yet durable; awaited in order, as an MQTT session pipelining QoS 1 PUBACKs does),
/// until `records` in all are durable.
pub(crate) async fn append<S: Store>(
    store: &S,
    pool: &[Bytes],
    records: usize,
    devices: usize,
    window: usize,
) -> Result<Append> {
    let start = Snapshot::now();
    let mut tasks = Vec::with_capacity(devices);
    for d in 0..devices {
        let count = records / devices + usize::from(d < records % devices);
        let store = store.clone();
        // Each device starts at its own place in the pool.
        let payloads: Vec<Bytes> = pool
            .iter()
            .cycle()
            .skip(d * 7)
            .take(pool.len())
            .cloned()
            .collect();
        tasks.push(tokio::spawn(async move {
            device_appends(&store, &format!("dev-{d:03}"), &payloads, count, window).await
        }));
    }
    let mut latencies = Vec::with_capacity(records);
    let mut busy = 0;
    for task in tasks {
        let (lat, b) = task.await.context("a device task panicked")??;
        latencies.extend(lat);
        busy += b;
    }
    let cost = Cost::between(start, Snapshot::now());
    Ok(Append {
        cost,
        latencies,
        busy,
    })
}

async fn device_appends<S: Store>(
    store: &S,
    device: &str,
    payloads: &[Bytes],
    count: usize,
    window: usize,
) -> Result<(Vec<Duration>, u64)> {
    let mut latencies = Vec::with_capacity(count);
    let mut outstanding: VecDeque<(Instant, S::Durable)> = VecDeque::with_capacity(window);
    let mut submitted = 0;
    let mut busy = 0;
    while latencies.len() < count {
        // Fill the window, then wait for the oldest.
        while submitted < count && outstanding.len() < window.max(1) {
            let payload = &payloads[submitted % payloads.len()];
            let at = Instant::now();
            match store.append(device, payload)? {
                Some(durable) => {
                    outstanding.push_back((at, durable));
                    submitted += 1;
                }
                None if outstanding.is_empty() => {
                    busy += 1;
                    tokio::time::sleep(Duration::from_micros(200)).await;
                }
                None => {
                    busy += 1;
                    break;
                }
            }
        }
        if let Some((at, durable)) = outstanding.pop_front() {
            durable.await?;
            latencies.push(at.elapsed());
        }
    }
    Ok((latencies, busy))
}

/// The drain phase's result.
pub(crate) struct Drain {
    pub(crate) cost: Cost,
    pub(crate) records: u64,
    pub(crate) payload_bytes: u64,
}

/// For each device in turn: read batches of `batch` after the last id read and ack
/// every record, until the device is empty; then one flush, so the removals' writes
/// are counted.
pub(crate) async fn drain<S: Store>(store: &S, batch: usize) -> Result<Drain> {
    let start = Snapshot::now();
    let mut records = 0u64;
    let mut payload_bytes = 0u64;
    for device in store.devices() {
        let mut after = None;
        loop {
            let got = store.read(&device, after, batch)?;
            let Some(&(last, _)) = got.last() else {
                break;
            };
            for (id, payload) in &got {
                store.ack(&device, *id)?;
                payload_bytes += payload.len() as u64;
            }
            records += got.len() as u64;
            after = Some(last);
            // Let the runtime's other tasks (the writer) in between batches.
            tokio::task::yield_now().await;
        }
    }
    store.flush().await?;
    let cost = Cost::between(start, Snapshot::now());
    Ok(Drain {
        cost,
        records,
        payload_bytes,
    })
}

/// The latency run's result.
pub(crate) struct Latency {
    pub(crate) seconds: f64,
    pub(crate) latencies: Vec<Duration>,
}

/// One device, one record at a time, `records` of them at `rate` per second (a record
/// that is not durable by the next tick delays the following ones).
pub(crate) async fn latency<S: Store>(
    store: &S,
    pool: &[Bytes],
    records: usize,
    rate: f64,
) -> Result<Latency> {
    if !(rate.is_finite() && rate > 0.0) {
        bail!("--rate must be above 0");
    }
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut latencies = Vec::with_capacity(records);
    let start = Instant::now();
    for i in 0..records {
        tick.tick().await;
        let payload = &pool[i % pool.len()];
        let at = Instant::now();
        let durable = loop {
            match store.append("latency", payload)? {
                Some(durable) => break durable,
                None => tokio::time::sleep(Duration::from_micros(100)).await,
            }
        };
        durable.await?;
        latencies.push(at.elapsed());
    }
    Ok(Latency {
        seconds: start.elapsed().as_secs_f64(),
        latencies,
    })
}

/// The `q` quantile (0..=1) of sorted `values`, nearest rank; zero if there are none.
pub(crate) fn quantile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}
