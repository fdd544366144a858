//! The gateway config parser under hostile input, on the stable toolchain (cargo-fuzz
//! needs nightly): property tests with proptest, seeded so a failure can be replayed.
//!
//! What it proves: `blindgate::config::parse` never panics, whatever it is given
//! (arbitrary bytes, TOML-shaped soup, and `config/gateway.toml` with bytes flipped,
//! lines deleted, duplicated or swapped, values replaced by random strings and
//! numbers), and every input either parses or yields at least one error whose line
//! and column are inside the text, with no "internal error" diagnostics.
//! `config::load` of a file that is not UTF-8 fails without a panic.
//!
//! Every target prints how many inputs it tried, how many parsed, and how many
//! diagnostics came out. Cases per target: `BLINDGATE_FUZZ_CASES` (default 1500; set
//! it to e.g. 200000 for a soak run); seed: `BLINDGATE_FUZZ_SEED` (printed).

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use blindgate::config::{self, ConfigError};
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config, RngSeed, TestCaseError, TestRunner};

/// Where the parser believes the file is (only used in messages and path joins).
const CONFIG_PATH: &str = "/etc/blindgate/gateway.toml";

fn installed_config() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/gateway.toml");
    std::fs::read_to_string(&path).expect("config/gateway.toml is readable")
}

/// Cases per target: `BLINDGATE_FUZZ_CASES`, else `default`.
fn cases(default: u32) -> u32 {
    common::env_number("BLINDGATE_FUZZ_CASES").unwrap_or(default)
}

/// A runner with `cases` cases, a printed seed and no regression files in the tree.
fn runner(target: &str, cases: u32) -> TestRunner {
    let seed = common::seed_from_env("BLINDGATE_FUZZ_SEED");
    eprintln!("{target}: seed {seed} (replay with BLINDGATE_FUZZ_SEED={seed})");
    TestRunner::new(Config {
        cases,
        failure_persistence: None,
        rng_seed: RngSeed::Fixed(seed),
        // The parser is fast; shrinking a failure to a small input is worth the time.
        max_shrink_iters: 4096,
        ..Config::default()
    })
}

/// What a target saw.
#[derive(Default)]
struct Tally {
    tried: AtomicU64,
    parsed: AtomicU64,
    diagnostics: AtomicU64,
    most_diagnostics: AtomicU64,
}

impl Tally {
    fn print(&self, target: &str, started: Instant) {
        let tried = self.tried.load(Ordering::Relaxed);
        let parsed = self.parsed.load(Ordering::Relaxed);
        eprintln!(
            "{target}: {tried} inputs tried (shrinking included), {parsed} parsed, {} refused \
             with {} diagnostics (at most {} for one input), 0 panics, {:.1} s",
            tried - parsed,
            self.diagnostics.load(Ordering::Relaxed),
            self.most_diagnostics.load(Ordering::Relaxed),
            started.elapsed().as_secs_f64()
        );
    }
}

