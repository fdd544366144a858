//! One uplink connection, from TCP connect to its end.
//!
//! States, named for what they wait for: `ExpectConnAck` (TLS and MQTT handshake), then
//! `Forwarding` (records out, PUBACKs in, commands down) until the connection fails or
//! the gateway stops. rumqttc's event loop runs in its own task and is never cancelled
//! mid-poll (its writes are not cancel-safe); events reach this task over a channel.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use rumqttc::{
    AsyncClient, Event, EventLoop, Incoming, MqttOptions, Outgoing, QoS, TlsConfiguration,
    Transport,
};
use tokio::sync::{Notify, mpsc};
use tokio::time::sleep_until;
use tokio_util::sync::CancellationToken;

use super::flight::Flight;
use super::{Endpoint, UplinkSettings};
use crate::clock::now_ms;
use crate::ingress::DeviceRegistry;
use crate::ingress::validate::check_downlink;
use crate::metrics::{Metrics, UplinkFailure};
use crate::queue::Queue;

/// Most events handled before the window is refilled.
const EVENT_BATCH: usize = 256;

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

/// Everything one connection needs.
pub(crate) struct Connection<'a> {
    pub(crate) settings: &'a UplinkSettings,
    pub(crate) endpoint: &'a Endpoint,
    pub(crate) queue: &'a Queue,
    pub(crate) registry: &'a Arc<DeviceRegistry>,
    pub(crate) metrics: &'a Metrics,
}

/// Sends DISCONNECT and lets the event loop write it (bounded): records in flight
/// stay in the queue and go out again on the next connection.
async fn close(
    client: &AsyncClient,
    events: &mut mpsc::Receiver<Result<Event, rumqttc::ConnectionError>>,
) {
    let _ = client.try_disconnect();
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while let Some(Ok(_)) = events.recv().await {}
    })
    .await;
}

