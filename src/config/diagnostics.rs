//! Config file errors that point at `file:line:column`, and the machinery that finds
//! every mistake in one run: a syntax error stops, but unknown keys, wrong types and
//! semantic problems are all collected so a technician fixes the file in one pass.
//!
//! The file's shape is checked by serde (`#[serde(deny_unknown_fields)]` on every
//! section). Serde stops at its first error, so [`deserialize_collecting`] reports that
//! error, removes the offending key from the parsed document and tries again until
//! the document deserializes.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::de::{self, DeserializeOwned, Visitor};
use toml::Spanned;
use toml::de::{DeTable, DeValue};

/// Everything wrong with a config file, or why it could not be read.
///
/// `Display` prints one line per diagnostic: `path:line:column: key: message (hint: ...)`
/// (`path:line:column: warning: key: ...` for a warning). An error from
/// [`load_checked`](super::load_checked) also carries the warnings, so one listing is
/// complete; [`ConfigError::errors`] counts only the errors.
#[derive(Debug)]
pub struct ConfigError {
    /// The config file, as given to [`load`](super::load) or [`parse`](super::parse).
    pub path: PathBuf,
    /// Every problem found, in file order. Empty only when the file could not be read.
    pub diagnostics: Vec<Diagnostic>,
    /// Why the file could not be read, if that is the problem (the `source()`).
    read: Option<io::Error>,
}

impl ConfigError {
    /// The file could not be read at all.
    pub(crate) fn unreadable(path: &Path, err: io::Error) -> Self {
        Self {
            path: path.to_owned(),
            diagnostics: Vec::new(),
            read: Some(err),
        }
    }

    /// Every diagnostic of a file that was read, sorted by position (an internal
    /// error is added if `diagnostics` holds no error, so the result is never a
    /// `ConfigError` without one).
    pub(crate) fn found(path: &Path, mut diagnostics: Vec<Diagnostic>) -> Self {
        if !diagnostics.iter().any(Diagnostic::is_error) {
            diagnostics.push(Diagnostic {
                line: 1,
                column: 1,
                key: String::new(),
                message: "internal error: rejected without an error".into(),
                hint: None,
                severity: Severity::Error,
                restarting_is_harmful: false,
            });
        }
        sort(&mut diagnostics);
        Self {
            path: path.to_owned(),
            diagnostics,
            read: None,
        }
    }

    /// True if the file could not be read (missing, no permission), as opposed to
    /// read and found wrong.
    pub fn is_unreadable(&self) -> bool {
        self.read.is_some()
    }

    /// True if an error must not be retried by restarting (a PIN the token refused).
    pub fn restarting_is_harmful(&self) -> bool {
        self.diagnostics
            .iter()
            .any(|d| d.is_error() && d.restarting_is_harmful)
    }

    /// How many of the diagnostics are errors (the rest are warnings).
    pub fn errors(&self) -> usize {
        self.diagnostics.iter().filter(|d| d.is_error()).count()
    }
}

/// File order; at one position, errors before warnings.
pub(crate) fn sort(diagnostics: &mut [Diagnostic]) {
    diagnostics.sort_by_key(|d| (d.line, d.column, d.severity));
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.read.is_some() {
            return write!(f, "cannot read config file {}", self.path.display());
        }
        for (index, diagnostic) in self.diagnostics.iter().enumerate() {
            if index > 0 {
                writeln!(f)?;
            }
            write!(f, "{}:{diagnostic}", self.path.display())?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.read.as_ref().map(|err| err as _)
    }
}

/// How bad a [`Diagnostic`] is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Severity {
    /// The gateway would not start (or would fail at once) with this: `check-config`
    /// exits 1 and a reload is refused.
    #[default]
    Error,
    /// Works today but deserves attention (a certificate expiring soon, a key file
    /// readable by a group, a disk too small for the configured queue).
    Warning,
}

