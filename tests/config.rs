//! The gateway config file through the public API: the example file, defaults,
//! diagnostics with positions, semantic checks and the topic helpers.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use blindgate::config::{
    self, CipherOrder, ConfigError, Diagnostic, Endpoint, LogFormat, Overflow, ValidConfig,
};

const MIB: u64 = 1 << 20;

fn example_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("config/gateway.toml")
}

/// A config with every required key; each argument adds lines to its section.
fn config_text(gateway: &str, devices: &str, cloud: &str, rest: &str) -> String {
    format!(
        r#"[gateway]
id = "gw-1"
{gateway}
[devices]
ca = "/pki/device-ca.pem"
cert = "/pki/gateway-devices.pem"
key = "/pki/gateway-devices.key"
{devices}
[cloud]
endpoints = ["mqtts://cloud.example.com"]
ca = "/pki/cloud-ca.pem"
cert = "/pki/gateway-client.pem"
key = "/pki/gateway-client.key"
{cloud}
{rest}"#
    )
}

fn parse(text: &str) -> Result<ValidConfig, ConfigError> {
    config::parse(text, Path::new("/etc/blindgate/gateway.toml"))
}

fn parse_ok(text: &str) -> ValidConfig {
    parse(text).unwrap_or_else(|err| panic!("config rejected:\n{err}"))
}

fn diagnostics(text: &str) -> Vec<Diagnostic> {
    match parse(text) {
        Ok(_) => panic!("config accepted:\n{text}"),
        Err(err) => err.diagnostics,
    }
}

/// The only diagnostic, which must be about `key`.
fn only_diagnostic(text: &str, key: &str) -> Diagnostic {
    let diagnostics = diagnostics(text);
    assert_eq!(diagnostics.len(), 1, "{diagnostics:#?}");
    let diagnostic = diagnostics.into_iter().next().expect("one diagnostic");
    assert_eq!(diagnostic.key, key, "{diagnostic:#?}");
    diagnostic
}

#[test]
fn the_example_file_holds_the_installed_values() {
    let path = example_path();
    let config = config::load(&path).unwrap_or_else(|err| panic!("{err}"));
    let dir = path.parent().expect("the example is in a directory");
    assert_eq!(config.gateway.id, "gw-1");
    assert_eq!(config.gateway.data_dir, Path::new("/var/lib/blindgate"));
    assert_eq!(config.gateway.threads, 1);
    assert_eq!(config.devices.ca, dir.join("certs/device-ca.pem"));
    assert_eq!(
        config.devices.key.file(),
        Some(dir.join("certs/gateway-devices.key").as_path())
    );
    assert_eq!(config.cloud.cert, dir.join("certs/gateway-client.pem"));
    assert_eq!(
        config.cloud.endpoints,
        [Endpoint {
            host: "cloud.example.com".into(),
            port: 8883
        }]
    );
    assert_eq!(
        config.devices.listen,
        SocketAddr::from(([0, 0, 0, 0], 8883))
    );
}

#[test]
fn the_example_file_shows_the_defaults_and_the_required_keys() {
    let path = example_path();
    let example = config::load(&path).unwrap_or_else(|err| panic!("{err}"));
    let only_required = r#"
[gateway]
id = "gw-1"
[devices]
ca = "certs/device-ca.pem"
cert = "certs/gateway-devices.pem"
key = "certs/gateway-devices.key"
[cloud]
endpoints = ["mqtts://cloud.example.com:8883"]
ca = "certs/cloud-ca.pem"
cert = "certs/gateway-client.pem"
key = "certs/gateway-client.key"
"#;
    let defaults = config::parse(only_required, &path).unwrap_or_else(|err| panic!("{err}"));
    assert_eq!(example, defaults);
}

