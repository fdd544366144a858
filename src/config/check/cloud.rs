//! The cloud ingest's config and command schemas: the loader's verdict at the key's
//! position, then the files, directories and listener the ingest needs.

use super::*;

/// Checks a cloud ingest config: its loader's verdict, then the files, directories
/// and listener its keys name.
pub(super) fn check_cloud_ingest(
    text: &str,
    document: &DeTable<'_>,
    path: &Path,
    ports: PortCheck,
) -> Vec<Diagnostic> {
    let base = path.parent().unwrap_or(Path::new(""));
    let mut positions = Positions::default();
    let mut values: Vec<(String, String)> = Vec::new();
    for (section, value) in document {
        let section_name = section.get_ref().to_string();
        let (line, column) = line_column(text, section.span().start);
        positions.insert(&section_name, line, column);
        let DeValue::Table(entries) = value.get_ref() else {
            continue;
        };
        for (key, value) in entries {
            let full = format!("{section_name}.{}", key.get_ref());
            let (line, column) = line_column(text, value.span().start);
            positions.insert(&full, line, column);
            if let DeValue::String(string) = value.get_ref() {
                values.push((full, string.to_string()));
            }
        }
    }
    let value = |key: &str| {
        values
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    };
    let at = |key: &str| value(key).map(|v| base.join(v));
    let mut env = Env::new(&positions);

    if let (Some(ca), Some(cert), Some(key)) =
        (at("broker.ca"), at("broker.cert"), at("broker.key"))
    {
        env.tls_files(&TlsFiles {
            ca: ("broker.ca", &ca),
            cert: ("broker.cert", &cert),
            key: ("broker.key", Some(&key)),
            side: Side::IngestClient,
        });
    }
    for key in ["broker.up_topic", "broker.down_topic"] {
        if let Some(template) = value(key)
            && let Err(err) = crate::topics::GatewayTemplate::new(template)
        {
            env.error(key, Problem::new(format!("invalid topic template: {err}")));
        }
    }
    let postgres = value("sink.postgres").is_some();
    let mut dirs = vec!["store.keys_dir", "sink.images_dir"];
    if !postgres {
        dirs.push("store.state_dir");
    }
    for key in dirs {
        if let Some(dir) = at(key) {
            env.state_dir(key, &dir);
        }
    }
    if let Some(keys_dir) = at("store.keys_dir") {
        env.secret_dir("store.keys_dir", &keys_dir);
    }
    if !postgres && let Some(jsonl) = at("sink.jsonl") {
        env.output_file("sink.jsonl", &jsonl);
    }
    if let Some(registry) = at("store.registry")
        && env.read("store.registry", &registry).is_some()
        && let Err(err) = crate::cloud::registry::Registry::load(&registry)
    {
        let problem = Problem::new(format!("{err}: {}", cause_chain(&err)));
        env.error("store.registry", problem);
    }
    if let Some(schema) = at("commands.schema")
        && let Some(bytes) = env.read("commands.schema", &schema)
    {
        env.command_schema("commands.schema", &schema, &bytes);
    }
    if ports == PortCheck::Bind
        && let Some(listen) = value("metrics.listen")
    {
        match listen.parse::<SocketAddr>() {
            Ok(addr) => env.listener("metrics.listen", addr),
            Err(_) => env.error(
                "metrics.listen",
                Problem::new(format!("`{listen}` is not an IP address and port"))
                    .hint(r#"write e.g. "127.0.0.1:9465""#),
            ),
        }
    }
    let found_errors = env.out.iter().any(Diagnostic::is_error);
    let mut diagnostics = env.out;
    if let Err(err) = crate::cloud::config::load(path)
        && let Some(diagnostic) = loader_diagnostic(&err, &positions, found_errors)
    {
        diagnostics.push(diagnostic);
    }
    diagnostics
}

impl Env<'_> {
    /// Each problem of the command schema `file` (read into `text`) as an error at
    /// `key`, quoting the schema's own `file:line:column`.
    pub(super) fn command_schema(&mut self, key: &str, file: &Path, bytes: &[u8]) {
        let Ok(text) = std::str::from_utf8(bytes) else {
            let problem = Problem::new(format!("{} is not UTF-8 text", file.display()));
            self.error(key, problem);
            return;
        };
        if let Err(problems) = crate::commands::Schema::parse(text) {
            for problem in problems {
                let message = format!("{}:{problem}", file.display());
                self.error(key, Problem::new(message).hint("docs/COMMANDS.md"));
            }
        }
    }

    /// The key store is a secret: nobody but its owner may enter it.
    pub(super) fn secret_dir(&mut self, key: &str, dir: &Path) {
        let Ok(meta) = fs::metadata(dir) else {
            return;
        };
        let mode = meta.mode() & 0o777;
        if meta.is_dir() && mode & 0o077 != 0 {
            let problem = Problem::new(format!(
                "{} holds device keys and is accessible by group or others (mode {mode:04o})",
                dir.display()
            ))
            .hint("chmod 0700 it");
            self.warning(key, problem);
        }
    }

    /// A file the program appends to: writable if it exists, else creatable.
    pub(super) fn output_file(&mut self, key: &str, file: &Path) {
        match fs::metadata(file) {
            Ok(meta) if meta.is_dir() => {
                let problem =
                    Problem::new(format!("{} is a directory", file.display())).hint("name a file");
                self.error(key, problem);
            }
            Ok(_) => {
                if let Err(err) = fs::OpenOptions::new().append(true).open(file) {
                    let problem = Problem::new(format!("cannot write {}: {err}", file.display()));
                    self.error(key, problem);
                }
            }
            Err(_) => {
                if let Some(parent) = file.parent() {
                    self.state_dir(key, parent);
                }
            }
        }
    }
}