/// One problem in the config file, or in what it points at (files, ports, disk).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// 1-based line.
    pub line: usize,
    /// 1-based column, in characters.
    pub column: usize,
    /// The dotted key, e.g. `queue.max_bytes`; a section name for a section; empty
    /// for a TOML syntax error.
    pub key: String,
    /// What is wrong.
    pub message: String,
    /// How to fix it, when there is something specific to say.
    pub hint: Option<String>,
    /// Error or warning. Everything the file parser reports is an error.
    pub severity: Severity,
    /// Restarting cannot fix this and every attempt uses up something that runs out
    /// (a wrong PKCS#11 PIN counts against the token's retry limit): the gateway exits
    /// with [`EXIT_DO_NOT_RESTART`](super::EXIT_DO_NOT_RESTART) so systemd does not try
    /// again.
    pub restarting_is_harmful: bool,
}

impl Diagnostic {
    /// True for an error, false for a warning.
    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }
}

impl fmt::Display for Diagnostic {
    /// `line:column: key: message (hint: ...)`, without the file name; a warning has
    /// `warning: ` before the key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: ", self.line, self.column)?;
        if self.severity == Severity::Warning {
            f.write_str("warning: ")?;
        }
        if !self.key.is_empty() {
            write!(f, "{}: ", self.key)?;
        }
        f.write_str(&self.message)?;
        if let Some(hint) = &self.hint {
            write!(f, " (hint: {hint})")?;
        }
        Ok(())
    }
}

/// A message and an optional hint, not yet placed in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Problem {
    pub(crate) message: String,
    pub(crate) hint: Option<String>,
    pub(crate) restarting_is_harmful: bool,
}

impl Problem {
    pub(crate) fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            hint: None,
            restarting_is_harmful: false,
        }
    }

    pub(crate) fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    /// Marks a problem a restart cannot fix and each attempt costs (see
    /// [`Diagnostic::restarting_is_harmful`]).
    pub(crate) fn harmful_to_retry(mut self) -> Self {
        self.restarting_is_harmful = true;
        self
    }
}

/// Collects diagnostics while the file is checked.
pub(crate) struct Reporter<'t> {
    text: &'t str,
    diagnostics: Vec<Diagnostic>,
    /// Keys already reported: later checks skip them (no "missing key" after "bad
    /// value"), so one mistake gives one diagnostic.
    reported: BTreeSet<String>,
    /// Byte offset of every key present in the file (and of each section header), so
    /// checks across keys can point at the right line.
    locations: BTreeMap<String, usize>,
}

impl<'t> Reporter<'t> {
    pub(crate) fn new(text: &'t str) -> Self {
        Self {
            text,
            diagnostics: Vec::new(),
            reported: BTreeSet::new(),
            locations: BTreeMap::new(),
        }
    }

    /// Records `problem` with `key` at byte `offset` of the file.
    pub(crate) fn report(&mut self, offset: usize, key: &str, problem: Problem) {
        let (line, column) = line_column(self.text, offset);
        self.reported.insert(key.to_owned());
        self.diagnostics.push(Diagnostic {
            line,
            column,
            key: key.to_owned(),
            message: problem.message,
            hint: problem.hint,
            severity: Severity::Error,
            restarting_is_harmful: false,
        });
    }

    pub(crate) fn is_reported(&self, key: &str) -> bool {
        self.reported.contains(key)
    }

    /// Remembers where `key` starts in the file.
    pub(crate) fn locate(&mut self, key: &str, offset: usize) {
        self.locations.insert(key.to_owned(), offset);
    }

    /// Where `key` starts, or else where `fallback` (its section) starts, or else 0.
    pub(crate) fn location(&self, key: &str, fallback: &str) -> usize {
        self.locations
            .get(key)
            .or_else(|| self.locations.get(fallback))
            .copied()
            .unwrap_or(0)
    }