#[test]
fn the_lab_config_differs_from_the_example_only_in_lab_values() {
    let dir = tempfile::tempdir().expect("tempdir");
    let lab = blindgate::pki::LabConfigs::render(&blindgate::pki::DevPkiOptions {
        out_dir: dir.path().join("lab"),
        ..Default::default()
    })
    .expect("lab configs");
    let lab_config =
        config::parse(&lab.gateway.1, &lab.gateway.0).unwrap_or_else(|e| panic!("{e}"));
    let mut example = config::load(&example_path()).unwrap_or_else(|err| panic!("{err}"));
    let at = |name: &str| dir.path().join("lab").join(name);
    example.gateway.data_dir = at("var/gateway");
    example.devices.listen = SocketAddr::from(([127, 0, 0, 1], 8883));
    example.devices.ca = at("device-ca.pem");
    example.devices.cert = at("gateway-devices.pem");
    example.devices.key = config::KeySource::File(at("gateway-devices.key"));
    example.cloud.endpoints = vec![Endpoint {
        host: "localhost".into(),
        port: 8884,
    }];
    example.cloud.ca = at("cloud-ca.pem");
    example.cloud.cert = at("gateway-client.pem");
    example.cloud.key = config::KeySource::File(at("gateway-client.key"));
    assert_eq!(lab_config, example);
    // The comments come along: the lab file is the example, annotated.
    assert!(lab.gateway.1.contains("# Required. This gateway's name"));
    assert!(lab.cloud.1.contains("state_dir = \"var/cloud/state\""));
}

#[test]
fn defaults_equal_the_documented_ones() {
    let config = parse_ok(&config_text("", "", "", ""));
    assert_eq!(config.gateway.data_dir, Path::new("/var/lib/blindgate"));
    assert_eq!(config.gateway.threads, 1);

    let devices = &config.devices;
    assert_eq!(devices.listen.to_string(), "0.0.0.0:8883");
    assert_eq!(devices.plaintext_listen, None);
    assert!(!devices.plaintext_allow_non_loopback);
    assert_eq!(devices.max_connections, 1000);
    assert_eq!(devices.max_inflight_per_device, 32);
    assert_eq!(devices.rate_limit_per_device, 200);
    assert_eq!(devices.rate_burst_per_device, 400);
    assert_eq!(devices.connect_timeout, Duration::from_secs(10));
    assert_eq!(devices.up_topic.as_str(), "e3/{device_id}/up");
    assert_eq!(devices.down_topic.as_str(), "e3/{device_id}/down");
    assert_eq!(devices.downlink_pending_per_device, 100);

    assert_eq!(config.envelope.max_size, 262_144);

    let queue = &config.queue;
    assert_eq!(queue.max_bytes, 256 * MIB);
    assert_eq!(queue.min_free_disk, 64 * MIB);
    assert_eq!(queue.device_quota, 32 * MIB);
    assert_eq!(queue.overflow, Overflow::Refuse);
    assert_eq!(queue.cache_size, 8 * MIB);
    assert_eq!(queue.max_batch, 1024);

    let cloud = &config.cloud;
    assert_eq!(cloud.pins, Vec::<[u8; 32]>::new());
    assert_eq!(cloud.cipher_order, CipherOrder::Auto);
    assert_eq!(
        cloud.client_id, "gw-1",
        "an empty client id means gateway.id"
    );
    assert_eq!(cloud.keep_alive, Duration::from_secs(30));
    assert_eq!(cloud.inflight, 64);
    assert_eq!(cloud.backoff_min, Duration::from_secs(1));
    assert_eq!(cloud.backoff_max, Duration::from_secs(60));
    assert_eq!(cloud.up_topic.as_str(), "gw/{gateway_id}/e3/{device_id}/up");
    assert_eq!(
        cloud.down_topic.as_str(),
        "gw/{gateway_id}/e3/{device_id}/down"
    );
    assert_eq!(cloud.drain_rate, 2000);
    assert_eq!(cloud.drain_inflight, 64);
    assert_eq!(cloud.ready_max_ack_age, Duration::from_secs(60));
    assert_eq!(cloud.endpoints[0].port, 8883);

    assert_eq!(
        config.metrics.listen.map(|a| a.to_string()).as_deref(),
        Some("127.0.0.1:9464")
    );
    assert_eq!(config.log.format, LogFormat::Human);
    assert_eq!(config.log.level, "info");
}

