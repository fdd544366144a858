//! The cloud side's view of the cloud broker in tests: a rumqttc client with the
//! cloud-ingest certificate that subscribes (QoS 1, persistent session) to the
//! gateways' uplink topics, records every publish it receives, and publishes downlink
//! messages. It reconnects and resubscribes by itself when the broker restarts.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use blindgate::pki::DevPki;
use rumqttc::{
    AsyncClient, Event, EventLoop, MqttOptions, Outgoing, Packet, QoS, SubscribeReasonCode,
    TlsConfiguration, Transport,
};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

/// How long [`CloudSubscriber::connect`] and [`CloudSubscriber::publish`] may take.
const DEADLINE: Duration = Duration::from_secs(10);
/// Pause after a connection error before rumqttc dials again.
const RECONNECT_PAUSE: Duration = Duration::from_millis(200);

/// A received publish: topic and payload.
pub type Received = (String, Vec<u8>);

/// A subscriber on the cloud broker; its event loop task stops on drop.
#[derive(Debug)]
pub struct CloudSubscriber {
    client: AsyncClient,
    shared: Arc<Shared>,
    /// Number of SUBACKs so far: one per session the broker did not remember.
    subscribed: watch::Receiver<u64>,
    /// Number of publishes received so far.
    arrived: watch::Receiver<usize>,
    task: JoinHandle<()>,
}

/// What the event loop task and the test share; nothing awaits under these locks.
#[derive(Debug, Default)]
struct Shared {
    /// Every publish received, in arrival order, duplicates included (QoS 1 may
    /// redeliver after a reconnect).
    received: Mutex<Vec<Received>>,
    publishes: Mutex<Unacked>,
    /// The last connection or subscription error, for timeout messages.
    last_error: Mutex<Option<String>>,
}

/// Our own publishes waiting for their PUBACK.
#[derive(Debug, Default)]
struct Unacked {
    /// Queued in rumqttc, packet id not yet known; rumqttc sends requests in order.
    queued: VecDeque<oneshot::Sender<()>>,
    /// Sent with this packet id.
    sent: HashMap<u16, oneshot::Sender<()>>,
}

impl CloudSubscriber {
    /// Connects to the cloud broker on 127.0.0.1:`port` (server name `localhost`, cloud
    /// CA, cloud-ingest client certificate) as `client_id` with `clean_session =
    /// false`, subscribes to `filter` with QoS 1 and returns after the SUBACK.
    ///
    /// Panics if that takes more than 10 s.
    pub async fn connect(port: u16, pki: &DevPki, client_id: &str, filter: &str) -> Self {
        let tls = super::client_tls(
            &pki.cloud_ca.cert,
            &pki.cloud_ingest.cert,
            &pki.cloud_ingest.key,
        );
        let mut options = MqttOptions::new(client_id, "localhost", port);
        options.set_keep_alive(Duration::from_secs(30));
        options.set_clean_session(false);
        options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls)));
        options.set_max_packet_size(1 << 20, 1 << 20);
        let (client, eventloop) = AsyncClient::new(options, 64);
        let shared = Arc::new(Shared::default());
        let (subscribed_tx, subscribed) = watch::channel(0);
        let (arrived_tx, arrived) = watch::channel(0);
        let task = tokio::spawn(run(
            eventloop,
            client.clone(),
            filter.to_owned(),
            Arc::clone(&shared),
            subscribed_tx,
            arrived_tx,
        ));
        let subscriber = Self {
            client,
            shared,
            subscribed,
            arrived,
            task,
        };
        subscriber.wait_subscribed(1, DEADLINE).await;
        subscriber
    }

    /// How many times the subscription was (re)made: 1 after [`connect`](Self::connect),
    /// one more after each broker restart that lost the session.
    pub fn subscriptions(&self) -> u64 {
        *self.subscribed.borrow()
    }

    /// Waits until [`subscriptions`](Self::subscriptions) reaches `n`, e.g. `before + 1`
    /// after restarting the broker. Panics after `timeout`.
    pub async fn wait_subscribed(&self, n: u64, timeout: Duration) {
        let mut subscribed = self.subscribed.clone();
        if tokio::time::timeout(timeout, subscribed.wait_for(|count| *count >= n))
            .await
            .is_err()
        {
            panic!(
                "cloud subscriber: subscription {n} not made within {timeout:?} (last error: {})",
                self.last_error()
            );
        }
    }

    /// Waits until at least `n` publishes have arrived and returns all received so far.
    /// Panics after `timeout`, naming how many arrived.
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> Vec<Received> {
        let mut arrived = self.arrived.clone();
        if tokio::time::timeout(timeout, arrived.wait_for(|count| *count >= n))
            .await
            .is_err()
        {
            panic!(
                "cloud subscriber: expected {n} publishes within {timeout:?}, got {} \
                 (last error: {})",
                *arrived.borrow(),
                self.last_error()
            );
        }
        self.received()
    }

    /// Everything received so far, in arrival order.
    pub fn received(&self) -> Vec<Received> {
        self.shared.received.lock().expect("received lock").clone()
    }

    /// Publishes `payload` to `topic` with QoS 1 and returns after the broker's PUBACK.
    /// If the broker loses the session first (a restart), publishes again, so the
    /// message may arrive twice. Panics after 10 s without a PUBACK.
    pub async fn publish(&self, topic: &str, payload: impl Into<Vec<u8>>) {
        let payload = payload.into();
        let attempts = async {
            loop {
                let (acked_tx, acked) = oneshot::channel();
                {
                    // Queue the waiter and the request under one lock so that waiters
                    // stay in the order rumqttc sends the publishes.
                    let mut unacked = self.shared.publishes.lock().expect("publishes lock");
                    unacked.queued.push_back(acked_tx);
                    self.client
                        .try_publish(topic, QoS::AtLeastOnce, false, payload.clone())
                        .expect("rumqttc request channel has room");
                }
                if acked.await.is_ok() {
                    return;
                }
            }
        };
        if tokio::time::timeout(DEADLINE, attempts).await.is_err() {
            panic!(
                "cloud subscriber: no PUBACK for {topic} within {DEADLINE:?} (last error: {})",
                self.last_error()
            );
        }
    }

    fn last_error(&self) -> String {
        self.shared
            .last_error
            .lock()
            .expect("last_error lock")
            .clone()
            .unwrap_or_else(|| "none".into())
    }
}

