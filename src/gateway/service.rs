//! `blindgate gateway` as a service: the main event loop that handles SIGTERM/SIGINT
//! (stop), SIGHUP (reload), the certificate-file check, the daily expiry warning and
//! systemd's watchdog. The watchdog is fed from this loop, after it has checked that
//! the queue answers, so a wedged loop or a stuck queue gets the service restarted.

use std::path::PathBuf;
use std::time::Duration;

use tokio::signal::unix::{SignalKind, signal};
use tokio::time::{MissedTickBehavior, interval};

use super::{Gateway, GatewayError, GatewayPlan, ReloadOutcome, Reloader};
use crate::config::ValidConfig;
use crate::systemd::Notifier;

/// How often the certificate files are compared with what is in use.
const CERTIFICATE_CHECK: Duration = Duration::from_secs(5);
/// How often certificates expiring soon are logged again.
const EXPIRY_WARNING: Duration = Duration::from_secs(24 * 3600);

/// Runs the gateway from `config` (read from `path`) until SIGTERM or SIGINT.
///
/// # Errors
/// [`GatewayError`] if it cannot start.
pub async fn run_service(
    path: PathBuf,
    config: ValidConfig,
    plan: GatewayPlan,
) -> Result<(), GatewayError> {
    let notifier = Notifier::from_env();
    let websocket = GatewayPlan::websocket_from_config(&config);
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        tracing::error!("cannot install signal handlers; running without reload");
        let gateway = Gateway::start_with(plan, websocket).await?;
        std::future::pending::<()>().await;
        gateway.stop().await;
        return Ok(());
    };
    let gateway = Gateway::start_with(plan, websocket).await?;
    let mut reloader = Reloader::new(path, config, &gateway);
    super::heap::spawn_trimmer(gateway.metrics().clone());
    notifier.ready(&status_line(&gateway));

    let mut watchdog = interval(
        notifier
            .watchdog_interval()
            .unwrap_or(Duration::from_secs(3600)),
    );
    let watchdog_on = notifier.watchdog_interval().is_some();
    let mut certificates = interval(CERTIFICATE_CHECK);
    let mut expiry = interval(EXPIRY_WARNING);
    for timer in [&mut watchdog, &mut certificates, &mut expiry] {
        timer.set_missed_tick_behavior(MissedTickBehavior::Delay);
    }
    expiry.tick().await; // the first tick is immediate; Reloader::new already warned
    loop {
        tokio::select! {
            _ = term.recv() => { tracing::info!("SIGTERM received"); break }
            _ = int.recv() => { tracing::info!("SIGINT received"); break }
            _ = hup.recv() => {
                tracing::info!("SIGHUP received: reloading the configuration");
                notifier.reloading();
                let outcome = reloader.reload_config(&gateway);
                notifier.ready(&reload_status(&outcome, &gateway));
            }
            _ = certificates.tick() => {
                if let Some(outcome) = reloader.check_certificate_files(&gateway) {
                    notifier.status(&reload_status(&outcome, &gateway));
                }
            }
            _ = expiry.tick() => reloader.warn_expiring(),
            _ = watchdog.tick(), if watchdog_on => {
                // The queue's statistics come from its in-memory ledger; if its lock
                // is held forever this call never returns and systemd restarts us.
                let _ = gateway.queue().stats();
                notifier.watchdog();
            }
        }
    }
    notifier.stopping();
    tracing::info!("stopping: no new devices; finishing in-flight writes");
    gateway.stop().await;
    Ok(())
}

fn status_line(gateway: &Gateway) -> String {
    match gateway.websocket_addr() {
        Some(ws) => format!(
            "serving devices on {} (WebSocket on {ws})",
            gateway.device_addr()
        ),
        None => format!("serving devices on {}", gateway.device_addr()),
    }
}

fn reload_status(outcome: &ReloadOutcome, gateway: &Gateway) -> String {
    match outcome {
        ReloadOutcome::Rejected(_) => format!(
            "{}; last reload REJECTED (old configuration in force; see the log)",
            status_line(gateway)
        ),
        ReloadOutcome::Applied { .. } | ReloadOutcome::Unchanged => status_line(gateway),
    }
}