#[test]
fn a_file_with_three_different_mistakes_yields_three_diagnostics_with_positions() {
    let text = r#"[gateway]
id = "gw-1"

[devices]
ca = "/pki/device-ca.pem"
cert = "/pki/gateway-devices.pem"
key = "/pki/gateway-devices.key"
max_connections = 0

[queue]
max_byte = "1GiB"

[cloud]
endpoints = ["mqtts://cloud.example.com"]
ca = "/pki/cloud-ca.pem"
cert = "/pki/gateway-client.pem"
key = "/pki/gateway-client.key"
keep_alive = "30 secs"
"#;
    let found: Vec<(usize, usize, String)> = diagnostics(text)
        .into_iter()
        .map(|d| (d.line, d.column, d.key))
        .collect();
    assert_eq!(
        found,
        [
            (8, 19, "devices.max_connections".to_owned()),
            (11, 1, "queue.max_byte".to_owned()),
            (18, 14, "cloud.keep_alive".to_owned()),
        ]
    );
}

#[test]
fn unknown_key_max_byte_suggests_max_bytes() {
    let text = config_text("", "", "", "[queue]\nmax_byte = \"1GiB\"\n");
    let diagnostic = only_diagnostic(&text, "queue.max_byte");
    assert_eq!(diagnostic.message, "unknown key");
    assert_eq!(
        diagnostic.hint.as_deref(),
        Some("did you mean `max_bytes`?")
    );
}

#[test]
fn unknown_section_suggests_the_closest_one() {
    let text = config_text("", "", "", "[queu]\nmax_bytes = \"1GiB\"\n");
    let diagnostic = only_diagnostic(&text, "queu");
    assert_eq!(diagnostic.message, "unknown section");
    assert_eq!(diagnostic.hint.as_deref(), Some("did you mean [queue]?"));
}

#[test]
fn bad_duration_and_bad_size_are_explained() {
    let text = config_text(
        "",
        "",
        "keep_alive = \"30 secs\"",
        "[queue]\nmax_bytes = \"12XB\"\n",
    );
    let diagnostics = diagnostics(&text);
    assert_eq!(diagnostics.len(), 2, "{diagnostics:#?}");
    let duration = &diagnostics[0];
    assert_eq!(duration.key, "cloud.keep_alive");
    assert!(
        duration.message.contains("\"30 secs\""),
        "{}",
        duration.message
    );
    assert!(
        duration.message.contains("ms, s, m or h"),
        "{}",
        duration.message
    );
    let size = &diagnostics[1];
    assert_eq!(size.key, "queue.max_bytes");
    assert!(
        size.message.contains("`XB` is not a known unit"),
        "{}",
        size.message
    );
    assert!(size.message.contains("KiB, MiB, GiB"), "{}", size.message);
}

#[test]
fn a_bare_number_is_not_a_duration_or_a_size() {
    let text = config_text("", "", "keep_alive = 30", "[queue]\nmax_bytes = 1024\n");
    let diagnostics = diagnostics(&text);
    assert_eq!(diagnostics.len(), 2, "{diagnostics:#?}");
    assert!(
        diagnostics[0].message.contains("\"30s\""),
        "{}",
        diagnostics[0].message
    );
    assert!(
        diagnostics[1].message.contains("\"64MiB\""),
        "{}",
        diagnostics[1].message
    );
}

#[test]
fn backoff_max_shorter_than_backoff_min_is_rejected() {
    let text = config_text("", "", "backoff_min = \"2m\"\nbackoff_max = \"30s\"", "");
    let diagnostic = only_diagnostic(&text, "cloud.backoff_max");
    assert_eq!(
        diagnostic.message,
        "backoff_max 30s is shorter than backoff_min 2m"
    );
    let defaulted_max = config_text("", "", "backoff_min = \"5m\"", "");
    only_diagnostic(&defaulted_max, "cloud.backoff_max");
}

#[test]
fn threads_are_between_1_and_64() {
    let four = parse_ok(&config_text("threads = 4", "", "", ""));
    assert_eq!(four.gateway.threads, 4);
    for bad in ["0", "65", "-1"] {
        let text = config_text(&format!("threads = {bad}"), "", "", "");
        let diagnostic = only_diagnostic(&text, "gateway.threads");
        assert_eq!(
            (diagnostic.line, diagnostic.column),
            (3, 11),
            "{bad}: points at the value"
        );
        assert_eq!(
            diagnostic.message,
            format!("must be between 1 and 64, not {bad}")
        );
    }
}

