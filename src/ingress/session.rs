//! One device connection: MQTT 3.1.1 over any byte stream (TLS or, in the lab, plain).
//!
//! States: `ExpectConnect` (the first packet within the connect deadline), then
//! `Connected` until the device leaves, is taken over, breaks a rule, or the gateway
//! stops. A QoS 1 PUBLISH becomes a queue write; its PUBACK goes out only when the
//! queue says the record is durable, in the order the publishes arrived. At most
//! `max_inflight` writes per connection are pending; past that the session stops reading
//! from the socket, so TCP pushes back on the device instead of the gateway buffering.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::stream::FuturesOrdered;
use futures_util::{FutureExt as _, StreamExt};
use rumqttc::mqttbytes::v4::{
    ConnAck, ConnectReturnCode, Packet, PubAck, Publish, SubAck, SubscribeReasonCode, UnsubAck,
};
use rumqttc::mqttbytes::{Error as CodecError, QoS};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::time::{Instant, sleep, sleep_until, timeout};
use tokio_util::sync::CancellationToken;

use super::held::{Held, HeldPublish};
use super::validate::check_uplink;
use super::{Identity, Shared};
use crate::metrics::Rejection;
use crate::queue::EnqueueError;
use crate::rate::TokenBucket;

/// Downlink publishes sent to a device and not yet acknowledged by it.
const DOWNLINK_INFLIGHT: usize = 16;
/// How long a stopping gateway waits for pending queue writes before closing.
const DRAIN_DEADLINE: Duration = Duration::from_secs(5);
/// How long a session closed after the device's DISCONNECT waits for the device to
/// close its side.
const CLOSE_LINGER: Duration = Duration::from_millis(500);

type StoreFuture = Pin<Box<dyn Future<Output = (u16, QoS, Outcome)> + Send>>;

/// The outcome of one publish, decided before its PUBACK.
enum Outcome {
    /// Durable in the queue.
    Durable,
    /// Refused by a check; acknowledged so a poison message cannot block the device,
    /// never forwarded.
    Refused,
    /// Not stored (shutdown): no PUBACK, the device will send it again.
    Abandoned,
}

/// What an idle connection keeps to read into: a PINGREQ or a small reading fits.
const READ_IDLE: usize = 512;
/// What a connection whose reads fill its buffer reads into.
const READ_CHUNK: usize = 4096;
/// Most room made ahead for a packet's missing bytes: a device that only announces a
/// large packet does not get the memory for it before it sends the bytes.
const MAX_ROOM_AHEAD: usize = 64 << 10;

struct Conn<S> {
    reader: ReadHalf<S>,
    writer: WriteHalf<S>,
    inbuf: BytesMut,
    /// The last read filled all the room there was: more is probably waiting.
    filled: bool,
    /// Bytes the packet at the front of `inbuf` still lacks (0: none started). A read
    /// makes room for them at once (up to [`MAX_ROOM_AHEAD`]), so a 16 KiB PUBLISH grows
    /// the buffer once, not by doubling from a few KiB, copying what it holds each time.
    missing: usize,
    outbuf: BytesMut,
    max_packet: usize,
}

impl<S: AsyncRead + AsyncWrite> Conn<S> {
    /// A complete packet from the buffer, `Ok(None)` if more bytes are needed.
    fn try_parse(&mut self) -> Result<Option<Packet>, CodecError> {
        self.missing = 0;
        match Packet::read(&mut self.inbuf, self.max_packet) {
            Ok(packet) => Ok(Some(packet)),
            // At most `max_packet` and a header: larger packets are refused unread.
            Err(CodecError::InsufficientBytes(missing)) => {
                // An empty buffer "lacks" two bytes too: no packet started there.
                if !self.inbuf.is_empty() {
                    self.missing = missing;
                }
                Ok(None)
            }
            Err(err) => Err(err),
        }
    }

    async fn read_packet(&mut self) -> Result<Packet, CodecError> {
        loop {
            if let Some(packet) = self.try_parse()? {
                return Ok(packet);
            }
            match self.read_more().await {
                Ok(0) | Err(_) => return Err(CodecError::InsufficientBytes(1)),
                Ok(_) => {}
            }
        }
    }