    /// `value` if nothing was reported, else every diagnostic in file order.
    pub(crate) fn finish<T>(mut self, path: &Path, value: Option<T>) -> Result<T, ConfigError> {
        if let (true, Some(value)) = (self.diagnostics.is_empty(), value) {
            return Ok(value);
        }
        if self.diagnostics.is_empty() {
            // A check returned nothing without saying why: a bug, but report it
            // rather than panic in a daemon.
            self.report(
                0,
                "",
                Problem::new("internal error: the configuration is incomplete"),
            );
        }
        Err(ConfigError::found(path, self.diagnostics))
    }

    /// The position of every key located so far (see [`Reporter::locate`]) and the
    /// keys already reported, for checks that run after parsing.
    pub(crate) fn positions(&self) -> Positions {
        Positions {
            at: self
                .locations
                .iter()
                .map(|(key, offset)| (key.clone(), line_column(self.text, *offset)))
                .collect(),
            reported: self.reported.clone(),
        }
    }
}

/// Where each key of a parsed file is (`line`, `column`), and which keys the parser
/// already reported: checks after parsing place their diagnostics with it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Positions {
    at: BTreeMap<String, (usize, usize)>,
    reported: BTreeSet<String>,
}

impl Positions {
    /// Where `key` is; else its section's header (the part before the first `.`);
    /// else line 1, column 1 (a key left at its default in a file without the section).
    pub(crate) fn of(&self, key: &str) -> (usize, usize) {
        let section = key.split(['.', '[']).next().unwrap_or(key);
        self.at
            .get(key)
            .or_else(|| self.at.get(section))
            .copied()
            .unwrap_or((1, 1))
    }

    /// Records `key` at `line`, `column` (for files read without a [`Reporter`]).
    pub(crate) fn insert(&mut self, key: &str, line: usize, column: usize) {
        self.at.insert(key.to_owned(), (line, column));
    }

    /// True if the parser already reported a problem with `key`.
    pub(crate) fn is_reported(&self, key: &str) -> bool {
        self.reported.contains(key)
    }
}

/// 1-based line and column (in characters) of byte `offset` in `text`.
pub(crate) fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line_start = before.rfind('\n').map_or(0, |newline| newline + 1);
    let line = before.matches('\n').count() + 1;
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

/// The closest of `candidates` to `word`, if it is close enough to be a likely typo.
pub(crate) fn did_you_mean<'c>(word: &str, candidates: &[&'c str]) -> Option<&'c str> {
    let word = word.to_ascii_lowercase();
    let limit = (word.chars().count() / 3).clamp(1, 3);
    candidates
        .iter()
        .map(|candidate| (strsim::damerau_levenshtein(&word, candidate), *candidate))
        .filter(|(distance, _)| *distance <= limit)
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, candidate)| candidate)
}

/// The field names serde's derive gives a struct (with `deny_unknown_fields`, exactly
/// the keys it accepts), so suggestions cannot drift from the schema.
pub(crate) fn field_names<T: DeserializeOwned>() -> &'static [&'static str] {
    let mut fields: &'static [&'static str] = &[];
    // The introspector always fails after recording the names; the error is expected.
    let _ = T::deserialize(FieldNames { out: &mut fields });
    fields
}

/// A deserializer that only records the field list `deserialize_struct` receives.
struct FieldNames<'a> {
    out: &'a mut &'static [&'static str],
}

impl<'de> de::Deserializer<'de> for FieldNames<'_> {
    type Error = de::value::Error;

    fn deserialize_any<V: Visitor<'de>>(self, _visitor: V) -> Result<V::Value, Self::Error> {
        Err(de::Error::custom("not a struct"))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        _visitor: V,
    ) -> Result<V::Value, Self::Error> {
        *self.out = fields;
        Err(de::Error::custom("field names recorded"))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
        byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct map enum
        identifier ignored_any
    }
}

