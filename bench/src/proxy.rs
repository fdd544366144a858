//! The outage switch of the backlog scenario: a loopback port the gateways' uplinks are
//! pointed at. While the "cloud" is down nothing listens there (connections are
//! refused, as for an unreachable broker); [`CloudGate::open`] restores it by
//! listening and relaying every connection, byte for byte, to the real cloud broker
//! (TLS stays end to end between the gateway and the broker).

use anyhow::Result;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

use crate::brokers::free_port;

/// A port that refuses connections until [`CloudGate::open`], then relays to the cloud.
pub(crate) struct CloudGate {
    pub(crate) port: u16,
    cloud_port: u16,
    relay: Option<JoinHandle<()>>,
}

impl CloudGate {
    /// A closed gate on a free port in front of the cloud broker on `cloud_port`.
    pub(crate) fn closed(cloud_port: u16) -> Result<Self> {
        Ok(Self {
            port: free_port()?,
            cloud_port,
            relay: None,
        })
    }

    /// Restores the cloud: listens on the gate's port and relays to the broker.
    pub(crate) async fn open(&mut self) -> Result<()> {
        if self.relay.is_some() {
            return Ok(());
        }
        let listener = TcpListener::bind(("127.0.0.1", self.port)).await?;
        self.relay = Some(tokio::spawn(relay(listener, self.cloud_port)));
        Ok(())
    }

    /// Cuts the cloud again: stops listening and drops every relayed connection.
    pub(crate) fn close(&mut self) {
        if let Some(task) = self.relay.take() {
            task.abort();
        }
    }
}

impl Drop for CloudGate {
    fn drop(&mut self) {
        self.close();
    }
}

/// Accepts connections and relays each to the cloud broker; aborting it drops them all.
async fn relay(listener: TcpListener, cloud_port: u16) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((mut inbound, _)) = accepted else { continue };
                connections.spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(("127.0.0.1", cloud_port)).await
                    else {
                        return;
                    };
                    let _ = inbound.set_nodelay(true);
                    let _ = outbound.set_nodelay(true);
                    // Ends when either side closes; the error says nothing more.
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}
