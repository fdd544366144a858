//! Single-value checks: each turns what the file says into the typed value, or says
//! what is wrong (a [`Problem`] with a hint and, where it helps, an example).

use super::*;

pub(super) fn gateway_id(id: String) -> Result<String, Problem> {
    if e3::header::validate_device_id(id.as_bytes()).is_ok() {
        return Ok(id);
    }
    let rule = "1 to 64 characters, each a letter, a digit, '.', '_' or '-'";
    let allowed = |c: char| u8::try_from(c).is_ok_and(e3::header::is_device_id_byte);
    let problem = match id.chars().find(|c| !allowed(*c)) {
        Some(bad) => Problem::new(format!("{bad:?} is not allowed in an id")),
        None if id.is_empty() => Problem::new("the id is empty"),
        None => Problem::new(format!("the id is {} characters long", id.len())),
    };
    Err(problem.hint(format!("an id is {rule}, e.g. \"gw-1\"")))
}

pub(super) fn file_path(base: &Path, path: String) -> Result<PathBuf, Problem> {
    if path.trim().is_empty() {
        return Err(Problem::new("the path is empty")
            .hint("write a file path; a relative path is relative to this file's directory"));
    }
    Ok(base.join(path))
}

pub(super) fn socket_addr(text: String) -> Result<SocketAddr, Problem> {
    text.trim().parse().map_err(|_| {
        Problem::new(format!("`{text}` is not an IP address and port")).hint(
            r#"write e.g. "0.0.0.0:8883", "127.0.0.1:8883" or "[::]:8883"; host names such as localhost are not accepted"#,
        )
    })
}