    /// Reads what the device sent. Cancel safe. Most devices are idle most of the
    /// time, so a connection with nothing left to parse whose last read was short goes
    /// back to [`READ_IDLE`] bytes; one whose reads fill the buffer gets [`READ_CHUNK`].
    async fn read_more(&mut self) -> std::io::Result<usize> {
        let missing = self.missing.min(MAX_ROOM_AHEAD);
        let room_for = if self.filled { READ_CHUNK } else { 0 }.max(missing);
        if room_for > 0 {
            self.inbuf.reserve(room_for);
        } else if self.inbuf.is_empty() && self.inbuf.capacity() > READ_IDLE {
            self.inbuf = BytesMut::with_capacity(READ_IDLE);
        }
        let room = self.inbuf.capacity() - self.inbuf.len();
        let n = self.reader.read_buf(&mut self.inbuf).await?;
        self.filled = n >= room;
        Ok(n)
    }

    fn queue(&mut self, packet: &Packet) {
        // Outgoing packets are ours and small (or downlink envelopes checked earlier),
        // so the size limit here is generous.
        let _ = packet.write(&mut self.outbuf, usize::MAX);
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        if self.outbuf.is_empty() {
            return Ok(());
        }
        self.writer.write_all(&self.outbuf).await?;
        self.outbuf.clear();
        self.writer.flush().await
    }

    /// Closes after the device's DISCONNECT without a reset: our side first (TLS
    /// `close_notify`, FIN), then what the device still sends (its own `close_notify`)
    /// is read and dropped until it closes too, for at most [`CLOSE_LINGER`]. Closing a
    /// socket with unread bytes makes the kernel send RST, which the device reports as
    /// "connection reset" after a clean disconnect.
    async fn close(&mut self) {
        let _ = self.flush().await;
        let _ = timeout(CLOSE_LINGER, async {
            let _ = self.writer.shutdown().await;
            let mut discard = [0u8; 512];
            while matches!(self.reader.read(&mut discard).await, Ok(n) if n > 0) {}
        })
        .await;
    }
}

/// Runs one connection to the end, as a boxed future.
///
/// A connection's task future is as large as its largest state for the connection's
/// whole life, so what only the start needs must not stay in it. Hence a plain function:
/// the stream (with its TLS state, about 1.2 KiB) moves into the split's shared half
/// here, where an `async fn` would keep room for its argument throughout. And boxed here:
/// boxed by the caller inside an `async fn`, rustc would still keep room for the unboxed
/// temporary in the caller's state.
pub(crate) fn run<S>(
    shared: Arc<Shared>,
    stream: S,
    identity: Identity,
    shutdown: CancellationToken,
) -> Pin<Box<impl Future<Output = ()> + Send>>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (reader, writer) = tokio::io::split(stream);
    let conn = Conn {
        reader,
        writer,
        inbuf: BytesMut::with_capacity(READ_IDLE),
        filled: false,
        missing: 0,
        // Grows to what a turn of the loop writes (PUBACKs, a downlink message).
        outbuf: BytesMut::new(),
        max_packet: shared.settings.max_packet,
    };
    Box::pin(run_split(shared, conn, identity, shutdown))
}

async fn run_split<S>(
    shared: Arc<Shared>,
    mut conn: Conn<S>,
    identity: Identity,
    shutdown: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    // Boxed and freed once done: the CONNECT's packet and deadline would otherwise keep
    // their room in this future for as long as the device stays connected.
    let connected = Box::pin(connect(&shared, &mut conn, &identity));
    let Some((device, keep_alive)) = connected.await else {
        return;
    };
    let mut session = Session::new(Arc::clone(&shared), device, keep_alive);
    shared.metrics.connections.inc();
    tracing::debug!(device = %session.device, "device connected");
    session.serve(&mut conn, &shutdown).await;
    shared.metrics.connections.dec();
    session.finish();
}

/// The device's CONNECT within the deadline, answered: the device id and keep-alive
/// limit if it is accepted; `None` (counted) if not.
async fn connect<S>(
    shared: &Shared,
    conn: &mut Conn<S>,
    identity: &Identity,
) -> Option<(String, Duration)>
where
    S: AsyncRead + AsyncWrite,
{
    let deadline = shared.settings.connect_timeout;
    let connect = match timeout(deadline, conn.read_packet()).await {
        Ok(Ok(Packet::Connect(connect))) => connect,
        _ => {
            shared.reject(
                Rejection::BadConnect,
                "no valid CONNECT within the deadline",
            );
            return None;
        }
    };
    let Some(device) = identity.device_id(&connect.client_id) else {
        shared.reject(
            Rejection::NoIdentity,
            "certificate names no valid device id",
        );
        conn.queue(&Packet::ConnAck(ConnAck::new(
            ConnectReturnCode::NotAuthorized,
            false,
        )));
        let _ = conn.flush().await;
        return None;
    };
    conn.queue(&Packet::ConnAck(ConnAck::new(
        ConnectReturnCode::Success,
        false,
    )));
    conn.flush().await.ok()?;
    let keep_alive = Duration::from_secs(u64::from(connect.keep_alive)) * 3 / 2;
    Some((device, keep_alive))
}

