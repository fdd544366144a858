//! Turns SIGTERM and SIGINT (systemd stop, Ctrl-C) into the shutdown future that
//! `gateway::run` takes as a value.

use tokio::signal::unix::{SignalKind, signal};

/// Completes on the first SIGTERM or SIGINT. If the handlers cannot be installed it
/// never completes (the process then stops only by SIGKILL, which the queue survives).
pub async fn terminate_signal() {
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
}