#[test]
fn drain_inflight_is_a_share_of_inflight() {
    let text = config_text("", "", "inflight = 100\ndrain_inflight = 200", "");
    let diagnostic = only_diagnostic(&text, "cloud.drain_inflight");
    assert_eq!(
        diagnostic.message,
        "drain_inflight 200 is more than inflight 100"
    );
    let share = parse(&config_text(
        "",
        "",
        "inflight = 100\ndrain_inflight = 25",
        "",
    ))
    .expect("a share of inflight is valid");
    assert_eq!(share.cloud.drain_inflight, 25);
    let whole = parse(&config_text("", "", "inflight = 100", "")).expect("valid");
    assert_eq!(whole.cloud.drain_inflight, 100, "default: all of it");
}

#[test]
fn a_non_loopback_plaintext_listener_is_rejected_unless_allowed() {
    let open = config_text("", "plaintext_listen = \"0.0.0.0:1883\"", "", "");
    let diagnostic = only_diagnostic(&open, "devices.plaintext_listen");
    assert!(
        diagnostic
            .hint
            .is_some_and(|h| h.contains("plaintext_allow_non_loopback"))
    );

    let allowed = config_text(
        "",
        "plaintext_listen = \"0.0.0.0:1883\"\nplaintext_allow_non_loopback = true",
        "",
        "",
    );
    let config = parse_ok(&allowed);
    assert_eq!(
        config.devices.plaintext_listen.map(|a| a.port()),
        Some(1883)
    );

    let loopback = config_text("", "plaintext_listen = \"127.0.0.1:1883\"", "", "");
    assert!(parse_ok(&loopback).devices.plaintext_listen.is_some());
}

#[test]
fn topic_templates_are_validated() {
    let cases = [
        ("up_topic = \"e3/up\"", "", "devices.up_topic"),
        (
            "down_topic = \"e3/{device}/down\"",
            "",
            "devices.down_topic",
        ),
        (
            "up_topic = \"e3/{gateway_id}/{device_id}\"",
            "",
            "devices.up_topic",
        ),
        (
            "down_topic = \"e3/{device_id}/up\"",
            "",
            "devices.down_topic",
        ),
        ("", "up_topic = \"gw/e3/{device_id}/up\"", "cloud.up_topic"),
        (
            "",
            "down_topic = \"gw/{gateway_id}/e3/#\"",
            "cloud.down_topic",
        ),
    ];
    for (devices, cloud, key) in cases {
        only_diagnostic(&config_text("", devices, cloud, ""), key);
    }
    let custom = config_text(
        "",
        "up_topic = \"site/{device_id}\"",
        "up_topic = \"{gateway_id}/{device_id}\"",
        "",
    );
    let config = parse_ok(&custom);
    assert_eq!(config.device_up_topic("d1"), "site/d1");
    assert_eq!(config.cloud_up_topic("d1"), "gw-1/d1");
}

#[test]
fn relative_paths_are_resolved_against_the_config_directory() {
    let text = r#"
[gateway]
id = "gw-1"
data_dir = "state"
[devices]
ca = "certs/device-ca.pem"
cert = "/abs/gateway-devices.pem"
key = "../keys/gateway-devices.key"
[cloud]
endpoints = ["mqtts://cloud.example.com"]
ca = "certs/cloud-ca.pem"
cert = "certs/gateway-client.pem"
key = "certs/gateway-client.key"
"#;
    let config = config::parse(text, Path::new("/srv/site/gateway.toml"))
        .unwrap_or_else(|err| panic!("{err}"));
    assert_eq!(config.gateway.data_dir, Path::new("/srv/site/state"));
    assert_eq!(
        config.devices.ca,
        Path::new("/srv/site/certs/device-ca.pem")
    );
    assert_eq!(config.devices.cert, Path::new("/abs/gateway-devices.pem"));
    assert_eq!(
        config.devices.key.file(),
        Some(Path::new("/srv/site/../keys/gateway-devices.key"))
    );
    assert_eq!(config.cloud.ca, Path::new("/srv/site/certs/cloud-ca.pem"));
}

