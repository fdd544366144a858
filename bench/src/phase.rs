//! One phase of a scenario against one target: every device publishes for the phase's
//! time, the counter is given until every acknowledged envelope arrived (or 15 s without
//! progress), and the device side and the counter side are tallied into a
//! [`PhaseResult`] with the CPU the bench, the gateway and the cloud broker used.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};

use crate::brokers::cpu_seconds;
use crate::counter::{Counter, CounterState};
use crate::load::{DevResult, Device, Phase, Target, run_device};
use crate::report::{PhaseResult, percentiles};

/// The state kept across phases: devices, the counter, and each device's next seq.
pub(crate) struct Bench {
    pub(crate) epoch: Instant,
    pub(crate) devices: Vec<Arc<Device>>,
    pub(crate) counter: Arc<Counter>,
    pub(crate) next_seq: Vec<u64>,
    pub(crate) next_run: u32,
    pub(crate) self_pid: u32,
    pub(crate) cloud_pid: u32,
}

impl Bench {
    /// Runs `phase` against `target` (whose gateway process is `gateway_pid`, if any).
    pub(crate) async fn run_phase(
        &mut self,
        target: &Arc<Target>,
        gateway_pid: Option<u32>,
        mut phase: Phase,
    ) -> Result<PhaseResult> {
        self.next_run += 1;
        phase.run = self.next_run;
        let bases = self.next_seq.clone();
        self.counter.reset(phase.run, &bases);
        let cpu0 = self.cpu(gateway_pid);
        let start = Instant::now();
        let start_ns = self.epoch.elapsed().as_nanos() as u64;
        let results = self.run_devices(target, phase, &bases).await?;
        let publish_seconds = start.elapsed().as_secs_f64();
        for (i, r) in results.iter().enumerate() {
            self.next_seq[i] = bases[i] + r.sent;
        }
        let acked: u64 = results.iter().map(|r| r.acked).sum();
        self.wait_for_counter(acked).await;
        let wall = start.elapsed().as_secs_f64();
        let cpu1 = self.cpu(gateway_pid);
        let seen = std::mem::take(&mut *self.counter.lock());
        let cpu = [0, 1, 2].map(|k| (cpu1[k] - cpu0[k]) / wall);
        Ok(tally(results, seen, start_ns, publish_seconds, cpu))
    }

    /// CPU seconds so far of the bench itself, the gateway (0 if none) and the cloud
    /// broker.
    fn cpu(&self, gateway_pid: Option<u32>) -> [f64; 3] {
        [
            cpu_seconds(self.self_pid),
            gateway_pid.map_or(0.0, cpu_seconds),
            cpu_seconds(self.cloud_pid),
        ]
    }

    /// Every device publishes for the phase; their results in device order.
    async fn run_devices(
        &self,
        target: &Arc<Target>,
        phase: Phase,
        bases: &[u64],
    ) -> Result<Vec<DevResult>> {
        let mut tasks = Vec::new();
        for (i, device) in self.devices.iter().enumerate() {
            tasks.push(tokio::spawn(run_device(
                target.clone(),
                i,
                device.clone(),
                phase,
                bases[i],
                self.epoch,
            )));
        }
        let mut results = Vec::new();
        for (i, t) in tasks.into_iter().enumerate() {
            let r = t
                .await?
                .with_context(|| format!("{} device {i}", target.name))?;
            results.push(r);
        }
        Ok(results)
    }

    /// Waits for the counter: every acknowledged envelope, or no progress for 15 s.
    async fn wait_for_counter(&self, acked: u64) {
        let (mut last, mut since) = (self.counter.received(), Instant::now());
        loop {
            let now = self.counter.received();
            if now >= acked {
                break;
            }
            if now != last {
                (last, since) = (now, Instant::now());
            } else if since.elapsed() > Duration::from_secs(15) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// The phase's result from the devices' side and what the counter saw. An acknowledged
/// message is lost if the counter never saw its seq (devices are acknowledged in order,
/// so device `i`'s acknowledged seqs are the first `acked` of the run). `cpu` is cores
/// used by the bench, the gateway and the cloud broker.
fn tally(
    mut results: Vec<DevResult>,
    s: CounterState,
    start_ns: u64,
    publish_seconds: f64,
    cpu: [f64; 3],
) -> PhaseResult {
    let acked: u64 = results.iter().map(|r| r.acked).sum();
    let mut lost = 0;
    for (i, r) in results.iter().enumerate() {
        let counts = s
            .devs
            .get(i)
            .map(|d| d.counts.as_slice())
            .unwrap_or_default();
        lost += (0..r.acked as usize)
            .filter(|&k| counts.get(k).is_none_or(|&c| c == 0))
            .count() as u64;
    }
    let delivery_seconds = s.last_rx_ns.saturating_sub(start_ns) as f64 / 1e9;
    let mut ack_lat = Vec::new();
    for r in &mut results {
        ack_lat.append(&mut r.ack_latencies_ns);
    }
    PhaseResult {
        sent: results.iter().map(|r| r.sent).sum(),
        acked,
        received: s.received,
        lost,
        duplicates: s.duplicates,
        reordered: s.reordered,
        bad: s.bad,
        stray: s.stray,
        pkid_mismatch: results.iter().map(|r| r.pkid_mismatch).sum(),
        publish_seconds,
        delivery_seconds,
        accepted_per_sec: acked as f64 / publish_seconds,
        delivered_per_sec: if delivery_seconds > 0.0 {
            s.received as f64 / delivery_seconds
        } else {
            0.0
        },
        e2e_ms: percentiles(s.latencies_ns),
        ack_ms: percentiles(ack_lat),
        bench_cpu: cpu[0],
        gateway_cpu: cpu[1],
        cloud_cpu: cpu[2],
    }
}
