//! Simulated devices: each behaves exactly like a real blindgate device, so the demo and
//! the tests exercise the gateway and the cloud the way the field will.
//!
//! A device connects to the gateway's device listener (MQTT 3.1.1 over TLS 1.3 with its
//! own certificate), seals every message with its current E3 key, keeps each sealed
//! uplink in a durable outbox until a receipt from the cloud names it (a PUBACK only
//! covers one hop), resends what no receipt named after `resend_after`, and obeys
//! commands (`rekey`, and with an allowlist the commands its type allows, answering
//! each with a sealed result). Its seq counter, keys, replay window and outbox
//! survive restarts.
//!
//! The public interface is:
//!
//! - [`run_device`] with [`DeviceConfig`] and [`PayloadKind`], returning a [`DeviceReport`].
//! - [`outbox_len`]: how many uplinks of a device still wait for a receipt.
//! - [`cli`]: `blindgate device simulate`.
//!
//! # Layout
//!
//! - `state`: the state directory (`state.json`, `keys/`, `outbox/`), atomic and fsync'd.
//! - `payload`: readings (JSON, `BGZ1`), pseudo-JPEG images in `BGIMG1` chunks.
//! - `client`: the MQTT connection, sending and resending, receipts and commands.
//! - `command`: the allowlist check of a command and the result sent back up.

pub mod cli;
mod client;
mod command;
mod payload;
mod state;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use e3::{DeviceId, HeaderError, SealError};
use thiserror::Error;
use tokio_util::sync::CancellationToken;

pub use payload::{COMPRESSED_MAGIC, IMAGE_CHUNK_HEADER, IMAGE_MAGIC, PayloadError};
pub use state::{SEQ_BLOCK, StateError};

use crate::commands::TypeCommands;
use crate::tls::TlsError;

/// Default size of a camera image: about a field camera's JPEG.
pub const DEFAULT_IMAGE_SIZE: usize = 1_600_000;
/// Default envelope limit: the smaller of the common cloud brokers' limits.
pub const DEFAULT_MAX_ENVELOPE: usize = 131_072;
/// Default time after which an unreceipted uplink is sent again.
pub const DEFAULT_RESEND_AFTER: Duration = Duration::from_secs(10);
/// In [`PayloadKind::Mixed`], every this many messages one is an image.
pub const MIXED_IMAGE_EVERY: u32 = 10;
/// Smallest accepted `max_envelope`: room for a reading and for image chunk data.
pub const MIN_MAX_ENVELOPE: usize = 1024;
/// Largest accepted image size.
pub const MAX_IMAGE_SIZE: usize = 64 << 20;
/// Highest accepted message rate per device.
pub const MAX_RATE_PER_SEC: f64 = 10_000.0;

/// What a device sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PayloadKind {
    /// A sensor reading (JSON) per message.
    Readings,
    /// A camera: every `every`-th message is an image of `size` bytes, sent as
    /// `BGIMG1` chunks; the others are readings. `every = 1` sends images only.
    Images {
        /// Image size in bytes, 4..=[`MAX_IMAGE_SIZE`].
        size: usize,
        /// One message in `every` is an image; at least 1.
        every: u32,
    },
    /// Readings, and every [`MIXED_IMAGE_EVERY`]-th message an image of
    /// [`DEFAULT_IMAGE_SIZE`] bytes.
    Mixed,
}

impl PayloadKind {
    /// Image size and period, if this kind sends images.
    fn images(self) -> Option<(usize, u32)> {
        match self {
            Self::Readings => None,
            Self::Images { size, every } => Some((size, every)),
            Self::Mixed => Some((DEFAULT_IMAGE_SIZE, MIXED_IMAGE_EVERY)),
        }
    }
}

/// One simulated device.
#[derive(Debug, Clone)]
pub struct DeviceConfig {
    /// The device id: the certificate's identity and the E3 device id.
    pub device_id: String,
    /// The device certificate (PEM), issued by the device CA.
    pub cert: PathBuf,
    /// The device certificate's private key (PEM).
    pub key: PathBuf,
    /// The device CA (PEM): the gateway's certificate must chain to it.
    pub ca: PathBuf,
    /// The device's first E3 key file, copied into the state directory on first use
    /// and not read again once the state directory exists.
    pub initial_key_file: PathBuf,
    /// The gateway's device listener.
    pub gateway: SocketAddr,
    /// The name the gateway's certificate must be valid for. The default is `localhost`.
    pub server_name: String,
    /// The state directory; the device uses `<state_dir>/<device_id>/`.
    pub state_dir: PathBuf,
    /// New messages per second (an image counts as one). The default is 1.
    pub rate_per_sec: f64,
    /// What the messages are. The default is [`PayloadKind::Readings`].
    pub payload: PayloadKind,
    /// Send readings compressed (`BGZ1`). Saves bytes, but the ciphertext length then
    /// tells an observer how compressible the reading was. The default is false.
    pub compress: bool,
    /// Largest sealed envelope, at least [`MIN_MAX_ENVELOPE`]; images are chunked to
    /// fit. The default is [`DEFAULT_MAX_ENVELOPE`].
    pub max_envelope: usize,
    /// An uplink no receipt named is sent again this long after its last send (and
    /// after every reconnect). The default is [`DEFAULT_RESEND_AFTER`].
    pub resend_after: Duration,
    /// Stop after this many new messages, once all of them (and anything older in the
    /// outbox) are receipted. `None` (the default) runs until shutdown.
    pub count: Option<u64>,
    /// The commands this device's type allows (from the command schema). With it,
    /// every command but `rekey` is checked, executed only if allowed, and answered
    /// with a sealed result uplink (executed or refused). `None` (the default): no
    /// command but `rekey` is executed and none is answered.
    pub commands: Option<TypeCommands>,
}