#[test]
fn topic_helpers_round_trip() {
    let config = parse_ok(&config_text("", "", "", ""));
    for id in ["d", "pump-17", "a.b_c-D9", &"x".repeat(64)] {
        assert_eq!(config.device_up_topic(id), format!("e3/{id}/up"));
        assert_eq!(
            config.parse_device_up_topic(&config.device_up_topic(id)),
            Some(id)
        );
        assert_eq!(config.cloud_down_topic(id), format!("gw/gw-1/e3/{id}/down"));
        assert_eq!(
            config.parse_cloud_down_topic(&config.cloud_down_topic(id)),
            Some(id)
        );
    }
    assert_eq!(config.device_down_topic("d1"), "e3/d1/down");
    assert_eq!(config.cloud_up_topic("d1"), "gw/gw-1/e3/d1/up");
    assert_eq!(config.cloud_down_filter(), "gw/gw-1/e3/+/down");
    for foreign in [
        "e3/d1/down",
        "e3/a/b/up",
        "e3//up",
        "e3/d 1/up",
        "x/e3/d1/up",
    ] {
        assert_eq!(config.parse_device_up_topic(foreign), None, "{foreign}");
    }
    assert_eq!(config.parse_cloud_down_topic("gw/gw-2/e3/d1/down"), None);
    assert_eq!(config.parse_cloud_down_topic("gw/gw-1/e3/+/down"), None);
}

#[test]
fn missing_required_keys_point_at_the_section_header_or_line_one() {
    let text = "# site 4\n\n[devices]\nca = \"a.pem\"\n";
    let found: Vec<(usize, usize, String)> = diagnostics(text)
        .into_iter()
        .map(|d| (d.line, d.column, d.key))
        .collect();
    let at_line_one = |key: &str| (1, 1, key.to_owned());
    let at_devices = |key: &str| (3, 1, key.to_owned());
    let mut expected = vec![
        at_line_one("gateway.id"),
        at_devices("devices.cert"),
        at_devices("devices.key"),
        at_line_one("cloud.endpoints"),
        at_line_one("cloud.ca"),
        at_line_one("cloud.cert"),
        at_line_one("cloud.key"),
    ];
    expected.sort_by_key(|(line, column, _)| (*line, *column));
    assert_eq!(found, expected);
}

#[test]
fn every_bad_endpoint_and_pin_is_reported_at_its_own_position() {
    let cloud_lines = "pins = [\"sha256//short\", \"ab\"]";
    let text = config_text("", "", cloud_lines, "").replace(
        "[\"mqtts://cloud.example.com\"]",
        "[\"mqtt://a:1883\", \"mqtts://b\", \"c:8883\"]",
    );
    let keys: Vec<(String, usize)> = diagnostics(&text)
        .into_iter()
        .map(|d| (d.key, d.column))
        .collect();
    assert_eq!(
        keys,
        [
            ("cloud.endpoints[0]".to_owned(), 14),
            ("cloud.endpoints[2]".to_owned(), 44),
            ("cloud.pins[0]".to_owned(), 9),
            ("cloud.pins[1]".to_owned(), 26),
        ]
    );
}

#[test]
fn queue_caps_must_fit_inside_each_other() {
    let too_big = config_text(
        "",
        "",
        "",
        "[queue]\nmax_bytes = \"16MiB\"\ndevice_quota = \"32MiB\"\n",
    );
    only_diagnostic(&too_big, "queue.device_quota");
    let too_small = config_text("", "", "", "[queue]\ndevice_quota = \"64KiB\"\n");
    let diagnostic = only_diagnostic(&too_small, "queue.device_quota");
    assert!(
        diagnostic.message.contains("envelope.max_size 256KiB"),
        "{}",
        diagnostic.message
    );
}

#[test]
fn two_listeners_on_one_port_are_rejected() {
    let text = config_text("", "", "", "[metrics]\nlisten = \"127.0.0.1:8883\"\n");
    let diagnostic = only_diagnostic(&text, "metrics.listen");
    assert!(
        diagnostic.message.contains("devices.listen"),
        "{}",
        diagnostic.message
    );
    let off = config_text("", "", "", "[metrics]\nlisten = \"\"\n");
    assert_eq!(parse_ok(&off).metrics.listen, None);
}

