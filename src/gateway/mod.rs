//! `blindgate gateway`: wires the queue, the device listener, the uplink and the
//! metrics endpoint together, and stops them in the order that loses nothing.
//!
//! Stop order: stop accepting devices; let each session's pending queue writes finish
//! and send their PUBACKs (bounded); disconnect the uplink cleanly (bounded); close the
//! queue (its writer finishes, removals are flushed, sled is closed and the clean-stop
//! marker written). The next start resumes from the queue.

pub mod certificates;
mod health;
mod heap;
mod plan;
mod reload;
mod service;

pub use health::Health;
pub use plan::PlanError;
pub use reload::{ReloadOutcome, Reloader};
pub use service::run_service;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::ServerConfig;
use thiserror::Error;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use tokio::sync::{Notify, watch};

use crate::http;
use crate::ingress::{DeviceRegistry, Ingress, IngressSettings, WebSocketListen};
use crate::metrics::Metrics;
use crate::queue::{Queue, QueueConfig, QueueError};
use crate::uplink::{self, UplinkControl, UplinkSettings};

/// Everything the gateway runs with, already validated.
#[derive(Clone)]
pub struct GatewayPlan {
    /// The durable queue.
    pub queue: QueueConfig,
    /// Device listener limits and topics.
    pub ingress: IngressSettings,
    /// TLS for the device listener (TLS 1.3, client certificates required).
    pub device_tls: Arc<ServerConfig>,
    /// Where devices connect (TLS).
    pub device_listen: SocketAddr,
    /// Optional plain MQTT listener, for the lab only.
    pub plaintext_listen: Option<SocketAddr>,
    /// The cloud connection.
    pub uplink: UplinkSettings,
    /// Commands and receipts held per offline device.
    pub downlink_pending_per_device: usize,
    /// Where `/metrics`, `/healthz` and `/readyz` are served; `None`: off.
    pub metrics_listen: Option<SocketAddr>,
    /// Readiness fails when records wait and the last cloud ack is older than this.
    pub ready_max_ack_age: Duration,
}