/// An absolute HTTP path without query or fragment, e.g. `/mqtt`.
pub(super) fn websocket_path(path: String) -> Result<String, Problem> {
    let valid_char = |c: char| c.is_ascii_graphic() && !matches!(c, '?' | '#' | '%');
    if path.starts_with('/') && path.len() <= 256 && path.chars().all(valid_char) {
        return Ok(path);
    }
    Err(Problem::new(format!("`{path}` is not a WebSocket request path"))
        .hint(r#"write an absolute path of visible ASCII characters without '?', '#' or '%', e.g. "/mqtt""#))
}

/// `""` means off.
pub(super) fn optional_socket_addr(text: String) -> Result<Option<SocketAddr>, Problem> {
    match text.trim() {
        "" => Ok(None),
        _ => socket_addr(text).map(Some),
    }
}

pub(super) fn count_in<U: TryFrom<i64>>(
    range: RangeInclusive<i64>,
) -> impl FnOnce(Count) -> Result<U, Problem> {
    move |Count(n)| {
        let out_of_range = || {
            Problem::new(format!(
                "must be between {} and {}, not {n}",
                range.start(),
                range.end()
            ))
        };
        if !range.contains(&n) {
            return Err(out_of_range());
        }
        U::try_from(n).map_err(|_| out_of_range())
    }
}

pub(super) fn duration_in(
    range: RangeInclusive<Duration>,
) -> impl FnOnce(HumanDuration) -> Result<Duration, Problem> + Clone {
    move |HumanDuration(duration)| match range.contains(&duration) {
        true => Ok(duration),
        false => Err(Problem::new(format!(
            "must be between {} and {}, not {}",
            format_duration(*range.start()),
            format_duration(*range.end()),
            format_duration(duration)
        ))),
    }
}

pub(super) const fn secs(secs: u64) -> Duration {
    Duration::from_secs(secs)
}

pub(super) const fn millis(millis: u64) -> Duration {
    Duration::from_millis(millis)
}

pub(super) fn size_in(range: RangeInclusive<u64>) -> impl FnOnce(ByteSize) -> Result<u64, Problem> {
    move |ByteSize(bytes)| match range.contains(&bytes) {
        true => Ok(bytes),
        false if *range.end() == u64::MAX => Err(Problem::new(format!(
            "must be at least {}",
            format_byte_size(*range.start())
        ))),
        false => Err(Problem::new(format!(
            "must be between {} and {}, not {}",
            format_byte_size(*range.start()),
            format_byte_size(*range.end()),
            format_byte_size(bytes)
        ))),
    }
}

pub(super) fn device_topic(template: String) -> Result<String, Problem> {
    check_topic(&template, false)
        .map(|()| template)
        .map_err(|problem| with_example(problem, DEFAULT_DEVICE_UP_TOPIC))
}

pub(super) fn cloud_topic(template: String) -> Result<String, Problem> {
    check_topic(&template, true)
        .map(|()| template)
        .map_err(|problem| with_example(problem, DEFAULT_CLOUD_UP_TOPIC))
}

/// Adds `example` as the hint unless the problem has a more specific one.
pub(super) fn with_example(problem: Problem, example: &str) -> Problem {
    match problem.hint {
        Some(_) => problem,
        None => problem.hint(format!("e.g. \"{example}\"")),
    }
}

/// A topic template: a valid MQTT topic name whose levels may be exactly
/// `{device_id}` (once) and, if `with_gateway`, `{gateway_id}` (once).
pub(super) fn check_topic(template: &str, with_gateway: bool) -> Result<(), Problem> {
    if template.is_empty() {
        return Err(Problem::new("the topic is empty"));
    }
    if template.contains(['+', '#', '\0']) {
        return Err(Problem::new(
            "`+` and `#` are wildcards and cannot be part of a topic",
        ));
    }
    if template.starts_with('$') {
        return Err(Problem::new(
            "topics starting with `$` are reserved for the broker",
        ));
    }
    let (mut devices, mut gateways) = (0, 0);
    for level in template.split('/') {
        match level {
            DEVICE_PLACEHOLDER => devices += 1,
            GATEWAY_PLACEHOLDER => gateways += 1,
            level if level.contains(['{', '}']) => return Err(placeholder_problem(level)),
            _ => {}
        }
    }
    match (devices, gateways, with_gateway) {
        (1, 1, true) | (1, 0, false) => Ok(()),
        (_, _, false) if gateways > 0 => Err(Problem::new(
            "`{gateway_id}` can only be used in [cloud] topics",
        )),
        (1, _, true) => Err(Problem::new(format!(
            "must contain `{{gateway_id}}` exactly once, not {gateways} times"
        ))),
        _ => Err(Problem::new(format!(
            "must contain `{{device_id}}` exactly once, not {devices} times"
        ))),
    }
}

pub(super) fn placeholder_problem(level: &str) -> Problem {
    let known = [DEVICE_PLACEHOLDER, GATEWAY_PLACEHOLDER];
    if known.iter().any(|placeholder| level.contains(placeholder)) {
        return Problem::new(format!(
            "`{level}`: a placeholder must be a whole topic level, between slashes"
        ));
    }
    let problem = Problem::new(format!("`{level}` is not a known placeholder"));
    match did_you_mean(level, &known) {
        Some(close) => problem.hint(format!("did you mean `{close}`?")),
        None => problem.hint("the placeholders are `{device_id}` and `{gateway_id}`"),
    }
}

/// `mqtts://host[:port]`.
pub(super) fn endpoint(text: &str) -> Result<Endpoint, Problem> {
    let form = r#"write "mqtts://host:port", e.g. "mqtts://cloud.example.com:8883""#;
    let rest = match text.split_once("://") {
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("mqtts") => rest,
        Some((scheme, _)) => {
            return Err(Problem::new(format!(
                "`{scheme}://` is not allowed: the uplink always uses TLS"
            ))
            .hint("use mqtts://"));
        }
        None => return Err(Problem::new(format!("`{text}` has no mqtts:// scheme")).hint(form)),
    };
    if rest.contains(['/', '?', '#', '@']) {
        return Err(Problem::new("only a host and a port may follow mqtts://").hint(form));
    }
    let (host, port) = split_host_port(rest).map_err(|problem| problem.hint(form))?;
    Ok(Endpoint { host, port })
}

pub(super) fn split_host_port(text: &str) -> Result<(String, u16), Problem> {
    if let Some(bracketed) = text.strip_prefix('[') {
        let (ip, after) = bracketed
            .split_once(']')
            .ok_or_else(|| Problem::new("missing `]` after the IPv6 address"))?;
        ip.parse::<Ipv6Addr>()
            .map_err(|_| Problem::new(format!("`{ip}` is not an IPv6 address")))?;
        let port = match after {
            "" => DEFAULT_CLOUD_PORT,
            after => port(after.strip_prefix(':').unwrap_or(after))?,
        };
        return Ok((ip.to_owned(), port));
    }
    let (host, port) = match text.rsplit_once(':') {
        Some((host, digits)) => (host, port(digits)?),
        None => (text, DEFAULT_CLOUD_PORT),
    };
    if host.contains(':') {
        return Err(Problem::new(
            "an IPv6 address must be in brackets, e.g. [2001:db8::1]:8883",
        ));
    }
    check_host(host)?;
    Ok((host.to_owned(), port))
}

pub(super) fn port(digits: &str) -> Result<u16, Problem> {
    match digits.parse::<u16>() {
        Ok(port) if port != 0 => Ok(port),
        _ => Err(Problem::new(format!(
            "`{digits}` is not a port (1 to 65535)"
        ))),
    }
}

/// A DNS name or an IPv4 address.
pub(super) fn check_host(host: &str) -> Result<(), Problem> {
    let label_ok = |label: &str| {
        (1..=63).contains(&label.len())
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    let is_ipv4_like = host.bytes().all(|b| b.is_ascii_digit() || b == b'.');
    let valid = match is_ipv4_like {
        true => host.parse::<Ipv4Addr>().is_ok(),
        false => host.len() <= 253 && host.split('.').all(label_ok),
    };
    match valid {
        true => Ok(()),
        false => Err(Problem::new(format!(
            "`{host}` is not a valid host name or IP address"
        ))),
    }
}

/// An SPKI SHA-256 pin: `sha256//<base64>` (curl's form) or 64 hex digits.
pub(super) fn pin(text: &str) -> Result<[u8; 32], Problem> {
    crate::tls::parse_pin(text).map_err(|_| {
            Problem::new(format!("`{text}` is not a SHA-256 public key pin")).hint(
                r#"write "sha256//" and the base64 of the 32-byte digest (44 characters), or 64 hex digits"#,
            )
        })
}

pub(super) fn client_id(id: String) -> Result<String, Problem> {
    if id.len() > 256 || id.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(
            Problem::new("a client id is at most 256 characters without spaces")
                .hint(r#"leave it "" to use gateway.id"#),
        );
    }
    Ok(id)
}

pub(super) const LOG_LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];

/// A comma-separated `EnvFilter` directive list where every directive ends in a
/// level: `level` or `target=level`. (A bare target, which `EnvFilter` would accept,
/// is refused: it is far more often a misspelt level.)
pub(super) fn log_level(text: String) -> Result<String, Problem> {
    let form = r#"write a level (trace, debug, info, warn, error, off), optionally followed by target=level pairs, e.g. "info,blindgate::queue=debug""#;
    for directive in text.split(',') {
        let directive = directive.trim();
        if directive.is_empty() {
            return Err(Problem::new("a log directive is empty").hint(form));
        }
        let level = directive
            .rsplit_once('=')
            .map_or(directive, |(_, level)| level);
        if !LOG_LEVELS.contains(&level.to_ascii_lowercase().as_str()) {
            let problem = Problem::new(format!("`{level}` is not a log level"));
            return Err(match did_you_mean(level, &LOG_LEVELS) {
                Some(close) => problem.hint(format!("did you mean `{close}`?")),
                None => problem.hint(form),
            });
        }
    }
    Ok(text)
}
