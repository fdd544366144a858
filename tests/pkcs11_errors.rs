//! Each way a PKCS#11 token key can be wrong, as `blindgate check-config` (the real
//! binary, a real SoftHSM2 token) reports it: module missing or not a module, token
//! missing, wrong PIN, PIN file readable by others, key missing, certificate of
//! another key, a PIN in the URI; and the config's rules for the module and the PIN
//! source.

mod common;
mod pkcs11_support;

use std::fs;
use std::os::unix::fs::PermissionsExt as _;

use pkcs11_support::*;

#[test]
fn a_missing_module_is_named() {
    if !require_softhsm() {
        return;
    }
    let token = Token::new();
    let lines = token
        .key_lines()
        .replace(MODULE, "/usr/lib/nowhere/libnope.so");
    let text = failing_check(&token, &lines);
    assert_contains(
        &text,
        &[
            "cloud.key",
            "PKCS#11 module /usr/lib/nowhere/libnope.so not found",
            "install the module's package",
        ],
    );
}

#[test]
fn a_file_that_is_no_module_cannot_be_loaded() {
    if !require_softhsm() {
        return;
    }
    let token = Token::new();
    let not_a_module = token.path("softhsm2.conf");
    let lines = token
        .key_lines()
        .replace(MODULE, &not_a_module.display().to_string());
    let text = failing_check(&token, &lines);
    assert_contains(&text, &["cannot be loaded", "built for this architecture"]);
}

#[test]
fn a_missing_token_lists_the_tokens_present() {
    if !require_softhsm() {
        return;
    }
    let token = Token::new();
    let lines = token.key_lines().replace("token=blindgate", "token=other");
    let text = failing_check(&token, &lines);
    assert_contains(
        &text,
        &[
            r#"no PKCS#11 token label "other" (tokens present: "blindgate")"#,
            "set token=",
        ],
    );
}

#[test]
fn a_wrong_pin_is_refused_and_never_shown() {
    if !require_softhsm() {
        return;
    }
    let token = Token::new();
    write_private(&token.pin_file, "999999\n");
    let text = failing_check(&token, &token.key_lines());
    assert_contains(
        &text,
        &[r#"the token "blindgate" refused the PIN"#, "PIN file"],
    );
    assert!(!text.contains("999999"), "{text}");
}

/// systemd must not restart a gateway whose PIN the token refused: every start would
/// use up one more of the token's tries until it locks. A token that is not there (yet,
/// a USB token enumerating late) keeps the ordinary failure status, which is restarted.
#[test]
fn a_refused_pin_stops_the_gateway_with_the_status_systemd_does_not_restart() {
    if !require_softhsm() {
        return;
    }
    let token = Token::new();
    write_private(&token.pin_file, "999999\n");
    let output = token.failing_gateway(&token.key_lines());
    let text = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(78), "{text}");
    assert_contains(&text, &["refused the PIN", "not retrying"]);
    assert!(!text.contains("999999"), "{text}");
    let unit = fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/systemd/blindgate.service"
    ))
    .expect("unit");
    assert!(unit.lines().any(|l| l == "RestartPreventExitStatus=78"));

    write_private(&token.pin_file, &format!("{PIN}\n"));
    let lines = token
        .key_lines()
        .replace(&format!("token={TOKEN}"), "token=not-plugged-in");
    let output = token.failing_gateway(&lines);
    let text = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{text}");
    assert_contains(&text, &["not-plugged-in"]);
}

#[test]
fn a_pin_file_others_may_read_is_refused() {
    if !require_softhsm() {
        return;
    }
    let token = Token::new();
    fs::set_permissions(&token.pin_file, fs::Permissions::from_mode(0o644)).expect("chmod");
    let text = failing_check(&token, &token.key_lines());
    assert_contains(
        &text,
        &["accessible by group or others (mode 0644)", "chmod 0600"],
    );
}

#[test]
fn a_missing_key_lists_the_keys_present() {
    if !require_softhsm() {
        return;
    }
    let token = Token::new();
    let lines = token
        .key_lines()
        .replace("object=gateway-key", "object=old-key");
    let text = failing_check(&token, &lines);
    assert_contains(
        &text,
        &[
            "no private key pkcs11:token=blindgate;object=old-key;type=private in the token",
            r#"(private keys present: "device-listener-key", "gateway-key")"#,
        ],
    );
}

