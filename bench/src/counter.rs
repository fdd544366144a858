//! The cloud-side counter: subscribes to the cloud broker (QoS 1), opens every E3
//! envelope with the device keys, and counts per run what arrived: unique envelopes,
//! duplicates, reordering, envelopes that did not open or did not match their header,
//! strays of earlier runs, and each envelope's end-to-end latency from the send time
//! sealed in its plaintext.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use anyhow::{Result, bail};
use bytes::BytesMut;
use rumqttc::mqttbytes::v4::{Packet, PubAck, Subscribe};
use rumqttc::mqttbytes::{Error as MqttError, QoS};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::load::device_key;
use crate::mqtt::{MAX_PACKET, mqtt_connect};

/// The cloud topic filter the counter subscribes to (both gateways publish here).
const CLOUD_FILTER: &str = "gw/gw-1/e3/+/up";

/// What the counter saw of one device in the current run.
#[derive(Default)]
pub(crate) struct DevSeen {
    /// Seqs above `base` were sent in this run; `counts[seq - base - 1]` = copies seen.
    base: u64,
    pub(crate) counts: Vec<u8>,
    max_seq: u64,
}

/// The counts of the current run.
#[derive(Default)]
pub(crate) struct CounterState {
    run: u32,
    pub(crate) devs: Vec<DevSeen>,
    pub(crate) received: u64,
    pub(crate) duplicates: u64,
    pub(crate) reordered: u64,
    /// Envelopes that did not open, or whose plaintext did not match the header.
    pub(crate) bad: u64,
    /// Envelopes of an earlier run (late) or of an unknown device.
    pub(crate) stray: u64,
    pub(crate) latencies_ns: Vec<u64>,
    first_rx_ns: u64,
    pub(crate) last_rx_ns: u64,
    /// Devices below `split` are the backlog's, the others the live traffic's (the
    /// backlog drain scenario; `usize::MAX` in every other).
    split: usize,
    /// Unique envelopes of devices below `split`, and when the first and last arrived.
    pub(crate) low_received: u64,
    pub(crate) low_first_rx_ns: u64,
    pub(crate) low_last_rx_ns: u64,
    /// End-to-end latencies of the envelopes of devices from `split` on.
    pub(crate) live_latencies_ns: Vec<u64>,
}

pub(crate) struct Counter {
    /// Time zero of the send times sealed in the plaintexts.
    pub(crate) epoch: Instant,
    keys: Vec<e3::DeviceKey>,
    index: HashMap<String, usize>,
    state: Mutex<CounterState>,
}

impl Counter {
    /// A counter holding the keys of devices `names` (index = position in `names`).
    pub(crate) fn new(names: &[String]) -> Result<Self> {
        Ok(Self {
            epoch: Instant::now(),
            keys: names
                .iter()
                .enumerate()
                .map(|(i, n)| device_key(n, i))
                .collect::<Result<_>>()?,
            index: names
                .iter()
                .enumerate()
                .map(|(i, n)| (n.clone(), i))
                .collect(),
            state: Mutex::new(CounterState::default()),
        })
    }

