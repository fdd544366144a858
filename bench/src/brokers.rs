//! The processes a run starts (the cloud broker, blindgate, the Mosquitto bridge): their
//! configuration files, free loopback ports, start-up until they listen, and their CPU
//! time from `/proc`.

use std::fmt::Write as _;
use std::fs;
use std::net::TcpStream as StdTcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use blindgate::pki::DevPki;

/// A child process killed and reaped on drop.
pub(crate) struct Proc {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(name: &'static str, mut command: Command, log: PathBuf, port: u16) -> Result<Self> {
        let file = fs::File::create(&log)?;
        command
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file);
        let child = command
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        let mut proc = Self { name, child, log };
        let started = Instant::now();
        while StdTcpStream::connect(("127.0.0.1", port)).is_err() {
            if proc.child.try_wait()?.is_some() || started.elapsed() > Duration::from_secs(15) {
                bail!(
                    "{name} did not listen on port {port}; its log:\n{}",
                    fs::read_to_string(&proc.log).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        proc.check_alive()?;
        Ok(proc)
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    pub(crate) fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "{} exited ({status}); its log:\n{}",
                self.name,
                fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
        Ok(())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // An error means it already exited; `wait` reaps it either way.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// CPU seconds (user + system) used so far by process `pid`, from `/proc/<pid>/stat`.
pub(crate) fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name (which may hold spaces) start at field 3.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime is field 14, stime field 15: index 11 and 12 after the command name.
    (ticks(11) + ticks(12)) as f64 / clock_ticks_per_second()
}

/// `/proc`'s clock tick (USER_HZ), from `getconf CLK_TCK` once; 100 (Linux's value on
/// every common architecture) if that fails. Asked of `getconf` rather than rustix so
/// the bench adds no rustix feature: with one, building it beside blindgate would build
/// a second, differently featured blindgate in release.
fn clock_ticks_per_second() -> f64 {
    static HZ: OnceLock<f64> = OnceLock::new();
    *HZ.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse::<f64>().ok())
            .filter(|&hz| hz > 0.0)
            .unwrap_or(100.0)
    })
}

// ---------------------------------------------------------------- starting them

/// Starts the cloud broker (Mosquitto, mTLS 1.3) in `dir/cloud`; returns it and its port.
pub(crate) fn start_cloud(mosquitto: &Path, dir: &Path, pki: &DevPki) -> Result<(Proc, u16)> {
    let port = free_port()?;
    fs::create_dir_all(dir.join("cloud"))?;
    fs::write(
        dir.join("cloud/mosquitto.conf"),
        cloud_broker_conf(port, pki),
    )?;
    let mut cmd = Command::new(mosquitto);
    cmd.arg("-c").arg(dir.join("cloud/mosquitto.conf"));
    let proc = Proc::spawn("cloud broker", cmd, dir.join("cloud/mosquitto.log"), port)?;
    Ok((proc, port))
}

/// What blindgate is started with, besides the PKI and the cloud broker's port.
pub(crate) struct BlindgateSpec<'a> {
    pub(crate) binary: &'a Path,
    /// Publishes awaiting PUBACK per device connection.
    pub(crate) window: usize,
    pub(crate) log_level: &'a str,
}

/// Starts `blindgate gateway` in `dir/blindgate`; returns it and its device port.
pub(crate) fn start_blindgate(
    spec: &BlindgateSpec<'_>,
    dir: &Path,
    cloud_port: u16,
    pki: &DevPki,
) -> Result<(Proc, u16)> {
    let port = free_port()?;
    fs::create_dir_all(dir.join("blindgate"))?;
    let conf = dir.join("blindgate/gateway.toml");
    fs::write(
        &conf,
        blindgate_conf(
            &dir.join("blindgate"),
            port,
            cloud_port,
            pki,
            spec.window,
            spec.log_level,
        ),
    )?;
    let mut cmd = Command::new(spec.binary);
    cmd.args(["gateway", "--config"]).arg(&conf);
    let proc = Proc::spawn("blindgate", cmd, dir.join("blindgate/gateway.log"), port)?;
    Ok((proc, port))
}

/// Starts Mosquitto as a bridging gateway in `dir/bridge`; returns it and its device port.
pub(crate) fn start_bridge(
    mosquitto: &Path,
    dir: &Path,
    cloud_port: u16,
    pki: &DevPki,
) -> Result<(Proc, u16)> {
    let port = free_port()?;
    fs::create_dir_all(dir.join("bridge"))?;
    fs::write(
        dir.join("bridge/mosquitto.conf"),
        bridge_conf(&dir.join("bridge"), port, cloud_port, pki),
    )?;
    let mut cmd = Command::new(mosquitto);
    cmd.arg("-c").arg(dir.join("bridge/mosquitto.conf"));
    let proc = Proc::spawn(
        "mosquitto bridge",
        cmd,
        dir.join("bridge/mosquitto.log"),
        port,
    )?;
    Ok((proc, port))
}

// ---------------------------------------------------------------- configurations

fn cloud_broker_conf(port: u16, pki: &DevPki) -> String {
    let mut c = String::new();
    c.push_str("user root\npersistence false\nlog_dest stderr\n");
    c.push_str("max_inflight_messages 0\nmax_queued_messages 1000000\nset_tcp_nodelay true\n");
    let _ = writeln!(c, "listener {port} 127.0.0.1");
    let _ = writeln!(c, "cafile {}", pki.cloud_ca.cert.display());
    let _ = writeln!(c, "certfile {}", pki.cloud_broker.cert.display());
    let _ = writeln!(c, "keyfile {}", pki.cloud_broker.key.display());
    c.push_str("require_certificate true\nuse_identity_as_username true\ntls_version tlsv1.3\n");
    c
}

/// Mosquitto as the gateway: device listener like blindgate's (mTLS 1.3, device CA),
/// bridge to the cloud broker with persistence, QoS 1, TLS 1.3 and a client certificate.
fn bridge_conf(dir: &Path, port: u16, cloud_port: u16, pki: &DevPki) -> String {
    let mut c = String::new();
    c.push_str("user root\npersistence true\n");
    let _ = writeln!(c, "persistence_location {}/", dir.display());
    c.push_str("log_dest stderr\nmax_inflight_messages 0\nmax_queued_messages 1000000\n");
    c.push_str("set_tcp_nodelay true\n");
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
    c.push_str(
        "cleansession false\nclientid gw-1-bridge\ntry_private false\nnotifications false\n",
    );
    c.push_str("topic +/up out 1 e3/ gw/gw-1/e3/\n");
    c
}

fn blindgate_conf(
    dir: &Path,
    port: u16,
    cloud_port: u16,
    pki: &DevPki,
    window: usize,
    level: &str,
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
max_inflight_per_device = {window}
rate_limit_per_device = 1000000
rate_burst_per_device = 1000000

[cloud]
endpoints = ["mqtts://localhost:{cloud_port}"]
ca = "{cca}"
cert = "{ccert}"
key = "{ckey}"
inflight = 1000
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
    )
}
