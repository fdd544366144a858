//! The device load generator: one TLS connection per simulated device, each publishing
//! real E3 envelopes (QoS 1, pipelined within a window of unacknowledged publishes,
//! written in batches) whose sealed plaintext is stamped with the run, the device, the
//! seq and the send time, so the counter can check loss, order and latency.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail};
use blindgate::pki::DevPki;
use bytes::BytesMut;
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{Disconnect, Packet, Publish};
use tokio::io::{AsyncWriteExt as _, ReadHalf, WriteHalf};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};
use tokio::sync::{Semaphore, mpsc};

use crate::mqtt::{Stream, mqtt_connect, read_packet, tls_config};

/// Plaintext prefix: run id (u32), device index (u32), seq (u64), send time (u64 ns).
const STAMP_LEN: usize = 24;
/// Most publishes written in one batch (one `write_all`).
const MAX_BATCH: usize = 64;

pub(crate) struct Device {
    name: String,
    key: e3::DeviceKey,
    /// Device certificate (device CA), for both gateways.
    tls_gateway: Arc<rustls::ClientConfig>,
}

/// The device key of device `name` at position `index` (the same for the generator and
/// the counter).
pub(crate) fn device_key(name: &str, index: usize) -> Result<e3::DeviceKey> {
    let id = e3::DeviceId::new(name).map_err(|e| anyhow!("device id {name}: {e:?}"))?;
    let mut secret = [0x5a_u8; 32];
    secret[..8].copy_from_slice(&(index as u64).to_be_bytes());
    Ok(e3::DeviceKey::new(
        id,
        1,
        e3::Suite::ChaCha20Poly1305,
        secret,
    ))
}

/// The devices of `pki`, in its order (index = position).
pub(crate) fn devices(pki: &DevPki) -> Result<Vec<Arc<Device>>> {
    let mut devices = Vec::new();
    for (i, (name, paths)) in pki.devices.iter().enumerate() {
        devices.push(Arc::new(Device {
            name: name.clone(),
            key: device_key(name, i)?,
            tls_gateway: tls_config(&pki.device_ca.cert, &paths.cert, &paths.key)?,
        }));
    }
    Ok(devices)
}

/// What every device does in one phase of a scenario.
#[derive(Clone, Copy)]
pub(crate) struct Phase {
    pub(crate) run: u32,
    pub(crate) envelope_size: usize,
    pub(crate) seconds: f64,
    /// Messages per second per device; `None` = as fast as the window allows.
    pub(crate) rate_per_device: Option<f64>,
    pub(crate) window: usize,
    /// The devices that publish: `first_device..first_device + n_devices` of the bench.
    pub(crate) first_device: usize,
    pub(crate) n_devices: usize,
    /// Each device stops after this many publishes (or at the phase's end, if earlier).
    pub(crate) count: Option<u64>,
}

impl Phase {
    /// `seconds` of publishing `envelope_size` envelopes from the first `n_devices`
    /// devices, at `rate_per_device` (`None`: as fast as `window` allows).
    pub(crate) fn new(
        envelope_size: usize,
        seconds: f64,
        rate_per_device: Option<f64>,
        window: usize,
        n_devices: usize,
    ) -> Self {
        Self {
            run: 0,
            envelope_size,
            seconds,
            rate_per_device,
            window,
            first_device: 0,
            n_devices,
            count: None,
        }
    }
}

/// One device's side of a phase.
#[derive(Default)]
pub(crate) struct DevResult {
    pub(crate) sent: u64,
    pub(crate) acked: u64,
    pub(crate) ack_latencies_ns: Vec<u64>,
    pub(crate) pkid_mismatch: u64,
    /// 1 if the gateway reset the connection after our DISCONNECT, every publish having
    /// been acknowledged (see `read_pubacks`).
    pub(crate) reset_after_disconnect: u64,
}

/// Where the devices publish: a gateway, or the cloud broker itself.
pub(crate) struct Target {
    pub(crate) name: &'static str,
    pub(crate) port: u16,
    pub(crate) topic_prefix: &'static str,
    /// `None`: each device's own certificate; `Some`: this one (the direct ceiling
    /// connects to the cloud broker, which trusts only the cloud CA).
    pub(crate) tls_override: Option<Arc<rustls::ClientConfig>>,
}

fn stamp(buf: &mut [u8], run: u32, dev: u32, seq: u64, sent_ns: u64) {
    buf[0..4].copy_from_slice(&run.to_be_bytes());
    buf[4..8].copy_from_slice(&dev.to_be_bytes());
    buf[8..16].copy_from_slice(&seq.to_be_bytes());
    buf[16..24].copy_from_slice(&sent_ns.to_be_bytes());
}