impl DeviceConfig {
    /// A device with the given identity and places, and every other field at its default.
    pub fn new(
        device_id: impl Into<String>,
        cert: PathBuf,
        key: PathBuf,
        ca: PathBuf,
        initial_key_file: PathBuf,
        gateway: SocketAddr,
        state_dir: PathBuf,
    ) -> Self {
        Self {
            device_id: device_id.into(),
            cert,
            key,
            ca,
            initial_key_file,
            gateway,
            server_name: "localhost".into(),
            state_dir,
            rate_per_sec: 1.0,
            payload: PayloadKind::Readings,
            compress: false,
            max_envelope: DEFAULT_MAX_ENVELOPE,
            resend_after: DEFAULT_RESEND_AFTER,
            count: None,
            commands: None,
        }
    }

    /// Checks every field once; returns the device id.
    fn validate(&self) -> Result<DeviceId, DeviceError> {
        let device_id = DeviceId::new(&self.device_id).map_err(|source| DeviceError::DeviceId {
            id: self.device_id.clone(),
            source,
        })?;
        let invalid = |field, rule: String| Err(DeviceError::Config { field, rule });
        if !(self.rate_per_sec > 0.0 && self.rate_per_sec <= MAX_RATE_PER_SEC) {
            return invalid(
                "rate_per_sec",
                format!("must be in (0, {MAX_RATE_PER_SEC}]"),
            );
        }
        if self.max_envelope < MIN_MAX_ENVELOPE {
            return invalid(
                "max_envelope",
                format!("must be at least {MIN_MAX_ENVELOPE}"),
            );
        }
        if self.resend_after.is_zero() {
            return invalid("resend_after", "must be more than zero".into());
        }
        if let Some((size, every)) = self.payload.images() {
            if !(4..=MAX_IMAGE_SIZE).contains(&size) {
                return invalid("payload.size", format!("must be in 4..={MAX_IMAGE_SIZE}"));
            }
            if every == 0 {
                return invalid("payload.every", "must be at least 1".into());
            }
        }
        Ok(device_id)
    }
}

/// What a device did in one run of [`run_device`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeviceReport {
    /// New envelopes published for the first time (an image counts once per chunk).
    pub sent: u64,
    /// Publishes of envelopes published before (in this run or an earlier one).
    pub resent: u64,
    /// Outbox entries dropped because a receipt named them.
    pub receipted: u64,
    /// Envelopes still waiting for a receipt when the run ended.
    pub outbox_left: u64,
    /// Fresh commands opened (including `rekey`).
    pub commands: u64,
    /// Key switches done by `rekey` commands.
    pub rekeys: u64,
    /// Commands the allowlist let through and the device executed.
    pub commands_executed: u64,
    /// Commands the allowlist refused (never executed); each answered with a result.
    pub commands_refused: u64,
    /// Commands and receipts dropped by the replay rule (duplicate or stale).
    pub replays_rejected: u64,
    /// Downlink messages that did not open, were not for this device, or were malformed.
    pub downlink_invalid: u64,
}

/// Why a device stopped with an error.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum DeviceError {
    /// A config field breaks its rule.
    #[error("invalid device config: {field} {rule}")]
    Config {
        /// The field.
        field: &'static str,
        /// Its rule.
        rule: String,
    },
    /// The device id is not a valid E3 device id.
    #[error("invalid device id {id:?}")]
    DeviceId {
        /// The id as given.
        id: String,
        /// The rule it breaks.
        #[source]
        source: HeaderError,
    },
    /// The TLS configuration could not be built.
    #[error("cannot set up the device's TLS")]
    Tls(#[source] TlsError),
    /// `server_name` is not a valid DNS name or IP address.
    #[error("invalid TLS server name {name:?}")]
    ServerName {
        /// The name as given.
        name: String,
    },
    /// The state directory failed.
    #[error("device state failed")]
    State(#[source] StateError),
    /// A payload could not be made.
    #[error("cannot make a payload")]
    Payload(#[source] PayloadError),
    /// An uplink could not be sealed.
    #[error("cannot seal an uplink")]
    Seal(#[source] SealError),
    /// A sealed uplink is larger than `max_envelope`.
    #[error("sealed uplink of {len} bytes exceeds max_envelope {max}")]
    EnvelopeTooLarge {
        /// The envelope's length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The MQTT connection task ended on its own.
    #[error("the MQTT connection task ended unexpectedly")]
    LinkClosed,
}

impl From<StateError> for DeviceError {
    fn from(err: StateError) -> Self {
        Self::State(err)
    }
}

impl From<PayloadError> for DeviceError {
    fn from(err: PayloadError) -> Self {
        Self::Payload(err)
    }
}

/// Runs one device until `shutdown` is cancelled or, with `count`, until that many new
/// messages were sent and everything in its outbox is receipted. Connection failures
/// are retried with backoff; they never end the run.
///
/// # Errors
/// An invalid config, unusable TLS files or state directory, or a failed write of the
/// device's state (the device stops rather than risk reusing a seq or losing a message).
pub async fn run_device(
    config: DeviceConfig,
    shutdown: CancellationToken,
) -> Result<DeviceReport, DeviceError> {
    let device_id = config.validate()?;
    client::run(config, device_id, shutdown).await
}

/// How many sealed uplinks of `device_id` wait in `state_dir` for a receipt.
///
/// # Errors
/// An invalid device id, or the outbox directory exists but cannot be read.
pub fn outbox_len(state_dir: &Path, device_id: &str) -> Result<usize, DeviceError> {
    let id = DeviceId::new(device_id).map_err(|source| DeviceError::DeviceId {
        id: device_id.to_owned(),
        source,
    })?;
    Ok(state::StateDir::new(state_dir, id.as_str()).outbox_len()?)
}