/// The accepted keys of a section (`""` for the top level: the section names).
pub(crate) type KeysOf = fn(&str) -> &'static [&'static str];

/// Parses `text` as TOML and deserializes it into `T`, reporting every unknown key and
/// every value of the wrong type. Returns `None` on a syntax error (reported) or if an
/// error could not be tied to a key.
pub(crate) fn deserialize_collecting<T: DeserializeOwned>(
    reporter: &mut Reporter<'_>,
    keys_of: KeysOf,
) -> Option<T> {
    let mut document = match DeTable::parse(reporter.text) {
        Ok(document) => document,
        Err(err) => {
            let offset = err.span().map_or(0, |span| span.start);
            reporter.report(offset, "", Problem::new(err.message()));
            return None;
        }
    };
    // Each failed round removes one key, so this ends; the bound is a guard.
    for _ in 0..=count_keys(document.get_ref()) {
        let err = match T::deserialize(toml::de::Deserializer::from(document.clone())) {
            Ok(value) => return Some(value),
            Err(err) => err,
        };
        let offender = err
            .span()
            .and_then(|span| find_offender(document.get_ref(), &span));
        let Some(offender) = offender else {
            let offset = err.span().map_or(0, |span| span.start);
            reporter.report(offset, "", Problem::new(err.message()));
            return None;
        };
        offender.report(&err, keys_of, reporter);
        offender.remove_from(document.get_mut());
    }
    None
}

fn count_keys(document: &DeTable<'_>) -> usize {
    document
        .values()
        .map(|value| match value.get_ref() {
            DeValue::Table(section) => section.len() + 1,
            _ => 1,
        })
        .sum()
}

/// The key a serde error is about, found by the error's span.
#[derive(Debug)]
struct Offender {
    section: String,
    /// `None`: the error is about the section (top-level key) itself.
    key: Option<String>,
    /// True if the span is the key's name (an unknown key), false if its value.
    at_name: bool,
    /// True if the offending value is a table.
    is_table: bool,
    name_offset: usize,
}

fn find_offender(document: &DeTable<'_>, span: &Range<usize>) -> Option<Offender> {
    let within = |outer: Range<usize>| outer.start <= span.start && span.end <= outer.end;
    for (section, value) in document {
        if let DeValue::Table(entries) = value.get_ref() {
            for (key, value) in entries {
                let (at_name, in_value) = (within(key.span()), within(value.span()));
                if at_name || in_value {
                    return Some(Offender {
                        section: section.get_ref().to_string(),
                        key: Some(key.get_ref().to_string()),
                        at_name,
                        is_table: matches!(value.get_ref(), DeValue::Table(_)),
                        name_offset: key.span().start,
                    });
                }
            }
        }
        let (at_name, in_value) = (within(section.span()), within(value.span()));
        if at_name || in_value {
            return Some(Offender {
                section: section.get_ref().to_string(),
                key: None,
                at_name,
                is_table: matches!(value.get_ref(), DeValue::Table(_)),
                name_offset: section.span().start,
            });
        }
    }
    None
}

impl Offender {
    fn report(&self, err: &toml::de::Error, keys_of: KeysOf, reporter: &mut Reporter<'_>) {
        let path = match &self.key {
            Some(key) => format!("{}.{key}", self.section),
            None => self.section.clone(),
        };
        let problem = match (&self.key, self.at_name) {
            (Some(key), true) => unknown_key(key, self.is_table, keys_of(&self.section)),
            (None, true) => unknown_section(&self.section, self.is_table, keys_of),
            (None, false) => {
                Problem::new(format!("`{}` must be a section", self.section)).hint(format!(
                    "write a [{}] header and put its keys below it",
                    self.section
                ))
            }
            (Some(_), false) => Problem::new(err.message()),
        };
        let offset = match self.at_name {
            true => self.name_offset,
            false => err.span().map_or(self.name_offset, |span| span.start),
        };
        reporter.report(offset, &path, problem);
    }