struct Session {
    shared: Arc<Shared>,
    device: Arc<str>,
    up_topic: String,
    down_topic: String,
    slot: super::registry::SessionSlot,
    subscribed: bool,
    pending: FuturesOrdered<StoreFuture>,
    /// Downlink publishes awaiting the device's PUBACK, in send order.
    downlink_out: VecDeque<(u16, Bytes)>,
    next_pkid: u16,
    bucket: TokenBucket,
    keep_alive: Duration,
    last_seen: Instant,
    /// Publishes the queue could not take yet, in arrival order (see `held`).
    held: Held,
}

/// What the packet handler wants next.
enum Next {
    Continue,
    Close,
}

impl Session {
    fn new(shared: Arc<Shared>, device: String, keep_alive: Duration) -> Self {
        let settings = &shared.settings;
        let slot = shared.registry.register(&device);
        Self {
            up_topic: settings.up_topic.render(&device),
            down_topic: settings.down_topic.render(&device),
            bucket: TokenBucket::new(settings.rate_per_sec, settings.rate_burst),
            device: device.into(),
            slot,
            subscribed: false,
            pending: FuturesOrdered::new(),
            downlink_out: VecDeque::new(),
            next_pkid: 0,
            keep_alive,
            last_seen: Instant::now(),
            held: Held::new(),
            shared,
        }
    }

    async fn serve<S: AsyncRead + AsyncWrite>(
        &mut self,
        conn: &mut Conn<S>,
        shutdown: &CancellationToken,
    ) {
        let max_inflight = self.shared.settings.max_inflight.max(1);
        loop {
            self.pump_held();
            while self.can_read(max_inflight) {
                match conn.try_parse() {
                    Ok(Some(packet)) => {
                        self.last_seen = Instant::now();
                        let next = self.handle(conn, packet).await;
                        if let Next::Close = next {
                            // Boxed, as the drain below: rare paths, kept out of the
                            // session's future, which lives as long as the connection.
                            let close = Box::pin(conn.close());
                            close.await;
                            return;
                        }
                    }
                    Ok(None) => break,
                    Err(err) => {
                        let reason = match err {
                            CodecError::PayloadSizeLimitExceeded(_) => Rejection::Oversize,
                            _ => Rejection::MalformedPacket,
                        };
                        self.shared
                            .reject(reason, "undecodable MQTT packet; closing");
                        return;
                    }
                }
            }
            if let Err(err) = conn.flush().await {
                tracing::debug!(device = %self.device, error = %err, "writing to the device failed; closing");
                return;
            }
            let can_read = self.can_read(max_inflight);
            if !can_read {
                // Not reading is our doing (the queue pushes back): the device's PINGREQs
                // wait in the socket, so its keep-alive clock does not run meanwhile.
                self.last_seen = Instant::now();
            }
            let retry_at = self.held.retry_at();
            let can_send = self.subscribed && self.downlink_out.len() < DOWNLINK_INFLIGHT;
            let idle_deadline = self.last_seen + self.keep_alive;
            tokio::select! {
                () = shutdown.cancelled() => {
                    let drain = Box::pin(self.drain(conn));
                    drain.await;
                    return;
                }
                () = self.slot.kicked.cancelled() => {
                    tracing::info!(device = %self.device, "device connected again elsewhere; closing this session");
                    return;
                }
                Some((pkid, qos, stored)) = self.pending.next(), if !self.pending.is_empty() => {
                    self.settle(conn, pkid, qos, stored);
                    // One group commit makes many records durable at once: take every
                    // outcome that is ready, so their PUBACKs leave in one write.
                    while let Some(Some((pkid, qos, stored))) = self.pending.next().now_or_never() {
                        self.settle(conn, pkid, qos, stored);
                    }
                }
                read = conn.read_more(), if can_read => {
                    if !matches!(read, Ok(n) if n > 0) {
                        tracing::debug!(device = %self.device, read = ?read.map_err(|e| e.to_string()), "the device closed the connection");
                        // The device left (or the socket broke): finish what is in flight
                        // so durable records are counted; PUBACKs cannot be sent anyway.
                        return;
                    }
                }
                () = self.slot.wake.notified(), if can_send => self.send_waiting(conn),
                () = sleep_until(retry_at.unwrap_or(idle_deadline)), if retry_at.is_some() => {}
                () = sleep_until(idle_deadline), if can_read && !self.keep_alive.is_zero() => {
                    tracing::info!(device = %self.device, "keep-alive expired; closing");
                    return;
                }
            }
        }
    }