#[test]
fn wrong_types_and_ranges_are_all_reported_together() {
    let text = config_text(
        "id = \"gw 1\"",
        "max_inflight_per_device = 70000\nrate_limit_per_device = \"200\"\nplaintext_allow_non_loopback = \"yes\"",
        "inflight = 0\ncipher_order = \"fastest\"",
        "[log]\nformat = \"jsn\"\nlevel = \"inf\"\n",
    )
    .replacen("id = \"gw-1\"\n", "", 1);
    let keys: Vec<String> = diagnostics(&text).into_iter().map(|d| d.key).collect();
    assert_eq!(
        keys,
        [
            "gateway.id",
            "devices.max_inflight_per_device",
            "devices.rate_limit_per_device",
            "devices.plaintext_allow_non_loopback",
            "cloud.inflight",
            "cloud.cipher_order",
            "log.format",
            "log.level",
        ]
    );
}

#[test]
fn a_syntax_error_stops_with_one_diagnostic() {
    let text = "[gateway]\nid = \"gw-1\n";
    let diagnostics = diagnostics(text);
    assert_eq!(diagnostics.len(), 1, "{diagnostics:#?}");
    assert_eq!((diagnostics[0].line, diagnostics[0].key.as_str()), (2, ""));
}

#[test]
fn a_key_outside_any_section_names_its_section() {
    let text = format!("data_dir = \"/data\"\n{}", config_text("", "", "", ""));
    let diagnostic = only_diagnostic(&text, "data_dir");
    assert_eq!(
        diagnostic.hint.as_deref(),
        Some("put it under the [gateway] header")
    );
}

#[test]
fn the_error_prints_one_line_per_diagnostic_with_the_file_name() {
    let text = config_text(
        "",
        "",
        "keep_alive = \"1s\"",
        "[queue]\nmax_byte = \"1GiB\"\n",
    );
    let err = parse(&text).expect_err("two mistakes");
    let printed = err.to_string();
    let lines: Vec<&str> = printed.lines().collect();
    assert_eq!(lines.len(), 2, "{printed}");
    assert_eq!(
        lines[0],
        "/etc/blindgate/gateway.toml:14:14: cloud.keep_alive: must be between 5s and 1h, not 1s"
    );
    assert_eq!(
        lines[1],
        "/etc/blindgate/gateway.toml:16:1: queue.max_byte: unknown key (hint: did you mean `max_bytes`?)"
    );
    assert!(std::error::Error::source(&err).is_none());
}

#[test]
fn an_unreadable_file_is_reported_with_its_cause() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("missing.toml");
    let err = config::load(&path).expect_err("no such file");
    assert!(err.is_unreadable());
    assert!(err.to_string().starts_with("cannot read config file"));
    assert!(std::error::Error::source(&err).is_some());
}

#[test]
fn the_lab_config_of_certs_dev_builds_a_gateway_plan() {
    // What the README's walk-through does: `certs dev --out lab` writes the PKI and
    // lab configs, and the gateway's plan builds from lab/gateway.toml: every TLS file
    // is found and loads.
    let root = tempfile::tempdir().expect("tempdir");
    let opts = blindgate::pki::DevPkiOptions {
        out_dir: root.path().join("lab"),
        ..Default::default()
    };
    let lab = blindgate::pki::LabConfigs::render(&opts).expect("lab configs");
    blindgate::pki::generate_dev_pki(&opts).expect("dev PKI");
    lab.write(false).expect("lab configs written");
    let checked = config::load_checked(&lab.gateway.0, config::PortCheck::Skip)
        .unwrap_or_else(|err| panic!("{err}"));
    assert!(checked.warnings.is_empty(), "{:#?}", checked.warnings);
    let plan = blindgate::gateway::GatewayPlan::from_config(&checked.config).expect("plan builds");
    assert_eq!(plan.queue.path, root.path().join("lab/var/gateway/queue"));
    assert!(
        root.path().join("lab/var/gateway").is_dir(),
        "data_dir created"
    );
    let cloud = blindgate::cloud::config::load(&lab.cloud.0).expect("the lab cloud config loads");
    assert!(cloud.settings.registry.is_some());
}