/// Parses `text` and checks the outcome: parsed, or at least one error, every
/// diagnostic inside the text, and the printed form one line per diagnostic.
fn check(text: &str, tally: &Tally) -> Result<(), TestCaseError> {
    tally.tried.fetch_add(1, Ordering::Relaxed);
    let error = match config::parse(text, Path::new(CONFIG_PATH)) {
        Ok(_) => {
            tally.parsed.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        Err(error) => error,
    };
    check_error(text, &error, CONFIG_PATH)?;
    let n = error.diagnostics.len() as u64;
    tally.diagnostics.fetch_add(n, Ordering::Relaxed);
    tally.most_diagnostics.fetch_max(n, Ordering::Relaxed);
    Ok(())
}

fn check_error(text: &str, error: &ConfigError, path: &str) -> Result<(), TestCaseError> {
    prop_assert!(
        !error.is_unreadable(),
        "parse of text reported it unreadable"
    );
    prop_assert!(error.errors() >= 1, "refused without an error: {error}");
    // `line_column` counts lines by '\n' and columns in characters; the position just
    // after the last character of a line (or of the file) is inside too.
    let lines: Vec<&str> = text.split('\n').collect();
    for d in &error.diagnostics {
        prop_assert!(
            d.line >= 1 && d.line <= lines.len(),
            "line {} outside 1..={} in {d}",
            d.line,
            lines.len()
        );
        let width = lines[d.line - 1].chars().count();
        prop_assert!(
            d.column >= 1 && d.column <= width + 1,
            "column {} outside 1..={} of line {} in {d}",
            d.column,
            width + 1,
            d.line
        );
        prop_assert!(!d.message.trim().is_empty(), "empty message at {d}");
        prop_assert!(
            !d.message.contains("internal error"),
            "internal error diagnostic: {d}"
        );
    }
    let printed = error.to_string();
    prop_assert_eq!(printed.lines().count(), error.diagnostics.len());
    for line in printed.lines() {
        prop_assert!(line.starts_with(path), "printed line {line:?}");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------
// Inputs

/// Pieces of TOML and of this config's vocabulary, so random soup reaches the
/// semantic checks and not only the tokenizer.
const TOKENS: &[&str] = &[
    "[",
    "]",
    "[[",
    "]]",
    "=",
    " = ",
    "\"",
    "'",
    "'''",
    "\"\"\"",
    "\n",
    "\r\n",
    "\r",
    "#",
    " ",
    "\t",
    ",",
    "{",
    "}",
    ".",
    "\\",
    "\\u0000",
    "\\U0010FFFF",
    "\\x",
    "é",
    "😀",
    "\u{feff}",
    "\u{0}",
    "gateway",
    "devices",
    "envelope",
    "queue",
    "cloud",
    "metrics",
    "log",
    "id",
    "data_dir",
    "threads",
    "listen",
    "ca",
    "cert",
    "key",
    "max_connections",
    "connect_timeout",
    "up_topic",
    "down_topic",
    "{device_id}",
    "{gateway_id}",
    "max_size",
    "max_bytes",
    "device_quota",
    "min_free_disk",
    "overflow",
    "endpoints",
    "pins",
    "keep_alive",
    "backoff_min",
    "backoff_max",
    "inflight",
    "drain_rate",
    "drain_inflight",
    "level",
    "format",
    "0",
    "1",
    "-1",
    "65535",
    "65536",
    "9223372036854775807",
    "9223372036854775808",
    "1e999",
    "-0.0",
    "nan",
    "inf",
    "0x7f",
    "0o7",
    "0b1",
    "1_000",
    "true",
    "false",
    "1979-05-27T07:32:00Z",
    "\"10s\"",
    "\"0ms\"",
    "\"18446744073709551615s\"",
    "\"256KiB\"",
    "\"99999999999999999999GiB\"",
    "\"1.5MiB\"",
    "\"-5s\"",
    "\"mqtts://h:1\"",
    "\"mqtts://[::1]:99999\"",
    "\"sha256//\"",
    "\"127.0.0.1:0\"",
    "\"[::]:8883\"",
    "\"e3/{device_id}/up\"",
    "\"refuse\"",
    "\"drop-oldest\"",
    "[]",
    "{}",
    "\"\"",
];

fn soup() -> impl Strategy<Value = String> {
    let token = prop_oneof![
        4 => prop::sample::select(TOKENS).prop_map(str::to_owned),
        1 => any::<char>().prop_map(String::from),
    ];
    prop::collection::vec(token, 0..300).prop_map(|tokens| tokens.concat())
}

/// Every section and key the gateway config knows.
const KEYS: &[(&str, &[&str])] = &[
    ("gateway", &["id", "data_dir", "threads"]),
    (
        "devices",
        &[
            "listen",
            "ca",
            "cert",
            "key",
            "plaintext_listen",
            "plaintext_allow_non_loopback",
            "max_connections",
            "max_inflight_per_device",
            "rate_limit_per_device",
            "rate_burst_per_device",
            "connect_timeout",
            "up_topic",
            "down_topic",
            "downlink_pending_per_device",
        ],
    ),
    ("envelope", &["max_size"]),
    (
        "queue",
        &[
            "max_bytes",
            "min_free_disk",
            "device_quota",
            "overflow",
            "cache_size",
            "max_batch",
        ],
    ),
    (
        "cloud",
        &[
            "endpoints",
            "ca",
            "cert",
            "key",
            "pins",
            "cipher_order",
            "client_id",
            "keep_alive",
            "inflight",
            "backoff_min",
            "backoff_max",
            "up_topic",
            "down_topic",
            "drain_rate",
            "drain_inflight",
            "ready_max_ack_age",
        ],
    ),
    ("metrics", &["listen"]),
    ("log", &["format", "level"]),
];

/// A well-formed TOML document of known sections and keys with random values, so the
/// semantic checks (ranges, units, topics, addresses, cross-key rules) get the input.
fn document() -> impl Strategy<Value = String> {
    let section = (
        0..KEYS.len(),
        prop::collection::vec((any::<Index>(), random_value()), 0..10),
    );
    prop::collection::vec(section, 0..9).prop_map(|sections| {
        let mut text = String::new();
        for (s, settings) in sections {
            let (name, keys) = KEYS[s];
            text.push_str(&format!("[{name}]\n"));
            for (k, value) in settings {
                text.push_str(&format!("{} = {value}\n", keys[k.index(keys.len())]));
            }
        }
        text
    })
}

/// A value put where a config value was.
fn random_value() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        any::<u64>().prop_map(|n| format!("\"{n}\"")),
        any::<f64>().prop_map(|f| format!("{f:?}")),
        (
            any::<u32>(),
            prop::sample::select(
                &[
                    "ms", "s", "m", "h", "d", "", "B", "KiB", "MiB", "GiB", "kB", "TB", "x"
                ][..]
            )
        )
            .prop_map(|(n, unit)| format!("\"{n}{unit}\"")),
        ".{0,40}".prop_map(|s| format!("{s:?}")),
        ".{0,40}",
        prop::collection::vec(".{0,12}", 0..4).prop_map(|v| format!("{v:?}")),
        Just(String::new()),
        Just("{ a = 1 }".to_owned()),
        Just("true".to_owned()),
    ]
}

/// One edit of the installed config.
#[derive(Debug, Clone)]
enum Mutation {
    FlipBit(Index, u8),
    SetByte(Index, u8),
    DeleteLine(Index),
    DuplicateLine(Index),
    SwapLines(Index, Index),
    ReplaceValue(Index, String),
    Insert(Index, String),
    Truncate(Index),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        3 => (any::<Index>(), 0u8..8).prop_map(|(i, b)| Mutation::FlipBit(i, b)),
        2 => (any::<Index>(), any::<u8>()).prop_map(|(i, b)| Mutation::SetByte(i, b)),
        3 => any::<Index>().prop_map(Mutation::DeleteLine),
        3 => any::<Index>().prop_map(Mutation::DuplicateLine),
        1 => (any::<Index>(), any::<Index>()).prop_map(|(a, b)| Mutation::SwapLines(a, b)),
        5 => (any::<Index>(), random_value()).prop_map(|(i, v)| Mutation::ReplaceValue(i, v)),
        1 => (any::<Index>(), soup()).prop_map(|(i, s)| Mutation::Insert(i, s)),
        1 => any::<Index>().prop_map(Mutation::Truncate),
    ]
}