impl Drop for CloudSubscriber {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The event loop task: keeps polling (rumqttc reconnects on the next poll after an
/// error), subscribes whenever the broker has no session for us, records publishes
/// and settles our own publishes' PUBACKs.
async fn run(
    mut eventloop: EventLoop,
    client: AsyncClient,
    filter: String,
    shared: Arc<Shared>,
    subscribed: watch::Sender<u64>,
    arrived: watch::Sender<usize>,
) {
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(ack))) if !ack.session_present => {
                // rumqttc dropped its unacknowledged requests with the old session;
                // dropping the waiters makes `publish` send again.
                *shared.publishes.lock().expect("publishes lock") = Unacked::default();
                if let Err(e) = client.try_subscribe(filter.as_str(), QoS::AtLeastOnce) {
                    shared.record_error(format!("subscribe request: {e}"));
                }
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                if ack.return_codes.contains(&SubscribeReasonCode::Failure) {
                    shared.record_error(format!("broker refused subscription to {filter}"));
                } else {
                    subscribed.send_modify(|count| *count += 1);
                }
            }
            Ok(Event::Incoming(Packet::Publish(publish))) => {
                let mut received = shared.received.lock().expect("received lock");
                received.push((publish.topic, publish.payload.to_vec()));
                arrived.send_replace(received.len());
            }
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                let mut unacked = shared.publishes.lock().expect("publishes lock");
                // A resend after a reconnect reuses the packet id already recorded.
                if !unacked.sent.contains_key(&pkid)
                    && let Some(waiter) = unacked.queued.pop_front()
                {
                    unacked.sent.insert(pkid, waiter);
                }
            }
            Ok(Event::Incoming(Packet::PubAck(ack))) => {
                let waiter = shared
                    .publishes
                    .lock()
                    .expect("publishes lock")
                    .sent
                    .remove(&ack.pkid);
                if let Some(waiter) = waiter {
                    // The publisher may have given up; nothing to do then.
                    let _ = waiter.send(());
                }
            }
            Ok(_) => {}
            Err(e) => {
                shared.record_error(e.to_string());
                tokio::time::sleep(RECONNECT_PAUSE).await;
            }
        }
    }
}

impl Shared {
    fn record_error(&self, error: String) {
        *self.last_error.lock().expect("last_error lock") = Some(error);
    }
}
