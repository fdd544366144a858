//! The processes a run starts (the cloud broker, blindgate, the Mosquitto bridge): their
//! configuration files, free loopback ports, start-up until they listen, and their CPU
//! time from `/proc`.

use std::ffi::OsString;
use std::fmt::Write as _;
use std::fs;
use std::net::TcpStream as StdTcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use blindgate::pki::DevPki;

/// How a process is (re)started: program, arguments, environment, log, port it listens on.
struct Launch {
    program: PathBuf,
    args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    log: PathBuf,
    port: u16,
}

/// A child process killed and reaped on drop; it can be stopped by a signal and started
/// again with the same command line (the restart measurements of the drain scenario).
pub(crate) struct Proc {
    name: &'static str,
    child: Child,
    launch: Launch,
}

impl Proc {
    fn spawn(name: &'static str, launch: Launch) -> Result<Self> {
        let child = launch_child(name, &launch)?;
        let mut proc = Self {
            name,
            child,
            launch,
        };
        proc.wait_listening(Instant::now())?;
        Ok(proc)
    }

    /// Waits until the process accepts TCP connections on its port (15 s at most).
    fn wait_listening(&mut self, started: Instant) -> Result<()> {
        let port = self.launch.port;
        while StdTcpStream::connect(("127.0.0.1", port)).is_err() {
            if self.child.try_wait()?.is_some() || started.elapsed() > Duration::from_secs(15) {
                bail!(
                    "{} did not listen on port {port}; its log:\n{}",
                    self.name,
                    fs::read_to_string(&self.launch.log).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        self.check_alive()
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The port it listens on (devices, or the cloud broker's clients).
    pub(crate) fn port(&self) -> u16 {
        self.launch.port
    }

    pub(crate) fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "{} exited ({status}); its log:\n{}",
                self.name,
                fs::read_to_string(&self.launch.log).unwrap_or_default()
            );
        }
        Ok(())
    }

    /// Sends `signal` ("TERM", "KILL") with kill(1) and waits until the process exited
    /// (at most 300 s); returns the seconds it took to exit.
    pub(crate) fn stop(&mut self, signal: &str) -> Result<f64> {
        let started = Instant::now();
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()?;
        if !status.success() {
            bail!("kill -{signal} {} failed", self.pid());
        }
        while self.child.try_wait()?.is_none() {
            if started.elapsed() > Duration::from_secs(300) {
                bail!("{} still running 300 s after SIG{signal}", self.name);
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(started.elapsed().as_secs_f64())
    }

    /// Starts the (stopped) process again with the same command line; returns when it
    /// accepts connections, with the instant it was started (just before exec).
    pub(crate) fn restart(&mut self) -> Result<Instant> {
        let started = Instant::now();
        self.child = launch_child(self.name, &self.launch)?;
        self.wait_listening(started)?;
        Ok(started)
    }
}

/// Spawns the process of `launch`, its output appended to its log.
fn launch_child(name: &str, launch: &Launch) -> Result<Child> {
    let file = fs::File::options()
        .create(true)
        .append(true)
        .open(&launch.log)?;
    let mut command = Command::new(&launch.program);
    command
        .args(&launch.args)
        .envs(launch.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file);
    command
        .spawn()
        .with_context(|| format!("cannot start {name}"))
}

impl Drop for Proc {
    fn drop(&mut self) {
        // An error means it already exited; `wait` reaps it either way.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// CPU seconds (user + system) used so far by process `pid`, from `/proc/<pid>/stat`.
pub(crate) fn cpu_seconds(pid: u32) -> f64 {
    crate::cpu::cpu_seconds_of(&pid.to_string())
}

// ---------------------------------------------------------------- starting them

/// Starts the cloud broker (Mosquitto, mTLS 1.3) in `dir/cloud`; returns it and its port.
pub(crate) fn start_cloud(mosquitto: &Path, dir: &Path, pki: &DevPki) -> Result<(Proc, u16)> {
    let port = free_port()?;
    fs::create_dir_all(dir.join("cloud"))?;
    let conf = dir.join("cloud/mosquitto.conf");
    fs::write(&conf, cloud_broker_conf(port, pki))?;
    let proc = Proc::spawn(
        "cloud broker",
        Launch {
            program: mosquitto.to_owned(),
            args: vec!["-c".into(), conf.into()],
            env: Vec::new(),
            log: dir.join("cloud/mosquitto.log"),
            port,
        },
    )?;
    Ok((proc, port))
}

/// What blindgate is started with, besides the PKI and the cloud broker's port.
pub(crate) struct BlindgateSpec<'a> {
    pub(crate) binary: &'a Path,
    /// Publishes awaiting PUBACK per device connection.
    pub(crate) window: usize,
    pub(crate) log_level: &'a str,
    /// Its directory under the work directory (configuration, log, data).
    pub(crate) subdir: &'a str,
    /// MQTT client id towards the cloud ("": the gateway id).
    pub(crate) client_id: &'a str,
    /// `NOTIFY_SOCKET` for its `sd_notify` messages (READY=1), if any.
    pub(crate) notify_socket: Option<&'a Path>,
}

/// Starts `blindgate gateway` in `dir/<subdir>`, its uplink to `cloud_port`; returns it
/// (its device port is [`Proc::port`]) and its data directory.
pub(crate) fn start_blindgate(
    spec: &BlindgateSpec<'_>,
    dir: &Path,
    cloud_port: u16,
    pki: &DevPki,
) -> Result<(Proc, PathBuf)> {
    let port = free_port()?;
    let home = dir.join(spec.subdir);
    fs::create_dir_all(&home)?;
    let conf = home.join("gateway.toml");
    fs::write(&conf, blindgate_conf(&home, port, cloud_port, pki, spec))?;
    let env = spec
        .notify_socket
        .map(|p| vec![("NOTIFY_SOCKET".into(), p.as_os_str().to_owned())])
        .unwrap_or_default();
    let proc = Proc::spawn(
        "blindgate",
        Launch {
            program: spec.binary.to_owned(),
            args: vec!["gateway".into(), "--config".into(), conf.into()],
            env,
            log: home.join("gateway.log"),
            port,
        },
    )?;
    Ok((proc, home.join("data")))
}

/// Starts Mosquitto as a bridging gateway in `dir/<subdir>` (MQTT client id towards the
/// cloud `clientid`), its bridge to `cloud_port`; returns it and its data directory.
pub(crate) fn start_bridge(
    mosquitto: &Path,
    dir: &Path,
    (subdir, clientid): (&str, &str),
    cloud_port: u16,
    pki: &DevPki,
) -> Result<(Proc, PathBuf)> {
    let port = free_port()?;
    let home = dir.join(subdir);
    fs::create_dir_all(&home)?;
    let conf = home.join("mosquitto.conf");
    fs::write(&conf, bridge_conf(&home, port, cloud_port, clientid, pki))?;
    let proc = Proc::spawn(
        "mosquitto bridge",
        Launch {
            program: mosquitto.to_owned(),
            args: vec!["-c".into(), conf.into()],
            env: Vec::new(),
            log: home.join("mosquitto.log"),
            port,
        },
    )?;
    Ok((proc, home))
}

// ---------------------------------------------------------------- configurations

fn cloud_broker_conf(port: u16, pki: &DevPki) -> String {
    let mut c = String::new();
    c.push_str("user root\npersistence false\nlog_dest stderr\n");
    c.push_str("max_inflight_messages 0\nmax_queued_messages 0\nset_tcp_nodelay true\n");
    let _ = writeln!(c, "listener {port} 127.0.0.1");
    let _ = writeln!(c, "cafile {}", pki.cloud_ca.cert.display());
    let _ = writeln!(c, "certfile {}", pki.cloud_broker.cert.display());
    let _ = writeln!(c, "keyfile {}", pki.cloud_broker.key.display());
    c.push_str("require_certificate true\nuse_identity_as_username true\ntls_version tlsv1.3\n");
    c
}

/// Mosquitto as the gateway: device listener like blindgate's (mTLS 1.3, device CA),
/// bridge to the cloud broker with persistence, QoS 1, TLS 1.3 and a client certificate.
fn bridge_conf(dir: &Path, port: u16, cloud_port: u16, clientid: &str, pki: &DevPki) -> String {
    let mut c = String::new();
    c.push_str("user root\npersistence true\n");
    let _ = writeln!(c, "persistence_location {}/", dir.display());
    // No cap on queued messages (0): the backlog scenario queues 1,000,000 and more.
    c.push_str("log_dest stderr\nmax_inflight_messages 0\nmax_queued_messages 0\n");
    c.push_str("max_connections -1\nset_tcp_nodelay true\n");
    let _ = writeln!(c, "listener {port} 127.0.0.1");
    let _ = writeln!(c, "cafile {}", pki.device_ca.cert.display());
    let _ = writeln!(c, "certfile {}", pki.gateway_devices.cert.display());
    let _ = writeln!(c, "keyfile {}", pki.gateway_devices.key.display());
    c.push_str("require_certificate true\nuse_identity_as_username true\ntls_version tlsv1.3\n");
    c.push_str("\nconnection cloud\n");
    let _ = writeln!(c, "address localhost:{cloud_port}");
    c.push_str("bridge_protocol_version mqttv311\n");
    let _ = writeln!(c, "bridge_cafile {}", pki.cloud_ca.cert.display());
    let _ = writeln!(c, "bridge_certfile {}", pki.gateway_client.cert.display());
    let _ = writeln!(c, "bridge_keyfile {}", pki.gateway_client.key.display());
    c.push_str("bridge_tls_version tlsv1.3\nbridge_insecure false\n");
    // Reconnect after 1 s (the default backs off up to 30 s, which would dominate the
    // drain scenario's time to the first forwarded message).
    c.push_str("cleansession false\ntry_private false\nnotifications false\n");
    let _ = writeln!(c, "clientid {clientid}\nrestart_timeout 1");
    c.push_str("topic +/up out 1 e3/ gw/gw-1/e3/\n");
    c
}

fn blindgate_conf(
    dir: &Path,
    port: u16,
    cloud_port: u16,
    pki: &DevPki,
    spec: &BlindgateSpec<'_>,
) -> String {
    let p = |p: &Path| p.display().to_string();
    format!(
        r#"[gateway]
id = "gw-1"
data_dir = "{data}"

[devices]
listen = "127.0.0.1:{port}"
ca = "{dca}"
cert = "{dcert}"
key = "{dkey}"
max_connections = 10000
max_inflight_per_device = {window}
rate_limit_per_device = 1000000
rate_burst_per_device = 1000000

[cloud]
endpoints = ["mqtts://localhost:{cloud_port}"]
ca = "{cca}"
cert = "{ccert}"
key = "{ckey}"
inflight = 1000
# Live records wait at the cloud broker behind at most this many backlog records.
drain_inflight = 250
client_id = "{client_id}"
drain_rate = 1000000
backoff_min = "100ms"
backoff_max = "500ms"

[queue]
max_bytes = "4GiB"
device_quota = "1GiB"
min_free_disk = "1GiB"

[metrics]
listen = ""

[log]
level = "{level}"
"#,
        data = p(&dir.join("data")),
        dca = p(&pki.device_ca.cert),
        dcert = p(&pki.gateway_devices.cert),
        dkey = p(&pki.gateway_devices.key),
        cca = p(&pki.cloud_ca.cert),
        ccert = p(&pki.gateway_client.cert),
        ckey = p(&pki.gateway_client.key),
        window = spec.window,
        level = spec.log_level,
        client_id = spec.client_id,
    )
}