    /// Shutdown: stop reading, let the queue finish pending writes, send their PUBACKs.
    async fn drain<S: AsyncRead + AsyncWrite>(&mut self, conn: &mut Conn<S>) {
        let deadline = sleep(DRAIN_DEADLINE);
        tokio::pin!(deadline);
        while !self.pending.is_empty() {
            tokio::select! {
                Some((pkid, qos, stored)) = self.pending.next() => self.settle(conn, pkid, qos, stored),
                () = &mut deadline => break,
            }
        }
        let _ = conn.flush().await;
    }

    fn settle<S: AsyncRead + AsyncWrite>(
        &mut self,
        conn: &mut Conn<S>,
        pkid: u16,
        qos: QoS,
        stored: Outcome,
    ) {
        if let Outcome::Durable = stored {
            self.shared.metrics.received.inc();
        }
        let acked = matches!(stored, Outcome::Durable | Outcome::Refused);
        if acked && qos == QoS::AtLeastOnce {
            conn.queue(&Packet::PubAck(PubAck::new(pkid)));
        }
    }

    async fn handle<S: AsyncRead + AsyncWrite>(
        &mut self,
        conn: &mut Conn<S>,
        packet: Packet,
    ) -> Next {
        match packet {
            Packet::Publish(publish) => return self.on_publish(publish).await,
            Packet::PubAck(ack) => self.on_downlink_ack(conn, ack.pkid),
            Packet::Subscribe(subscribe) => {
                let codes = subscribe
                    .filters
                    .iter()
                    .map(|f| self.subscription(&f.path, f.qos))
                    .collect();
                conn.queue(&Packet::SubAck(SubAck::new(subscribe.pkid, codes)));
                if self.subscribed {
                    self.shared
                        .registry
                        .subscribed(&self.device, self.slot.session);
                }
            }
            Packet::Unsubscribe(unsubscribe) => {
                if unsubscribe.topics.contains(&self.down_topic) {
                    self.subscribed = false;
                }
                conn.queue(&Packet::UnsubAck(UnsubAck::new(unsubscribe.pkid)));
            }
            Packet::PingReq => conn.queue(&Packet::PingResp),
            Packet::Disconnect => return Next::Close,
            Packet::Connect(_) => {
                self.shared
                    .reject(Rejection::MalformedPacket, "second CONNECT; closing");
                return Next::Close;
            }
            // QoS 2 flow and server-only packets: not part of what a device may send here.
            _ => {
                self.shared.reject(
                    Rejection::MalformedPacket,
                    "unexpected packet type; closing",
                );
                return Next::Close;
            }
        }
        Next::Continue
    }

    fn subscription(&mut self, filter: &str, qos: QoS) -> SubscribeReasonCode {
        if filter == self.down_topic {
            self.subscribed = true;
            let granted = if qos == QoS::AtMostOnce {
                QoS::AtMostOnce
            } else {
                QoS::AtLeastOnce
            };
            SubscribeReasonCode::Success(granted)
        } else {
            self.shared.reject(
                Rejection::SubscribeNotAllowed,
                "subscription outside the device's own downlink topic",
            );
            SubscribeReasonCode::Failure
        }
    }

    async fn on_publish(&mut self, publish: Publish) -> Next {
        if publish.qos == QoS::ExactlyOnce {
            self.shared.reject(
                Rejection::Qos2,
                "QoS 2 publish; only QoS 0 and 1 are supported",
            );
            return Next::Close;
        }
        if publish.topic != self.up_topic {
            // Publishing as another device (or anywhere else) is an authorisation
            // failure: MQTT 3.1.1 has no negative PUBACK, so the connection is closed.
            self.shared.reject(
                Rejection::TopicNotAllowed,
                "publish outside the device's own uplink topic; closing",
            );
            return Next::Close;
        }
        let wait = self.bucket.take(Instant::now());
        if !wait.is_zero() {
            sleep(wait).await;
        }
        let (pkid, qos) = (publish.pkid, publish.qos);
        let max = self.shared.settings.max_envelope;
        if let Err(reason) = check_uplink(&self.device, &publish.payload, max) {
            self.shared
                .reject(reason, "envelope refused; acknowledged and dropped");
            // Its PUBACK waits for those of the publishes held before it.
            self.held.push(HeldPublish::Refused { pkid, qos });
        } else {
            self.held.push(HeldPublish::Store(publish));
        }
        self.pump_held();
        Next::Continue
    }