/// Applies `mutations` in order; byte edits may break UTF-8, which is then repaired
/// the way a lossy reader would (U+FFFD), since `parse` takes text.
fn mutate(original: &str, mutations: &[Mutation]) -> String {
    let mut text = original.to_owned();
    for m in mutations {
        text = match m {
            Mutation::FlipBit(at, bit) | Mutation::SetByte(at, bit) => {
                let mut bytes = text.into_bytes();
                if !bytes.is_empty() {
                    let i = at.index(bytes.len());
                    bytes[i] = match m {
                        Mutation::FlipBit(..) => bytes[i] ^ (1 << bit),
                        _ => *bit,
                    };
                }
                String::from_utf8_lossy(&bytes).into_owned()
            }
            Mutation::DeleteLine(at) => edit_lines(&text, |lines| {
                let i = at.index(lines.len());
                lines.remove(i);
            }),
            Mutation::DuplicateLine(at) => edit_lines(&text, |lines| {
                let i = at.index(lines.len());
                lines.insert(i, lines[i].clone());
            }),
            Mutation::SwapLines(a, b) => edit_lines(&text, |lines| {
                let (a, b) = (a.index(lines.len()), b.index(lines.len()));
                lines.swap(a, b);
            }),
            Mutation::ReplaceValue(at, value) => edit_lines(&text, |lines| {
                let settings: Vec<usize> = (0..lines.len())
                    .filter(|&i| !lines[i].trim_start().starts_with('#') && lines[i].contains('='))
                    .collect();
                if !settings.is_empty() {
                    let i = settings[at.index(settings.len())];
                    let key = lines[i].split('=').next().unwrap_or_default().to_owned();
                    lines[i] = format!("{key}= {value}");
                }
            }),
            Mutation::Insert(at, piece) => {
                let mut i = at.index(text.len() + 1);
                while !text.is_char_boundary(i) {
                    i -= 1;
                }
                text.insert_str(i, piece);
                text
            }
            Mutation::Truncate(at) => {
                let mut i = at.index(text.len() + 1);
                while !text.is_char_boundary(i) {
                    i -= 1;
                }
                text.truncate(i);
                text
            }
        };
    }
    text
}

fn edit_lines(text: &str, edit: impl FnOnce(&mut Vec<String>)) -> String {
    let mut lines: Vec<String> = text.split('\n').map(str::to_owned).collect();
    edit(&mut lines);
    lines.join("\n")
}