/// A command schema file: top-level `types` or `device_types`, and no `gateway`.
pub(super) fn is_command_schema(text: &str) -> bool {
    DeTable::parse(text).is_ok_and(|document| {
        let has = |name: &str| {
            document
                .get_ref()
                .iter()
                .any(|(section, _)| section.get_ref() == name)
        };
        (has("types") || has("device_types")) && !has("gateway")
    })
}

/// Every problem of a command schema, at its own line and column.
pub(super) fn check_schema(text: &str) -> Vec<Diagnostic> {
    let Err(problems) = crate::commands::Schema::parse(text) else {
        return Vec::new();
    };
    problems
        .into_iter()
        .map(|problem| Diagnostic {
            line: problem.line,
            column: problem.column,
            key: problem.key,
            message: problem.message,
            hint: None,
            severity: Severity::Error,
            restarting_is_harmful: false,
        })
        .collect()
}

/// The cloud loader's own complaint, unless the checks above already explain it.
pub(super) fn loader_diagnostic(
    err: &crate::cloud::config::CloudConfigError,
    positions: &Positions,
    found_errors: bool,
) -> Option<Diagnostic> {
    use crate::cloud::config::CloudConfigError as E;
    let diagnostic = |key: &str, message: String, hint: Option<&str>| {
        let (line, column) = positions.of(key);
        Diagnostic {
            line,
            column,
            key: key.to_owned(),
            message,
            hint: hint.map(str::to_owned),
            severity: Severity::Error,
            restarting_is_harmful: false,
        }
    };
    match err {
        E::Parse { message, .. } => Some(toml_message(message)),
        E::Url { .. } => Some(diagnostic(
            "broker.url",
            "must look like mqtts://host:port".into(),
            Some(r#"e.g. "mqtts://cloud.example.com:8883""#),
        )),
        // Reported per template above.
        E::Topic { .. } => None,
        // The file checks above say which file and why; otherwise show rustls's word.
        E::Tls { source, .. } if !found_errors => Some(diagnostic(
            "broker.cert",
            format!("{source}: {}", cause_chain(source.as_ref())),
            None,
        )),
        E::Tls { .. } | E::Registry { .. } | E::Commands { .. } => None,
        other => Some(diagnostic(
            "",
            format!("{other}: {}", cause_chain(other)),
            None,
        )),
    }
}

/// A toml error's text (`TOML parse error at line L, column C`, a source excerpt,
/// then the message) as a diagnostic at that position.
pub(super) fn toml_message(text: &str) -> Diagnostic {
    let mut lines = text.lines();
    let position = lines
        .next()
        .and_then(|first| first.strip_prefix("TOML parse error at line "))
        .and_then(|rest| rest.split_once(", column "))
        .and_then(|(line, column)| Some((line.parse().ok()?, column.trim().parse().ok()?)));
    let message = match position {
        // Skip the excerpt: the lines up to the caret line.
        Some(_) => text
            .lines()
            .skip_while(|line| !line.contains('^'))
            .skip(1)
            .filter(|line| !line.trim().is_empty())
            .collect::<Vec<_>>()
            .join(" "),
        None => text.lines().collect::<Vec<_>>().join(" "),
    };
    let (line, column) = position.unwrap_or((1, 1));
    Diagnostic {
        line,
        column,
        key: String::new(),
        message,
        hint: None,
        severity: Severity::Error,
        restarting_is_harmful: false,
    }
}