    /// True while the session may read another packet: the in-flight window has room
    /// and the held publishes are within their byte bound.
    fn can_read(&self, max_inflight: usize) -> bool {
        self.pending.len() + self.held.len() < max_inflight && self.held.has_room()
    }

    /// Hands the held publishes to the queue, in order, without waiting, until the
    /// queue refuses one. Their durability is awaited among the pending writes; a
    /// refused one stays first and the next try is scheduled with a growing pause (the
    /// device gets no PUBACK for it meanwhile and keeps its data).
    fn pump_held(&mut self) {
        while let Some(front) = self.held.due_front(Instant::now()) {
            let (pkid, qos, submitted) = match front {
                HeldPublish::Refused { pkid, qos } => (*pkid, *qos, None),
                HeldPublish::Store(publish) => {
                    let payload = &publish.payload;
                    let size = u32::try_from(payload.len()).unwrap_or(u32::MAX).max(1);
                    let permit =
                        Arc::clone(&self.shared.inflight_bytes).try_acquire_many_owned(size);
                    let submitted = match permit {
                        Ok(permit) => self
                            .shared
                            .queue
                            .submit(&self.device, payload)
                            .map(|write| (write, permit)),
                        Err(_) => Err(EnqueueError::Busy),
                    };
                    (publish.pkid, publish.qos, Some(submitted))
                }
            };
            match submitted {
                None => {
                    self.held.pop_front();
                    self.pending
                        .push_back(Box::pin(async move { (pkid, qos, Outcome::Refused) }));
                }
                Some(Ok((write, permit))) => {
                    self.held.pop_front();
                    self.pending.push_back(Box::pin(async move {
                        let outcome = match write.durable().await {
                            Ok(_) => Outcome::Durable,
                            Err(_) => Outcome::Abandoned,
                        };
                        drop(permit);
                        (pkid, qos, outcome)
                    }));
                }
                Some(Err(err)) => {
                    let first = self.held.refused(Instant::now());
                    if first && !matches!(err, EnqueueError::Busy | EnqueueError::Closed) {
                        self.shared.metrics.reject(Rejection::QueueFull);
                    }
                    if self.shared.log.check(err.reason()).is_some()
                        && !matches!(err, EnqueueError::Busy)
                    {
                        tracing::warn!(reason = err.reason(), error = %err, "queue refused a record; holding the PUBACK until it has room");
                    }
                    return;
                }
            }
        }
    }

    fn send_downlink<S: AsyncRead + AsyncWrite>(&mut self, conn: &mut Conn<S>, message: Bytes) {
        self.next_pkid = self.next_pkid.checked_add(1).unwrap_or(1).max(1);
        let mut publish = Publish::new(self.down_topic.clone(), QoS::AtLeastOnce, Vec::new());
        publish.payload = message.clone();
        publish.pkid = self.next_pkid;
        conn.queue(&Packet::Publish(publish));
        self.downlink_out.push_back((self.next_pkid, message));
    }

    /// Sends what waits in the registry for this device, as far as the window allows.
    fn send_waiting<S: AsyncRead + AsyncWrite>(&mut self, conn: &mut Conn<S>) {
        let room = DOWNLINK_INFLIGHT.saturating_sub(self.downlink_out.len());
        if !self.subscribed || room == 0 {
            return;
        }
        for message in self
            .shared
            .registry
            .take(&self.device, self.slot.session, room)
        {
            self.send_downlink(conn, message);
        }
    }

    fn on_downlink_ack<S: AsyncRead + AsyncWrite>(&mut self, conn: &mut Conn<S>, pkid: u16) {
        if let Some(at) = self.downlink_out.iter().position(|(id, _)| *id == pkid) {
            self.downlink_out.remove(at);
            self.shared.metrics.downlink_delivered.inc();
            self.send_waiting(conn);
        }
    }

    /// Hands every downlink message this session still holds back to the registry.
    fn finish(mut self) {
        let undelivered: Vec<Bytes> = self.downlink_out.drain(..).map(|(_, m)| m).collect();
        self.shared
            .registry
            .unregister(&self.device, self.slot.session, undelivered);
        tracing::debug!(device = %self.device, "device disconnected");
    }
}