#[test]
fn a_certificate_of_another_key_does_not_match() {
    if !require_softhsm() {
        return;
    }
    let token = Token::new();
    let other = token.pki.gateway_client.cert.display().to_string();
    let lines = token
        .key_lines()
        .replace(&token.cert.display().to_string(), &other);
    let text = failing_check(&token, &lines);
    assert_contains(
        &text,
        &[
            &format!("the certificate {other} does not match the token's key"),
            "issued for another key",
        ],
    );
}

#[test]
fn a_pin_in_the_uri_is_refused_before_any_token_is_opened() {
    let token = Token::without_token();
    let lines = format!(
        "cert = \"{}\"\nkey = \"pkcs11:token=t;object=k;pin-value={PIN}\"\npkcs11_module = \"{MODULE}\"",
        token.cert.display()
    );
    let text = failing_check(&token, &lines);
    assert_contains(&text, &["holds a PIN (pin-value)", "pkcs11_pin_file"]);
}

/// Diagnostics of a config whose `[cloud]` key lines are `lines` (the file alone).
fn file_problems(lines: &str) -> Vec<(String, String)> {
    let token = Token::without_token();
    let config = token.config(0, 8883, lines);
    let text = fs::read_to_string(&config).expect("config");
    match blindgate::config::parse(&text, &config) {
        Ok(_) => Vec::new(),
        Err(err) => err
            .diagnostics
            .into_iter()
            .map(|d| {
                (
                    d.key,
                    format!("{} / {}", d.message, d.hint.unwrap_or_default()),
                )
            })
            .collect(),
    }
}

#[test]
fn the_config_asks_for_a_module_and_exactly_one_pin_source() {
    let uri = format!("cert = \"/c.pem\"\nkey = \"pkcs11:token={TOKEN};object={KEY_LABEL}\"");
    let module = format!("\npkcs11_module = \"{MODULE}\"");
    let cases = [
        (uri.clone(), "cloud.key", "no module is named"),
        (format!("{uri}{module}"), "cloud.key", "no PIN source"),
        (
            format!("{uri}{module}\npkcs11_pin_file = \"/p\"\npkcs11_pin_credential = \"p\""),
            "cloud.pkcs11_pin_credential",
            "more than one PIN source",
        ),
        (
            format!("{uri}{module}\npkcs11_pin_credential = \"../p\""),
            "cloud.pkcs11_pin_credential",
            "not a credential name",
        ),
        (
            "cert = \"/c.pem\"\nkey = \"/k.pem\"\npkcs11_pin_file = \"/p\"".to_owned(),
            "cloud.pkcs11_pin_file",
            "only used when key is a pkcs11: URI",
        ),
    ];
    for (lines, key, message) in cases {
        let problems = file_problems(&lines);
        assert_eq!(problems.len(), 1, "{lines}: {problems:?}");
        assert_eq!(problems[0].0, key, "{lines}: {problems:?}");
        assert!(problems[0].1.contains(message), "{lines}: {problems:?}");
    }
    let good = format!("{uri}{module}\npkcs11_pin_file = \"/p\"");
    assert_eq!(file_problems(&good), Vec::new());
    let in_uri = format!(
        "cert = \"/c.pem\"\nkey = \"pkcs11:token={TOKEN};object={KEY_LABEL}?module-path={MODULE}&pin-source=/p\""
    );
    assert_eq!(file_problems(&in_uri), Vec::new());
}

#[test]
fn the_device_listener_key_in_the_token_is_checked_too() {
    if !require_softhsm() {
        return;
    }
    let token = Token::new();
    let other = token.pki.gateway_devices.cert.display().to_string();
    let device_lines = token.device_key_lines().replace(
        &token.path("devices-token.pem").display().to_string(),
        &other,
    );
    let config = token.config_with(0, 8883, &device_lines, &token.key_lines());
    let output = token
        .blindgate()
        .arg("check-config")
        .arg(&config)
        .output()
        .expect("runs");
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{text}");
    assert_contains(
        &text,
        &[&format!(
            "devices.key: the certificate {other} does not match the token's key pkcs11:token={TOKEN};object={DEVICE_KEY_LABEL}"
        )],
    );
    assert!(
        !text.contains("cloud.key"),
        "the uplink key is fine:\n{text}"
    );
}