    /// Starts counting run `run`, whose device `i` sends seqs above `bases[i]`; devices
    /// below `split` are counted apart from the others (`usize::MAX`: not at all).
    pub(crate) fn reset_split(&self, run: u32, bases: &[u64], split: usize) {
        let mut s = self.lock();
        *s = CounterState {
            run,
            devs: bases
                .iter()
                .map(|&base| DevSeen {
                    base,
                    ..DevSeen::default()
                })
                .collect(),
            split,
            ..CounterState::default()
        };
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, CounterState> {
        // A panic while holding the lock cannot leave the counts half-updated in a way
        // that matters more than the panic itself: take the state anyway.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Unique envelopes of the current run checked so far.
    pub(crate) fn received(&self) -> u64 {
        self.lock().received
    }

    fn check(&self, envelope: &[u8]) {
        let now = self.epoch.elapsed().as_nanos() as u64;
        let opened = e3::Header::parse(envelope)
            .ok()
            .and_then(|h| self.index.get(h.device_id()).copied())
            .and_then(|i| {
                self.keys[i]
                    .open(envelope)
                    .ok()
                    .map(|(h, pt)| (i, h.seq(), pt))
            });
        let mut s = self.lock();
        let Some((index, seq, pt)) = opened else {
            s.bad += 1;
            return;
        };
        let field = |at: usize, len: usize| -> u64 {
            pt.get(at..at + len)
                .map(|b| b.iter().fold(0_u64, |acc, &x| (acc << 8) | u64::from(x)))
                .unwrap_or(u64::MAX)
        };
        let (run, dev, pseq, sent) = (field(0, 4), field(4, 4), field(8, 8), field(16, 8));
        if dev != index as u64 || pseq != seq {
            s.bad += 1;
            return;
        }
        if run != u64::from(s.run) {
            s.stray += 1;
            return;
        }
        let Some(d) = s.devs.get_mut(index) else {
            s.stray += 1;
            return;
        };
        if seq <= d.base || seq - d.base > 100_000_000 {
            s.stray += 1;
            return;
        }
        let slot = (seq - d.base - 1) as usize;
        if d.counts.len() <= slot {
            d.counts.resize(slot + 1, 0);
        }
        d.counts[slot] = d.counts[slot].saturating_add(1);
        let duplicate = d.counts[slot] > 1;
        let reordered = seq < d.max_seq;
        d.max_seq = d.max_seq.max(seq);
        if duplicate {
            s.duplicates += 1;
            return;
        }
        if reordered {
            s.reordered += 1;
        }
        s.received += 1;
        if s.first_rx_ns == 0 {
            s.first_rx_ns = now;
        }
        s.last_rx_ns = now;
        s.latencies_ns.push(now.saturating_sub(sent));
        if index < s.split {
            s.low_received += 1;
            if s.low_first_rx_ns == 0 {
                s.low_first_rx_ns = now;
            }
            s.low_last_rx_ns = now;
        } else {
            s.live_latencies_ns.push(now.saturating_sub(sent));
        }
    }
}

/// Subscribes to the cloud broker (QoS 1) and checks every envelope until the end.
///
/// Reading never waits for writing: the PUBACKs go out from a task of their own. A
/// counter that stopped reading until its acknowledgements were written could stall
/// with the broker, each side's receive buffer full and each waiting for the other to
/// read (seen as drains that stopped for 5 s, TCP zero-window probes on both sides).
pub(crate) async fn run_counter(
    counter: Arc<Counter>,
    port: u16,
    tls: Arc<rustls::ClientConfig>,
) -> Result<()> {
    let (stream, mut buf) = mqtt_connect(port, tls, "bench-counter").await?;
    let (mut rd, wr) = tokio::io::split(stream);
    let mut sub = Subscribe::new(CLOUD_FILTER, QoS::AtLeastOnce);
    sub.pkid = 1;
    let mut out = BytesMut::new();
    sub.write(&mut out)?;
    let (acks, pending) = tokio::sync::mpsc::unbounded_channel();
    let writer = tokio::spawn(write_acks(wr, pending));
    acks.send(out.split().freeze())?;
    loop {
        // Handle every complete packet in the buffer, then hand their acknowledgements to
        // the writer in one piece.
        loop {
            match Packet::read(&mut buf, MAX_PACKET) {
                Ok(Packet::Publish(p)) => {
                    if p.qos != QoS::AtMostOnce {
                        PubAck::new(p.pkid).write(&mut out)?;
                    }
                    counter.check(&p.payload);
                }
                Ok(_) => {}
                Err(MqttError::InsufficientBytes(_)) => break,
                Err(e) => bail!("counter: bad MQTT packet: {e:?}"),
            }
        }
        if !out.is_empty() && acks.send(out.split().freeze()).is_err() {
            // The writer stopped: its error says why.
            return writer.await?;
        }
        if rd.read_buf(&mut buf).await? == 0 {
            bail!("the cloud broker closed the counter's connection");
        }
    }
}

/// Writes the counter's acknowledgements as they come, joining those already waiting
/// into one write.
async fn write_acks(
    mut wr: impl tokio::io::AsyncWrite + Unpin,
    mut pending: tokio::sync::mpsc::UnboundedReceiver<bytes::Bytes>,
) -> Result<()> {
    let mut out = BytesMut::new();
    while let Some(first) = pending.recv().await {
        out.extend_from_slice(&first);
        while let Ok(more) = pending.try_recv() {
            out.extend_from_slice(&more);
        }
        wr.write_all(&out).await?;
        out.clear();
    }
    Ok(())
}