// ---------------------------------------------------------------------------------
// Targets

#[test]
fn the_installed_config_parses_and_each_line_deleted_or_duplicated_is_handled() {
    let original = installed_config();
    config::parse(&original, Path::new(CONFIG_PATH)).expect("config/gateway.toml is valid");
    let started = Instant::now();
    let tally = Tally::default();
    let lines: Vec<&str> = original.split('\n').collect();
    for i in 0..lines.len() {
        let mut deleted = lines.clone();
        deleted.remove(i);
        let mut duplicated = lines.clone();
        duplicated.insert(i, lines[i]);
        for text in [deleted.join("\n"), duplicated.join("\n")] {
            if let Err(e) = check(&text, &tally) {
                panic!(
                    "line {} of config/gateway.toml: {e}\n--- input ---\n{text}",
                    i + 1
                );
            }
        }
    }
    tally.print(
        "config: every line deleted / duplicated (exhaustive)",
        started,
    );
    // Deleting a required key or duplicating any setting must be refused.
    assert!(tally.parsed.load(Ordering::Relaxed) < tally.tried.load(Ordering::Relaxed));
}

#[test]
fn arbitrary_bytes_never_panic_the_parser() {
    let tally = Tally::default();
    let started = Instant::now();
    let mut runner = runner("config: arbitrary bytes", cases(1500));
    let bytes = prop::collection::vec(any::<u8>(), 0..4096);
    runner
        .run(&bytes, |bytes| {
            check(&String::from_utf8_lossy(&bytes), &tally)
        })
        .unwrap_or_else(|e| panic!("{e}"));
    tally.print("config: arbitrary bytes", started);
}

#[test]
fn toml_shaped_soup_never_panics_the_parser() {
    let tally = Tally::default();
    let started = Instant::now();
    let mut runner = runner("config: TOML soup", cases(1500));
    runner
        .run(&soup(), |text| check(&text, &tally))
        .unwrap_or_else(|e| panic!("{e}"));
    tally.print("config: TOML soup", started);
}

#[test]
fn mutations_of_the_installed_config_parse_or_point_inside_the_text() {
    let original = installed_config();
    let tally = Tally::default();
    let started = Instant::now();
    let mut runner = runner("config: mutated gateway.toml", cases(1500));
    let mutations = prop::collection::vec(mutation(), 1..6);
    runner
        .run(&mutations, |mutations| {
            check(&mutate(&original, &mutations), &tally)
        })
        .unwrap_or_else(|e| panic!("{e}"));
    tally.print("config: mutated gateway.toml", started);
}

#[test]
fn documents_of_known_keys_with_random_values_parse_or_point_inside_the_text() {
    let tally = Tally::default();
    let started = Instant::now();
    let mut runner = runner("config: known keys, random values", cases(1500));
    runner
        .run(&document(), |text| check(&text, &tally))
        .unwrap_or_else(|e| panic!("{e}"));
    tally.print("config: known keys, random values", started);
}

#[test]
fn a_config_file_that_is_not_utf8_is_refused_without_a_panic() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path: PathBuf = dir.path().join("gateway.toml");
    let shown = path.display().to_string();
    let (tried, unreadable) = (AtomicU64::new(0), AtomicU64::new(0));
    let mut runner = runner("config: load() of non-UTF-8 files", cases(1500).min(300));
    let original = installed_config().into_bytes();
    let strategy = (any::<Index>(), prop::collection::vec(0x80u8..=0xff, 1..4));
    runner
        .run(&strategy, |(at, junk)| {
            tried.fetch_add(1, Ordering::Relaxed);
            let mut bytes = original.clone();
            let i = at.index(bytes.len() + 1);
            bytes.splice(i..i, junk);
            std::fs::write(&path, &bytes).expect("write");
            let result = config::load(&path);
            match std::str::from_utf8(&bytes) {
                // The junk happened to form characters: an ordinary parse.
                Ok(text) => {
                    if let Err(e) = result {
                        check_error(text, &e, &shown)?;
                    }
                }
                Err(_) => {
                    let Err(error) = result else {
                        return Err(TestCaseError::fail("a non-UTF-8 file loaded"));
                    };
                    prop_assert!(error.is_unreadable(), "{error}");
                    prop_assert!(!error.to_string().is_empty());
                    unreadable.fetch_add(1, Ordering::Relaxed);
                }
            }
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "config: load() of non-UTF-8 files: {} files tried, {} refused as unreadable \
         (not UTF-8), the rest formed valid text; 0 panics",
        tried.load(Ordering::Relaxed),
        unreadable.load(Ordering::Relaxed)
    );
}