/// Why the gateway could not start.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum GatewayError {
    /// The queue could not be opened.
    #[error("cannot open the queue")]
    Queue(#[from] QueueError),
    /// A listening socket could not be bound.
    #[error("cannot listen on {addr}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// A running gateway.
pub struct Gateway {
    queue: Queue,
    metrics: Metrics,
    registry: Arc<DeviceRegistry>,
    device_addr: SocketAddr,
    plaintext_addr: Option<SocketAddr>,
    websocket_addr: Option<SocketAddr>,
    metrics_addr: Option<SocketAddr>,
    stop_ingress: CancellationToken,
    stop_rest: CancellationToken,
    ingress_tasks: Vec<JoinHandle<()>>,
    uplink_task: JoinHandle<()>,
    http_task: Option<JoinHandle<()>>,
    live: Live,
}

/// What a reload changes in a running gateway.
struct Live {
    device_tls: watch::Sender<Arc<ServerConfig>>,
    uplink: watch::Sender<UplinkSettings>,
    reconnect: Arc<Notify>,
    health: Health,
}

/// Connections the kernel may hold for a listener before it accepts them. tokio's
/// `TcpListener::bind` asks for 128, which a reconnect storm of a few hundred devices
/// overflows (measured: 1,000 devices connecting at once overflowed it 145 and 945
/// times; each overflow costs the device a SYN retry, a second or more). Linux caps it
/// at `net.core.somaxconn` (4096 by default).
const LISTEN_BACKLOG: u32 = 1024;

async fn bind(addr: SocketAddr) -> Result<TcpListener, GatewayError> {
    let bind = || {
        let socket = match addr {
            SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
            SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
        };
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        socket.listen(LISTEN_BACKLOG)
    };
    bind().map_err(|source| GatewayError::Bind { addr, source })
}

fn local(listener: &TcpListener, fallback: SocketAddr) -> SocketAddr {
    listener.local_addr().unwrap_or(fallback)
}

impl Gateway {
    /// Opens the queue, binds every listener and starts every task.
    ///
    /// # Errors
    /// [`GatewayError`] if the queue cannot be opened or a socket cannot be bound.
    pub async fn start(plan: GatewayPlan) -> Result<Self, GatewayError> {
        Self::start_with(plan, None).await
    }

    /// [`Gateway::start`], plus the device listener for MQTT over WebSocket if
    /// `websocket` is set (`[devices] websocket_listen`; see
    /// [`GatewayPlan::websocket_from_config`]).
    ///
    /// # Errors
    /// [`GatewayError`] if the queue cannot be opened or a socket cannot be bound.
    pub async fn start_with(
        plan: GatewayPlan,
        websocket: Option<WebSocketListen>,
    ) -> Result<Self, GatewayError> {
        let metrics = Metrics::new();
        let queue = Queue::open(plan.queue.clone())?;
        let registry = DeviceRegistry::new(plan.downlink_pending_per_device, metrics.clone());
        let ingress = Ingress::new(
            plan.ingress.clone(),
            queue.clone(),
            Arc::clone(&registry),
            metrics.clone(),
        );
        let stop_ingress = CancellationToken::new();
        let stop_rest = CancellationToken::new();

        let health = Health::new(queue.clone(), metrics.clone(), plan.ready_max_ack_age);
        metrics
            .queue_max_bytes
            .set(i64::try_from(plan.queue.max_bytes).unwrap_or(i64::MAX));
        let (device_tls, tls) = watch::channel(Arc::clone(&plan.device_tls));
        let (uplink_settings, settings) = watch::channel(plan.uplink.clone());
        let reconnect = Arc::new(Notify::new());
        health.set_endpoints(endpoint_list(&plan.uplink));

        let devices = bind(plan.device_listen).await?;
        let device_addr = local(&devices, plan.device_listen);
        let mut ingress_tasks = Vec::new();
        let stop = stop_ingress.clone();
        let serving = ingress.clone();
        ingress_tasks.push(tokio::spawn(async move {
            serving.serve_tls(devices, tls, stop).await;
        }));
        let mut websocket_addr = None;
        if let Some(ws) = websocket {
            let listener = bind(ws.listen).await?;
            websocket_addr = Some(local(&listener, ws.listen));
            tracing::info!(addr = %ws.listen, path = %ws.path, "MQTT over WebSocket listener enabled");
            let (stop, serving, tls) = (
                stop_ingress.clone(),
                ingress.clone(),
                device_tls.subscribe(),
            );
            ingress_tasks.push(tokio::spawn(async move {
                serving.serve_websocket(listener, tls, ws.path, stop).await;
            }));
        }
        let mut plaintext_addr = None;
        if let Some(addr) = plan.plaintext_listen {
            let plain = bind(addr).await?;
            plaintext_addr = Some(local(&plain, addr));
            tracing::warn!(addr = %addr, "plain MQTT listener enabled (lab use only: no device authentication)");
            let stop = stop_ingress.clone();
            ingress_tasks.push(tokio::spawn(async move {
                ingress.serve_plain(plain, stop).await
            }));
        }
        let mut metrics_addr = None;
        let mut http_task = None;
        if let Some(addr) = plan.metrics_listen {
            let listener = bind(addr).await?;
            metrics_addr = Some(local(&listener, addr));
            http_task = Some(tokio::spawn(http::serve(
                listener,
                health.clone(),
                stop_rest.clone(),
            )));
        }
        let control = UplinkControl {
            settings,
            reconnect: Arc::clone(&reconnect),
        };
        let uplink_task = tokio::spawn(uplink::run(
            control,
            queue.clone(),
            Arc::clone(&registry),
            metrics.clone(),
            stop_rest.clone(),
        ));
        tracing::info!(devices = %device_addr, "gateway started");
        Ok(Self {
            queue,
            metrics,
            registry,
            device_addr,
            plaintext_addr,
            websocket_addr,
            metrics_addr,
            stop_ingress,
            stop_rest,
            ingress_tasks,
            uplink_task,
            http_task,
            live: Live {
                device_tls,
                uplink: uplink_settings,
                reconnect,
                health,
            },
        })
    }

    /// Puts the reloadable parts of `plan` in use: the device listener's TLS (for new
    /// connections), the uplink's settings (from its next connection; at once if
    /// `reconnect`) and the readiness age. Connected devices and the queue are not
    /// touched.
    pub fn apply(&self, plan: &GatewayPlan, reconnect: bool) {
        self.live
            .device_tls
            .send_replace(Arc::clone(&plan.device_tls));
        self.live.uplink.send_replace(plan.uplink.clone());
        self.live.health.set_max_ack_age(plan.ready_max_ack_age);
        self.live.health.set_endpoints(endpoint_list(&plan.uplink));
        if reconnect {
            self.live.reconnect.notify_one();
        }
    }

    /// The health the HTTP endpoint reports (also updated by reloads).
    pub fn health(&self) -> &Health {
        &self.live.health
    }

    /// Where devices connect (the bound address, useful with port 0).
    pub fn device_addr(&self) -> SocketAddr {
        self.device_addr
    }

    /// The plain listener's bound address, if enabled.
    pub fn plaintext_addr(&self) -> Option<SocketAddr> {
        self.plaintext_addr
    }

    /// The WebSocket device listener's bound address, if enabled.
    pub fn websocket_addr(&self) -> Option<SocketAddr> {
        self.websocket_addr
    }

    /// The metrics endpoint's bound address, if enabled.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The gateway's metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The queue (for inspection).
    pub fn queue(&self) -> &Queue {
        &self.queue
    }

    /// The device registry (for inspection).
    pub fn registry(&self) -> &Arc<DeviceRegistry> {
        &self.registry
    }

    /// Stops in the order that loses nothing (see the module docs).
    pub async fn stop(self) {
        self.stop_ingress.cancel();
        for task in self.ingress_tasks {
            let _ = task.await;
        }
        // The uplink stops before the queue closes, so the cloud's last acks are applied
        // and flushed, and the clean-stop marker describes the queue as it stays.
        self.stop_rest.cancel();
        let _ = self.uplink_task.await;
        if let Err(err) = self.queue.close().await {
            tracing::error!(error = %err, "final queue flush failed; unflushed acknowledgements will be resent");
        }
        if let Some(task) = self.http_task {
            let _ = task.await;
        }
        tracing::info!("gateway stopped");
    }
}

fn endpoint_list(settings: &UplinkSettings) -> String {
    let names: Vec<String> = settings.endpoints.iter().map(ToString::to_string).collect();
    names.join(", ")
}

/// Runs the gateway until `shutdown` completes, then stops it cleanly.
///
/// # Errors
/// [`GatewayError`] if it cannot start.
pub async fn run(
    plan: GatewayPlan,
    shutdown: impl Future<Output = ()>,
) -> Result<(), GatewayError> {
    let gateway = Gateway::start(plan).await?;
    shutdown.await;
    tracing::info!("stopping: no new devices; finishing in-flight writes");
    gateway.stop().await;
    Ok(())
}
