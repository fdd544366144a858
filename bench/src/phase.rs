//! One phase of a scenario against one target: every device publishes for the phase's
//! time, the counter is given until every acknowledged envelope arrived (or 15 s without
//! progress), and the device side and the counter side are tallied into a
//! [`PhaseResult`] with the CPU the bench, the gateway and the cloud broker used.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use crate::brokers::cpu_seconds;
use crate::counter::{Counter, CounterState};
use crate::load::{DevResult, Device, MAX_CONNECTING, Phase, Target, run_device};
use crate::procfs::{Memory, write_bytes};
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
    /// Set to end the publishing of running devices early (then cleared).
    pub(crate) stop: Arc<AtomicBool>,
}

/// What a gateway process did during a phase: CPU seconds and bytes written to disk.
#[derive(Clone, Copy)]
pub(crate) struct GatewayUse {
    pub(crate) cpu_seconds: f64,
    pub(crate) write_bytes: u64,
}

/// A process counts as quiet below this many CPU seconds per [`SETTLE_WINDOW`].
const QUIET_CPU: f64 = 0.02;
const SETTLE_WINDOW: Duration = Duration::from_millis(250);
/// Longest wait for quiet before a phase starts anyway.
const SETTLE_MAX: Duration = Duration::from_secs(15);

impl Bench {
    /// Waits until the cloud broker and the gateways `gateway_pids` are quiet (each
    /// under 8% of a core over 250 ms, at most 15 s), so that a phase does not pay for
    /// the one before it: after a 16 KiB phase the cloud broker keeps working for
    /// seconds, and whichever target came next had its latency measured against a busy
    /// broker. Returns how long it waited.
    pub(crate) async fn settle(&self, gateway_pids: &[u32]) -> Duration {
        let started = Instant::now();
        let pids: Vec<u32> = std::iter::once(self.cloud_pid)
            .chain(gateway_pids.iter().copied())
            .collect();
        while started.elapsed() < SETTLE_MAX {
            let before: Vec<f64> = pids.iter().map(|p| cpu_seconds(*p)).collect();
            tokio::time::sleep(SETTLE_WINDOW).await;
            let quiet = pids
                .iter()
                .zip(&before)
                .all(|(p, b)| cpu_seconds(*p) - b < QUIET_CPU);
            if quiet {
                break;
            }
        }
        started.elapsed()
    }

    /// Runs `phase` against `target` (whose gateway process is `gateway_pid`, if any).
    pub(crate) async fn run_phase(
        &mut self,
        target: &Arc<Target>,
        gateway_pid: Option<u32>,
        phase: Phase,
    ) -> Result<PhaseResult> {
        let phase = self.begin(phase, usize::MAX);
        let io0 = gateway_pid.map_or(0, write_bytes);
        let cpu0 = self.cpu(gateway_pid);
        let start = Instant::now();
        let start_ns = self.epoch.elapsed().as_nanos() as u64;
        let tasks = self.spawn_devices(target, phase);
        let results = self.collect(target, phase, tasks).await?;
        let publish_seconds = start.elapsed().as_secs_f64();
        let acked: u64 = results.iter().map(|r| r.acked).sum();
        self.wait_for_counter(acked).await;
        let wall = start.elapsed().as_secs_f64();
        let cpu1 = self.cpu(gateway_pid);
        let gateway = GatewayUse {
            cpu_seconds: cpu1[1] - cpu0[1],
            write_bytes: gateway_pid.map_or(0, write_bytes).saturating_sub(io0),
        };
        let used = gateway_pid.map(|pid| (gateway, Memory::of(pid)));
        let seen = std::mem::take(&mut *self.counter.lock());
        let cpu = [0, 1, 2].map(|k| (cpu1[k] - cpu0[k]) / wall);
        let mut r = tally(
            results,
            seen,
            (phase.first_device, start_ns),
            publish_seconds,
            cpu,
        );
        r.set_gateway(used, phase.envelope_size);
        Ok(r)
    }

    /// Starts a new run for `phase`: the counter expects every device's next seqs, and
    /// counts devices below `split` apart from the others.
    pub(crate) fn begin(&mut self, mut phase: Phase, split: usize) -> Phase {
        self.next_run += 1;
        phase.run = self.next_run;
        self.counter.reset_split(phase.run, &self.next_seq, split);
        phase
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

    /// Starts the phase's devices publishing (the run set by [`Bench::begin`]).
    pub(crate) fn spawn_devices(&self, target: &Arc<Target>, phase: Phase) -> Vec<Publishing> {
        let range = phase.first_device..phase.first_device + phase.n_devices;
        let connecting = Arc::new(Semaphore::new(MAX_CONNECTING));
        let mut tasks = Vec::new();
        for (i, device) in self
            .devices
            .iter()
            .enumerate()
            .take(range.end)
            .skip(range.start)
        {
            tasks.push(tokio::spawn(run_device(
                target.clone(),
                (i, device.clone()),
                phase,
                (self.next_seq[i], self.epoch),
                self.stop.clone(),
                connecting.clone(),
            )));
        }
        tasks
    }

    /// Waits for the devices of [`Bench::spawn_devices`]; their results in device order.
    pub(crate) async fn collect(
        &mut self,
        target: &Target,
        phase: Phase,
        tasks: Vec<Publishing>,
    ) -> Result<Vec<DevResult>> {
        let mut results = Vec::new();
        for (k, t) in tasks.into_iter().enumerate() {
            let i = phase.first_device + k;
            let r = t
                .await?
                .with_context(|| format!("{} device {i}", target.name))?;
            self.next_seq[i] += r.sent;
            results.push(r);
        }
        Ok(results)
    }

    /// Waits for the counter: every acknowledged envelope, or no progress for 15 s.
    pub(crate) async fn wait_for_counter(&self, acked: u64) {
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

/// A device publishing (see [`run_device`]).
pub(crate) type Publishing = JoinHandle<Result<DevResult>>;

/// Acknowledged messages of `results` (devices from `first` on) the counter never saw.
pub(crate) fn lost(results: &[DevResult], s: &CounterState, first: usize) -> u64 {
    let mut lost = 0;
    for (i, r) in results.iter().enumerate() {
        let counts = s
            .devs
            .get(first + i)
            .map(|d| d.counts.as_slice())
            .unwrap_or_default();
        lost += (0..r.acked as usize)
            .filter(|&k| counts.get(k).is_none_or(|&c| c == 0))
            .count() as u64;
    }
    lost
}

/// The phase's result from the devices' side (devices from `first` on) and what the
/// counter saw. An acknowledged message is lost if the counter never saw its seq
/// (devices are acknowledged in order, so device `i`'s acknowledged seqs are the first
/// `acked` of the run). `cpu` is cores used by the bench, the gateway and the cloud
/// broker.
pub(crate) fn tally(
    mut results: Vec<DevResult>,
    s: CounterState,
    (first, start_ns): (usize, u64),
    publish_seconds: f64,
    cpu: [f64; 3],
) -> PhaseResult {
    let acked: u64 = results.iter().map(|r| r.acked).sum();
    let lost = lost(&results, &s, first);
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
        reset_after_disconnect: results.iter().map(|r| r.reset_after_disconnect).sum(),
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
        ..PhaseResult::default()
    }
}
