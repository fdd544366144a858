//! Sending commands down: seal a command for a device with its current key and a
//! reserved downlink seq, and publish it on the device's downlink topic through a
//! gateway that may carry it. Used by `blindgate cloud send-command` and by scheduled
//! key rotation (whose `rekey` command the key store has already sealed).

use std::sync::Arc;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, Incoming, MqttOptions, QoS, TlsConfiguration, Transport};
use thiserror::Error;

use crate::keys::{KeyStore, KeyStoreError};
use crate::uplink::Endpoint;

/// Why a command was not sent.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum CommandError {
    /// The device's key or a downlink seq could not be had.
    #[error("key store")]
    Keys(#[from] KeyStoreError),
    /// Sealing failed.
    #[error("cannot seal the command")]
    Seal(#[from] e3::SealError),
    /// The broker did not take it.
    #[error("cloud broker {broker} did not acknowledge the command: {why}")]
    Broker {
        /// The broker.
        broker: String,
        /// What happened.
        why: String,
    },
}

/// Seals `plaintext` as a command for `device` (current key, next downlink seq).
///
/// # Errors
/// [`CommandError`].
pub fn seal_command(
    keys: &KeyStore,
    device: &str,
    plaintext: &[u8],
) -> Result<(u64, Vec<u8>), CommandError> {
    let key = keys.current(device)?;
    let seq = keys.reserve_downlink_seqs(device, 1)?.start;
    Ok((seq, key.seal(e3::Kind::Command, seq, plaintext)?))
}

/// Publishes one envelope with QoS 1 and returns once the broker acknowledged it.
///
/// # Errors
/// [`CommandError::Broker`] on a connection failure or no PUBACK within `deadline`.
pub async fn publish_once(
    broker: &Endpoint,
    tls: Arc<rustls::ClientConfig>,
    client_id: &str,
    topic: String,
    envelope: Vec<u8>,
    deadline: Duration,
) -> Result<(), CommandError> {
    let mut options = MqttOptions::new(client_id, &broker.host, broker.port);
    options
        .set_keep_alive(Duration::from_secs(10))
        .set_max_packet_size(envelope.len() + 1024, envelope.len() + 1024)
        .set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls)));
    let (client, mut eventloop) = AsyncClient::new(options, 4);
    let fail = |why: String| CommandError::Broker {
        broker: broker.to_string(),
        why,
    };
    client
        .publish(topic, QoS::AtLeastOnce, false, envelope)
        .await
        .map_err(|e| fail(e.to_string()))?;
    let acked = tokio::time::timeout(deadline, async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Incoming::PubAck(_))) => return Ok(()),
                Ok(_) => {}
                Err(err) => return Err(fail(err.to_string())),
            }
        }
    })
    .await
    .map_err(|_| fail("no PUBACK in time".into()))?;
    let _ = client.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_millis(500), eventloop.poll()).await;
    acked
}