impl Connection<'_> {
    fn options(&self) -> MqttOptions {
        let s = self.settings;
        let mut options = MqttOptions::new(&s.client_id, &self.endpoint.host, self.endpoint.port);
        options
            .set_keep_alive(s.keep_alive)
            // A persistent session keeps commands for the gateway while it is away. Our
            // own publishes are resent from the queue, never by rumqttc: each connection
            // gets a fresh event loop, so rumqttc has nothing of its own to resend.
            .set_clean_session(false)
            // Four packet ids per record in our window: a reused id while its record
            // is unacknowledged means the broker lost an ack, and we reconnect.
            .set_inflight(u16::try_from(s.window.saturating_mul(4)).unwrap_or(u16::MAX))
            .set_max_packet_size(s.max_envelope + 1024, s.max_envelope + 1024)
            .set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
                Arc::clone(&s.tls),
            )));
        options
    }

    /// Runs the connection until it ends.
    pub(crate) async fn run(&self, shutdown: &CancellationToken, reconnect: &Notify) -> Ended {
        // Room for the whole window plus a subscribe and a disconnect: publishing never
        // waits on this channel.
        let (client, eventloop) = AsyncClient::new(self.options(), self.settings.window + 8);
        let (events_tx, mut events) = mpsc::channel(256);
        let poller = tokio::spawn(poll_events(eventloop, events_tx));
        let mut flight: Option<Flight> = None;
        let ended = loop {
            let paced = flight.as_ref().and_then(|f| f.paced_until);
            tokio::select! {
                biased;
                () = shutdown.cancelled() => {
                    close(&client, &mut events).await;
                    break Ended::Shutdown;
                }
                () = reconnect.notified() => {
                    tracing::info!(endpoint = %self.endpoint, "uplink reconnecting with reloaded settings");
                    close(&client, &mut events).await;
                    break Ended::Reconfigured;
                }
                event = events.recv() => match event {
                    Some(Ok(event)) => {
                        // Everything the event loop reported meanwhile (under load, a run
                        // of PUBACKs), then one refill of the window for all of them.
                        let (handled, failed) = self.on_events(&client, &mut flight, event, &mut events).await;
                        self.fill(&client, &mut flight);
                        if let Err(reason) = handled {
                            break Ended::Lost {
                                was_connected: flight.is_some(),
                                failure: UplinkFailure::Protocol,
                                detail: reason.to_owned(),
                            };
                        }
                        if let Some(err) = failed {
                            let was_connected = flight.is_some();
                            break Ended::Lost {
                                was_connected,
                                failure: super::failure::classify(&err, was_connected),
                                detail: err.to_string(),
                            };
                        }
                    }
                    Some(Err(err)) => {
                        let was_connected = flight.is_some();
                        break Ended::Lost {
                            was_connected,
                            failure: super::failure::classify(&err, was_connected),
                            detail: err.to_string(),
                        };
                    }
                    None => break Ended::Lost {
                        was_connected: flight.is_some(),
                        failure: UplinkFailure::Lost,
                        detail: "the event loop stopped".to_owned(),
                    },
                },
                () = self.queue.wait_for_records(), if flight.is_some() => {
                    self.fill(&client, &mut flight);
                }
                () = sleep_until(paced.unwrap_or_else(tokio::time::Instant::now)), if paced.is_some() => {
                    self.fill(&client, &mut flight);
                }
            }
        };
        poller.abort();
        self.metrics.uplink_connected.set(0);
        ended
    }

    /// Handles `first` and then every event already waiting (at most [`EVENT_BATCH`]),
    /// in order. Returns the first handling error, and the connection error if the
    /// event loop reported one after them.
    async fn on_events(
        &self,
        client: &AsyncClient,
        flight: &mut Option<Flight>,
        first: Event,
        events: &mut mpsc::Receiver<Result<Event, rumqttc::ConnectionError>>,
    ) -> (Result<(), &'static str>, Option<rumqttc::ConnectionError>) {
        let mut handled = self.on_event(client, flight, first).await;
        for _ in 1..EVENT_BATCH {
            if handled.is_err() {
                break;
            }
            match events.try_recv() {
                Ok(Ok(event)) => handled = self.on_event(client, flight, event).await,
                Ok(Err(err)) => return (handled, Some(err)),
                Err(_) => break,
            }
        }
        (handled, None)
    }

    async fn on_event(
        &self,
        client: &AsyncClient,
        flight: &mut Option<Flight>,
        event: Event,
    ) -> Result<(), &'static str> {
        match event {
            Event::Incoming(Incoming::ConnAck(_)) => {
                tracing::info!(endpoint = %self.endpoint, "uplink connected");
                self.metrics.uplink_connects.inc();
                // `uplink_connected` goes to 1 at the SUBACK: from then on a command the
                // cloud sends reaches this gateway.
                let filter = self.settings.down_topic.filter();
                client
                    .try_subscribe(filter, QoS::AtLeastOnce)
                    .map_err(|_| "request channel closed")?;
                *flight = Some(Flight::new(
                    self.settings.window,
                    self.settings.drain_rate,
                    now_ms(),
                ));
                self.fill(client, flight);
            }
            Event::Incoming(Incoming::SubAck(ack)) => {
                self.metrics.uplink_connected.set(1);
                if ack
                    .return_codes
                    .iter()
                    .any(|code| matches!(code, rumqttc::SubscribeReasonCode::Failure))
                {
                    tracing::error!(endpoint = %self.endpoint, filter = %self.settings.down_topic.filter(), "the cloud broker refused the gateway's subscription to its commands; messages are still forwarded, but no command can reach the devices (check the broker's ACL)");
                }
            }
            Event::Outgoing(Outgoing::Publish(pkid)) => {
                if let Some(f) = flight.as_mut() {
                    f.sent(pkid)
                        .map_err(|_| "packet id bookkeeping out of step")?;
                }
            }
            Event::Outgoing(Outgoing::AwaitAck(_)) => {
                return Err("broker left a packet id unacknowledged for a whole cycle");
            }
            Event::Incoming(Incoming::PubAck(ack)) => {
                // The caller refills the window once the waiting events are handled.
                if let Some((device, id)) = flight.as_mut().and_then(|f| f.acked(ack.pkid)) {
                    self.settle(&device, id);
                }
            }
            Event::Incoming(Incoming::Publish(publish)) => {
                self.downlink(&publish.topic, publish.payload)
            }
            _ => {}
        }
        Ok(())
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

    fn fill(&self, client: &AsyncClient, flight: &mut Option<Flight>) {
        let Some(flight) = flight.as_mut() else {
            return;
        };
        let up = &self.settings.up_topic;
        let result = flight.fill(self.queue, |record| {
            let topic = up.render(&record.device_id);
            // The request channel has room for the whole window, so this completes on
            // its first poll; `publish_bytes` hands over the payload without a copy.
            matches!(
                client
                    .publish_bytes(topic, QoS::AtLeastOnce, false, record.payload)
                    .now_or_never(),
                Some(Ok(()))
            )
        });
        if let Err(err) = result {
            tracing::error!(error = %err, "cannot read the queue");
        }
    }

    fn downlink(&self, topic: &str, payload: Bytes) {
        let settings = self.settings;
        let device = settings.down_topic.device_of(topic);
        let checked = device
            .ok_or(crate::metrics::DownlinkDrop::Invalid)
            .and_then(|device| {
                check_downlink(device, &payload, settings.max_envelope).map(|()| device)
            });
        match checked {
            Ok(device) => self.registry.deliver(device, payload),
            Err(reason) => {
                self.metrics
                    .downlink_dropped
                    .with_label_values(&[reason.as_str()])
                    .inc();
                tracing::warn!(
                    reason = reason.as_str(),
                    "cloud sent an invalid downlink message; dropped"
                );
            }
        }
    }
}

/// Drives rumqttc's event loop until its first error, forwarding every event.
async fn poll_events(
    mut eventloop: EventLoop,
    events: mpsc::Sender<Result<Event, rumqttc::ConnectionError>>,
) {
    loop {
        let event = eventloop.poll().await;
        let failed = event.is_err();
        if events.send(event).await.is_err() || failed {
            return;
        }
    }
}