/// Most devices connecting (TCP, TLS, CONNECT) at the same time. Both gateways listen
/// with a short accept queue (blindgate 128, Mosquitto 100): 1,000 devices connecting
/// at once overflow it, and the kernel then resets some of the connections.
pub(crate) const MAX_CONNECTING: usize = 64;

/// Device `index` connects (holding a permit of `connecting` meanwhile), publishes to
/// `target` for the phase (seqs above `first_seq`) or until `stop` is set, then waits
/// for every PUBACK (up to 60 s) and disconnects.
pub(crate) async fn run_device(
    target: Arc<Target>,
    (index, device): (usize, Arc<Device>),
    phase: Phase,
    (first_seq, epoch): (u64, Instant),
    stop: Arc<AtomicBool>,
    connecting: Arc<Semaphore>,
) -> Result<DevResult> {
    let tls = target
        .tls_override
        .clone()
        .unwrap_or_else(|| device.tls_gateway.clone());
    // blindgate requires the client id to be the certificate's device id.
    let permit = connecting.acquire_owned().await?;
    let (stream, buf) = mqtt_connect(target.port, tls, &device.name)
        .await
        .context("connecting")?;
    drop(permit);
    let (rd, mut wr) = tokio::io::split(stream);
    let window = Arc::new(Semaphore::new(phase.window));
    let (tx, rx) = mpsc::unbounded_channel::<(u16, u64)>();
    let reader = tokio::spawn(read_pubacks(rd, buf, rx, window.clone(), epoch));

    let publisher = Publisher {
        topic: format!("{}{}/up", target.topic_prefix, device.name),
        device: device.clone(),
        index,
        phase,
        epoch,
        stop,
    };
    let sent = publisher
        .run(&mut wr, &window, &tx, first_seq)
        .await
        .context("publishing")?;

    // Every publish acknowledged: all permits are back.
    let all = u32::try_from(phase.window)?;
    let drained = tokio::time::timeout(Duration::from_secs(60), window.acquire_many(all)).await;
    let mut out = BytesMut::new();
    Disconnect.write(&mut out)?;
    let _ = wr.write_all(&out).await;
    let _ = wr.shutdown().await;
    drop(tx);
    let mut result = match tokio::time::timeout(Duration::from_secs(5), reader).await {
        Ok(joined) => joined??,
        Err(_) => bail!("{}: connection not closed after DISCONNECT", device.name),
    };
    if result.reset_after_disconnect > 0 && drained.is_err() {
        bail!(
            "{}: connection reset by the gateway with {} of {sent} publishes unacknowledged",
            device.name,
            sent - result.acked
        );
    }
    if drained.is_err() {
        eprintln!(
            "{}: {} of {sent} publishes never acknowledged",
            device.name,
            sent - result.acked
        );
    }
    result.sent = sent;
    Ok(result)
}

/// Whether `e` is a connection reset by the peer.
fn is_reset(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionReset)
    })
}

/// Reads PUBACKs until the connection closes, matching each to the oldest publish in
/// flight (`(pkid, send time)` from `rx`) and returning its permit to `window`.
///
/// A connection reset ends it like a close, noted in `reset_after_disconnect` (the
/// caller fails the device unless every publish was acknowledged before its DISCONNECT).
/// blindgate closes a session on DISCONNECT while the device's TLS close_notify, sent
/// right after it, may still be unread, and the kernel then answers with a reset.
async fn read_pubacks(
    mut rd: ReadHalf<Stream>,
    mut buf: BytesMut,
    mut rx: UnboundedReceiver<(u16, u64)>,
    window: Arc<Semaphore>,
    epoch: Instant,
) -> Result<DevResult> {
    let mut r = DevResult::default();
    loop {
        let packet = match read_packet(&mut rd, &mut buf).await {
            Ok(Some(packet)) => packet,
            Ok(None) => break,
            Err(e) if is_reset(&e) => {
                r.reset_after_disconnect = 1;
                break;
            }
            Err(e) => return Err(e),
        };
        if let Packet::PubAck(ack) = packet {
            // Both gateways and the broker acknowledge in publish order.
            let (pkid, sent) = rx
                .recv()
                .await
                .ok_or_else(|| anyhow!("PUBACK for nothing"))?;
            if pkid != ack.pkid {
                r.pkid_mismatch += 1;
            }
            r.ack_latencies_ns
                .push((epoch.elapsed().as_nanos() as u64).saturating_sub(sent));
            r.acked += 1;
            window.add_permits(1);
        }
    }
    Ok(r)
}

/// The publishing side of one device in one phase.
struct Publisher {
    topic: String,
    device: Arc<Device>,
    index: usize,
    phase: Phase,
    epoch: Instant,
    stop: Arc<AtomicBool>,
}

