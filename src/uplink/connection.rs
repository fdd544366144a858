//! One uplink connection, from TCP connect to its end.
//!
//! After the handshake (`Link::connect`) one task runs the connection: a `select!` over
//! writing what is encoded, reading what the broker sent, new records in the queue, the
//! drain pacing and the keep-alive. Records go out as soon as the window has room;
//! everything picked in one fill leaves in one write. Every branch is cancel safe.

use std::time::Duration;

use bytes::Bytes;
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{Packet, SubscribeReasonCode};
use tokio::sync::Notify;
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;

use super::flight::{FillError, Flight};
use super::link::{Frame, Link, LinkError, packet_name};
use super::{Endpoint, UplinkSettings};
use crate::clock::now_ms;
use crate::ingress::DeviceRegistry;
use crate::ingress::validate::check_downlink;
use crate::metrics::{DownlinkDrop, Metrics, UplinkFailure};
use crate::queue::Queue;

/// How long a clean close may take to send what is pending and a DISCONNECT.
const CLOSE_LIMIT: Duration = Duration::from_secs(2);

/// How a connection ended.
pub(crate) enum Ended {
    /// The gateway is stopping; the connection was closed cleanly.
    Shutdown,
    /// A reload changed the cloud settings; the connection was closed cleanly.
    Reconfigured,
    /// The connection failed or was lost.
    Lost {
        /// True if the broker accepted the connection (CONNACK) before it ended.
        was_connected: bool,
        /// Why, from the closed set of the failure metric.
        failure: UplinkFailure,
        /// The error itself, for the log (never payload bytes).
        detail: String,
    },
}

impl Ended {
    fn lost(err: &LinkError, was_connected: bool) -> Self {
        Self::Lost {
            was_connected,
            failure: super::failure::classify(err, was_connected),
            detail: err.to_string(),
        }
    }
}

/// What woke the connection's loop.
enum Step {
    Shutdown,
    Reconfigured,
    Wrote,
    Read,
    /// New records, or the drain pacing allows more.
    Records,
    KeepAlive,
}

/// Everything one connection needs.
pub(crate) struct Connection<'a> {
    pub(crate) settings: &'a UplinkSettings,
    pub(crate) endpoint: &'a Endpoint,
    pub(crate) queue: &'a Queue,
    pub(crate) registry: &'a std::sync::Arc<DeviceRegistry>,
    pub(crate) metrics: &'a Metrics,
}

