//! The scenarios run against all three targets (blindgate, the Mosquitto bridge, the
//! direct ceiling): the targets themselves, the warm-up, throughput at 256 B and 16 KiB
//! with a few devices and at 256 B with many, and latency at a fixed rate.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Result, bail};
use blindgate::pki::DevPki;

use crate::brokers::Proc;
use crate::load::{Phase, Target};
use crate::mqtt::tls_config;
use crate::phase::Bench;
use crate::report::PhaseResult;

/// One row group of the table: a named phase run against every target.
pub(crate) struct Scenario {
    pub(crate) name: String,
    pub(crate) unit: &'static str,
    pub(crate) phase: Phase,
}

/// The targets in table order (blindgate, the bridge, direct), each with the pid of its
/// gateway process (none for direct).
pub(crate) type Targets = [(Arc<Target>, Option<u32>); 3];

/// blindgate, the Mosquitto bridge (`gateways`, on `ports`) and the direct ceiling (the
/// cloud broker on `cloud_port`, with the gateway's client certificate).
pub(crate) fn targets(
    pki: &DevPki,
    gateways: [&Proc; 2],
    ports: [u16; 2],
    cloud_port: u16,
) -> Result<Targets> {
    let cloud_client = tls_config(
        &pki.cloud_ca.cert,
        &pki.gateway_client.cert,
        &pki.gateway_client.key,
    )?;
    Ok([
        (
            Arc::new(Target {
                name: "blindgate",
                port: ports[0],
                topic_prefix: "e3/",
                tls_override: None,
            }),
            Some(gateways[0].pid()),
        ),
        (
            Arc::new(Target {
                name: "mosquitto bridge",
                port: ports[1],
                topic_prefix: "e3/",
                tls_override: None,
            }),
            Some(gateways[1].pid()),
        ),
        (
            Arc::new(Target {
                name: "direct",
                port: cloud_port,
                topic_prefix: "gw/gw-1/e3/",
                tls_override: Some(cloud_client),
            }),
            None,
        ),
    ])
}

/// Warm-up: a few messages per device through every target, all must arrive (this
/// also waits for both uplinks to the cloud broker to be connected).
pub(crate) async fn warm_up(
    bench: &mut Bench,
    targets: &Targets,
    window: usize,
    n_devices: usize,
) -> Result<()> {
    for (target, pid) in targets {
        let warm = Phase::new(256, 1.0, Some(20.0), window, n_devices);
        let r = bench.run_phase(target, *pid, warm).await?;
        if r.lost > 0 || r.acked == 0 {
            bail!(
                "warm-up through {}: {} acked, {} lost",
                target.name,
                r.acked,
                r.lost
            );
        }
    }
    Ok(())
}

/// Throughput at 256 B and 16 KiB with `n_devices`, latency at a fixed total rate, and
/// throughput at 256 B with `many` devices.
pub(crate) fn scenarios(
    seconds: f64,
    latency_rate: u32,
    (n_devices, many): (usize, usize),
    window: usize,
) -> Vec<Scenario> {
    let phase = |envelope_size, rate_per_device, devices| {
        Phase::new(envelope_size, seconds, rate_per_device, window, devices)
    };
    vec![
        Scenario {
            name: format!("throughput QoS 1, 256 B, {n_devices} devices"),
            unit: "msg/s",
            phase: phase(256, None, n_devices),
        },
        Scenario {
            name: format!("throughput QoS 1, 16 KiB, {n_devices} devices"),
            unit: "msg/s",
            phase: phase(16 * 1024, None, n_devices),
        },
        Scenario {
            name: format!("latency at {latency_rate} msg/s, 256 B"),
            unit: "ms",
            phase: phase(
                256,
                Some(f64::from(latency_rate) / n_devices as f64),
                n_devices,
            ),
        },
        Scenario {
            name: format!("throughput QoS 1, 256 B, {many} devices"),
            unit: "msg/s",
            phase: phase(256, None, many),
        },
    ]
}

/// Every scenario against every target; `false` if a check failed (see [`run`]).
pub(crate) async fn run_scenarios(
    bench: &mut Bench,
    targets: &Targets,
    scenarios: &[Scenario],
) -> Result<(bool, Vec<Vec<PhaseResult>>)> {
    let mut ok = true;
    let mut all = Vec::new();
    let gateway_pids: Vec<u32> = targets.iter().filter_map(|(_, pid)| *pid).collect();
    for sc in scenarios {
        let mut row = Vec::new();
        for (target, pid) in targets {
            let waited = bench.settle(&gateway_pids).await;
            if waited > Duration::from_millis(300) {
                eprintln!(
                    "  (waited {:.1} s for the brokers and gateways to be quiet)",
                    waited.as_secs_f64()
                );
            }
            eprintln!(
                "running: {} against {} ({} s)",
                sc.name, target.name, sc.phase.seconds
            );
            let r = bench.run_phase(target, *pid, sc.phase).await?;
            eprintln!("{}", r.summary());
            if r.lost > 0 || r.bad > 0 || r.pkid_mismatch > 0 || r.acked == 0 {
                eprintln!(
                    "  CHECK FAILED for {}: lost {} bad {} pkid mismatches {}",
                    target.name, r.lost, r.bad, r.pkid_mismatch
                );
                ok = false;
            }
            row.push(r);
        }
        all.push(row);
    }
    Ok((ok, all))
}