impl Publisher {
    /// Publishes until the phase's time is up, at its rate or as fast as `window`
    /// allows (then in batches of up to `MAX_BATCH`); returns how many were sent.
    async fn run(
        &self,
        wr: &mut WriteHalf<Stream>,
        window: &Semaphore,
        tx: &UnboundedSender<(u16, u64)>,
        first_seq: u64,
    ) -> Result<u64> {
        let phase = self.phase;
        let pt_len = phase
            .envelope_size
            .saturating_sub(e3::envelope_len(self.device.name.len(), 0))
            .max(STAMP_LEN);
        let mut plaintext = vec![0_u8; pt_len];
        let end = tokio::time::Instant::now() + Duration::from_secs_f64(phase.seconds);
        let mut ticker = phase.rate_per_device.map(|rate| {
            let period = Duration::from_secs_f64(1.0 / rate);
            let mut t = tokio::time::interval_at(self.first_tick(period).into(), period);
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            t
        });
        let mut out = BytesMut::with_capacity(MAX_BATCH * (phase.envelope_size + 64));
        let (mut seq, mut pkid, mut sent) = (first_seq, 0_u16, 0_u64);
        loop {
            if let Some(t) = ticker.as_mut() {
                tokio::select! {
                    _ = t.tick() => {}
                    () = tokio::time::sleep_until(end) => break,
                }
            }
            let left = phase.count.map_or(u64::MAX, |c| c.saturating_sub(sent));
            if tokio::time::Instant::now() >= end || left == 0 || self.stop.load(Ordering::Relaxed)
            {
                break;
            }
            let permit = tokio::select! {
                p = window.acquire() => p?,
                () = tokio::time::sleep_until(end) => break,
            };
            permit.forget();
            let mut n = 1;
            if ticker.is_none() {
                while n < MAX_BATCH && (n as u64) < left {
                    let Ok(p) = window.try_acquire() else { break };
                    p.forget();
                    n += 1;
                }
            }
            for _ in 0..n {
                pkid = if pkid == u16::MAX { 1 } else { pkid + 1 };
                seq += 1;
                self.write_publish(&mut out, &mut plaintext, pkid, seq, tx)?;
            }
            wr.write_all(&out).await?;
            out.clear();
            sent += n as u64;
        }
        Ok(sent)
    }

    /// When a paced device sends first: the devices of a phase take evenly spread
    /// places in the period, on one grid from the bench's epoch, whenever each of them
    /// connected. A place taken at random (the connect time) made how many devices send
    /// in the same millisecond, and so how many publishes a gateway can store with one
    /// fsync, differ from run to run: one gateway's CPU per message at 2,000 msg/s
    /// ranged from 71 to 135 µs over runs of the same binary.
    fn first_tick(&self, period: Duration) -> Instant {
        let n = self.phase.n_devices.max(1) as u128;
        let place = (self.index.saturating_sub(self.phase.first_device) as u128 % n)
            * period.as_nanos()
            / n;
        let since = self.epoch.elapsed().as_nanos();
        let periods = since.saturating_sub(place).div_ceil(period.as_nanos()) + 1;
        let at = place + periods * period.as_nanos();
        self.epoch + Duration::from_nanos(u64::try_from(at).unwrap_or(u64::MAX))
    }

    /// Stamps, seals and encodes one publish into `out`, and tells the PUBACK reader.
    fn write_publish(
        &self,
        out: &mut BytesMut,
        plaintext: &mut [u8],
        pkid: u16,
        seq: u64,
        tx: &UnboundedSender<(u16, u64)>,
    ) -> Result<()> {
        let now = self.epoch.elapsed().as_nanos() as u64;
        stamp(plaintext, self.phase.run, self.index as u32, seq, now);
        let envelope = self
            .device
            .key
            .seal(e3::Kind::Uplink, seq, plaintext)
            .map_err(|e| anyhow!("seal: {e:?}"))?;
        let mut publish = Publish::new(self.topic.as_str(), QoS::AtLeastOnce, envelope);
        publish.pkid = pkid;
        publish.write(out)?;
        tx.send((pkid, now))
            .map_err(|_| anyhow!("PUBACK reader stopped"))?;
        Ok(())
    }
}

/// Connects `devices` to `target` (at most [`MAX_CONNECTING`] at a time) and returns the
/// open connections, which stay connected and idle until dropped.
pub(crate) async fn connect_idle(target: &Target, devices: &[Arc<Device>]) -> Result<Vec<Stream>> {
    let gate = Arc::new(Semaphore::new(MAX_CONNECTING));
    let mut tasks = Vec::new();
    for device in devices {
        let tls = target
            .tls_override
            .clone()
            .unwrap_or_else(|| device.tls_gateway.clone());
        let (gate, port, name) = (gate.clone(), target.port, device.name.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = gate.acquire().await?;
            let (stream, _) = mqtt_connect(port, tls, &name).await?;
            anyhow::Ok(stream)
        }));
    }
    let mut streams = Vec::new();
    for t in tasks {
        streams.push(t.await??);
    }
    Ok(streams)
}