impl Connection<'_> {
    /// Runs the connection until it ends.
    pub(crate) async fn run(&self, shutdown: &CancellationToken, reconnect: &Notify) -> Ended {
        let link = tokio::select! {
            biased;
            () = shutdown.cancelled() => return Ended::Shutdown,
            () = reconnect.notified() => return Ended::Reconfigured,
            link = Link::connect(self.settings, self.endpoint) => match link {
                Ok(link) => link,
                Err(err) => return Ended::lost(&err, false),
            },
        };
        tracing::info!(endpoint = %self.endpoint, session_present = link.session_present, "uplink connected");
        self.metrics.uplink_connects.inc();
        let ended = self.forward(link, shutdown, reconnect).await;
        self.metrics.uplink_connected.set(0);
        ended
    }

    /// Subscribes to the commands, then forwards records until the connection ends.
    async fn forward(
        &self,
        mut link: Link,
        shutdown: &CancellationToken,
        reconnect: &Notify,
    ) -> Ended {
        let s = self.settings;
        let mut flight = Flight::new(s.window, s.drain_window, s.drain_rate, now_ms());
        // `uplink_connected` goes to 1 at the SUBACK: from then on a command the cloud
        // sends reaches this gateway.
        match flight.next_pkid() {
            Ok(pkid) => link.subscribe(&s.down_topic.filter(), pkid),
            Err(err) => return Ended::lost(&stuck(err), true),
        }
        let keep_alive = s.keep_alive.max(Duration::from_secs(1));
        let mut ping_due = tokio::time::interval_at(Instant::now() + keep_alive, keep_alive);
        // A loop busy for longer than a period must not see two ticks at once, or it
        // would judge the ping it just sent unanswered.
        ping_due.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut awaiting_pong = false;
        let mut result = self.fill(&mut link, &mut flight);
        while result.is_ok() {
            let paced = flight.paced_until;
            let (outbound, inbound) = link.halves();
            let step = tokio::select! {
                biased;
                () = shutdown.cancelled() => Ok(Step::Shutdown),
                () = reconnect.notified() => Ok(Step::Reconfigured),
                // Written first: the window refills only as acknowledgements come back.
                wrote = outbound.write_some(), if outbound.has_output() => wrote.map(|()| Step::Wrote),
                read = inbound.read_more() => read.map(|()| Step::Read),
                () = self.queue.wait_for_records() => Ok(Step::Records),
                () = sleep_until(paced.unwrap_or_else(Instant::now)), if paced.is_some() => Ok(Step::Records),
                _ = ping_due.tick() => Ok(Step::KeepAlive),
            };
            result = match step {
                Ok(Step::Shutdown) => {
                    link.close(CLOSE_LIMIT).await;
                    return Ended::Shutdown;
                }
                Ok(Step::Reconfigured) => {
                    tracing::info!(endpoint = %self.endpoint, "uplink reconnecting with reloaded settings");
                    link.close(CLOSE_LIMIT).await;
                    return Ended::Reconfigured;
                }
                Ok(Step::Wrote) => Ok(()),
                Ok(Step::Read) => self
                    .on_packets(&mut link, &mut flight, &mut awaiting_pong)
                    .and_then(|()| self.fill(&mut link, &mut flight)),
                Ok(Step::Records) => self.fill(&mut link, &mut flight),
                Ok(Step::KeepAlive) if awaiting_pong => Err(LinkError::PingTimeout),
                Ok(Step::KeepAlive) => {
                    awaiting_pong = true;
                    link.ping();
                    Ok(())
                }
                Err(err) => Err(err),
            };
        }
        let err = result.err().unwrap_or(LinkError::Closed);
        Ended::lost(&err, true)
    }

    /// Handles every whole packet read so far.
    fn on_packets(
        &self,
        link: &mut Link,
        flight: &mut Flight,
        awaiting_pong: &mut bool,
    ) -> Result<(), LinkError> {
        while let Some(frame) = link.decoded()? {
            let packet = match frame {
                Frame::Packet(packet) => packet,
                Frame::OversizePublish { pkid } => {
                    if let Some(pkid) = pkid {
                        link.puback(pkid);
                    }
                    self.drop_downlink(DownlinkDrop::Invalid, "larger than the largest envelope");
                    continue;
                }
            };
            match packet {
                Packet::PubAck(ack) => {
                    if let Some((device, id)) = flight.acked(ack.pkid) {
                        self.settle(&device, id);
                    }
                }
                Packet::Publish(publish) => {
                    match publish.qos {
                        QoS::AtMostOnce => {}
                        QoS::AtLeastOnce => link.puback(publish.pkid),
                        // We subscribed with QoS 1; a broker must not send more.
                        QoS::ExactlyOnce => {
                            return Err(LinkError::Protocol(
                                "the broker sent a QoS 2 message on a QoS 1 subscription"
                                    .to_owned(),
                            ));
                        }
                    }
                    self.downlink(&publish.topic, publish.payload);
                }
                Packet::PingResp => *awaiting_pong = false,
                Packet::SubAck(ack) => self.subscribed(&ack.return_codes),
                other => {
                    return Err(LinkError::Protocol(format!(
                        "unexpected {} from the broker",
                        packet_name(&other)
                    )));
                }
            }
        }
        Ok(())
    }

    fn subscribed(&self, codes: &[SubscribeReasonCode]) {
        self.metrics.uplink_connected.set(1);
        if codes
            .iter()
            .any(|code| matches!(code, SubscribeReasonCode::Failure))
        {
            tracing::error!(endpoint = %self.endpoint, filter = %self.settings.down_topic.filter(), "the cloud broker refused the gateway's subscription to its commands; messages are still forwarded, but no command can reach the devices (check the broker's ACL)");
        }
    }

    fn settle(&self, device: &str, id: crate::queue::RecordId) {
        match self.queue.ack(device, id) {
            Ok(_) => {
                self.metrics.forwarded.inc();
                let now = i64::try_from(now_ms() / 1000).unwrap_or(i64::MAX);
                self.metrics.last_cloud_ack_seconds.set(now);
            }
            Err(err) => {
                tracing::error!(error = %err, "cannot delete an acknowledged record; it will be sent again")
            }
        }
    }

    /// Encodes the next records, up to the free window, into the link's output.
    fn fill(&self, link: &mut Link, flight: &mut Flight) -> Result<(), LinkError> {
        let up = &self.settings.up_topic;
        let result = flight.fill(self.queue, |pkid, record| {
            link.publish(&up.render(&record.device_id), pkid, record.payload);
        });
        match result {
            Ok(_) => Ok(()),
            Err(FillError::Queue(err)) => {
                tracing::error!(error = %err, "cannot read the queue");
                Ok(())
            }
            Err(stuck_id) => Err(stuck(stuck_id)),
        }
    }

    fn downlink(&self, topic: &str, payload: Bytes) {
        let settings = self.settings;
        let device = settings.down_topic.device_of(topic);
        let checked = device.ok_or(DownlinkDrop::Invalid).and_then(|device| {
            check_downlink(device, &payload, settings.max_envelope).map(|()| device)
        });
        match checked {
            Ok(device) => self.registry.deliver(device, payload),
            Err(reason) => self.drop_downlink(reason, "a bad topic or header"),
        }
    }

    /// Counts and logs a downlink message that is not delivered (acknowledged to the
    /// broker all the same: sent again, it would be refused again).
    fn drop_downlink(&self, reason: DownlinkDrop, why: &str) {
        self.metrics
            .downlink_dropped
            .with_label_values(&[reason.as_str()])
            .inc();
        tracing::warn!(
            reason = reason.as_str(),
            why,
            "cloud sent an invalid downlink message; dropped"
        );
    }
}

/// The connection error for a packet id the broker never acknowledged.
fn stuck(err: FillError) -> LinkError {
    LinkError::Protocol(err.to_string())
}