    fn remove_from(&self, document: &mut DeTable<'_>) {
        match &self.key {
            Some(key) => {
                if let Some(DeValue::Table(entries)) = document
                    .get_mut(self.section.as_str())
                    .map(Spanned::get_mut)
                {
                    entries.remove(key.as_str());
                }
            }
            None => {
                document.remove(self.section.as_str());
            }
        }
    }
}

fn unknown_key(key: &str, is_table: bool, accepted: &[&str]) -> Problem {
    let what = if is_table {
        "unknown section"
    } else {
        "unknown key"
    };
    let problem = Problem::new(what);
    match did_you_mean(key, accepted) {
        Some(close) => problem.hint(format!("did you mean `{close}`?")),
        None => problem.hint(format!("the keys here are: {}", accepted.join(", "))),
    }
}

fn unknown_section(name: &str, is_table: bool, keys_of: KeysOf) -> Problem {
    let sections = keys_of("");
    if is_table {
        let problem = Problem::new("unknown section");
        return match did_you_mean(name, sections) {
            Some(close) => problem.hint(format!("did you mean [{close}]?")),
            None => problem.hint(format!("the sections are: {}", sections.join(", "))),
        };
    }
    let problem = Problem::new("key outside any section");
    let home = sections
        .iter()
        .find(|section| keys_of(section).contains(&name));
    match home {
        Some(section) => problem.hint(format!("put it under the [{section}] header")),
        None => problem.hint(format!("keys belong in a section: {}", sections.join(", "))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_and_column_count_characters_from_one() {
        let text = "a = 1\n[é]\nb = 2";
        assert_eq!(line_column(text, 0), (1, 1));
        assert_eq!(line_column(text, 4), (1, 5));
        assert_eq!(line_column(text, 6), (2, 1));
        assert_eq!(line_column(text, text.find(']').unwrap_or(0)), (2, 3));
        assert_eq!(line_column(text, text.len()), (3, 6));
        assert_eq!(line_column(text, 999), (3, 6));
    }

    #[test]
    fn suggestions_only_come_for_close_words() {
        let keys = ["max_bytes", "min_free_disk", "device_quota"];
        assert_eq!(did_you_mean("max_byte", &keys), Some("max_bytes"));
        assert_eq!(did_you_mean("MAX_BYTES", &keys), Some("max_bytes"));
        assert_eq!(did_you_mean("device_qouta", &keys), Some("device_quota"));
        assert_eq!(did_you_mean("colour", &keys), None);
    }

    #[test]
    fn field_names_are_read_from_the_serde_derive() {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code, reason = "only its field names are read")]
        struct Sample {
            alpha: u8,
            #[serde(rename = "beta-two")]
            beta: u8,
        }
        assert_eq!(field_names::<Sample>(), ["alpha", "beta-two"]);
    }

    #[test]
    fn diagnostics_display_with_and_without_key_and_hint() {
        let diagnostic = Diagnostic {
            line: 3,
            column: 7,
            key: "queue.max_byte".into(),
            message: "unknown key".into(),
            hint: Some("did you mean `max_bytes`?".into()),
            severity: Severity::Error,
            restarting_is_harmful: false,
        };
        assert_eq!(
            diagnostic.to_string(),
            "3:7: queue.max_byte: unknown key (hint: did you mean `max_bytes`?)"
        );
        let syntax = Diagnostic {
            key: String::new(),
            hint: None,
            message: "unclosed array".into(),
            ..diagnostic
        };
        assert_eq!(syntax.to_string(), "3:7: unclosed array");
        let warning = Diagnostic {
            key: "devices.cert".into(),
            message: "expires in 12 days".into(),
            severity: Severity::Warning,
            ..syntax
        };
        assert_eq!(
            warning.to_string(),
            "3:7: warning: devices.cert: expires in 12 days"
        );
    }
}
