//! The command schema file (TOML) the operator edits: which type each device is, and
//! per device type the commands allowed with their typed parameters.
//!
//! ```toml
//! [device_types]
//! thermostat-1 = "thermostat"
//!
//! [types.thermostat.set_temp]
//! celsius = { type = "number", min = 10, max = 35 }
//!
//! [types.thermostat.set_mode]
//! mode = { type = "enum", values = ["heat", "cool", "off"] }
//! boost = { type = "boolean", required = false }
//!
//! [types.thermostat.reboot]   # a command without parameters
//! ```
//!
//! Parameter types: `number` (any JSON number, optional inclusive `min`/`max`),
//! `integer` (a JSON integer, optional inclusive integer `min`/`max`), `boolean`, and
//! `enum` (a string, one of `values`). Every parameter is required unless it says
//! `required = false`. Every problem found is reported with its line and column.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use thiserror::Error;
use toml::Spanned;

/// The command that key rotation sends; never listed in a schema (it is checked by
/// its own rules on the device) and never sent by `cloud send-command`.
pub const RESERVED_COMMAND: &str = "rekey";

/// A checked command schema.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Schema {
    device_types: BTreeMap<String, String>,
    types: BTreeMap<String, TypeCommands>,
}

/// The commands allowed for one device type: what a device needs to check commands.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TypeCommands {
    /// The device type's name.
    pub device_type: String,
    /// Command name to its parameters.
    pub commands: BTreeMap<String, CommandSpec>,
}

/// One allowed command.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CommandSpec {
    /// Parameter name to its rule.
    pub params: BTreeMap<String, ParamSpec>,
}

/// One parameter's rule.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamSpec {
    /// Its type and range.
    pub kind: ParamKind,
    /// Must be present (the default).
    pub required: bool,
}

/// A parameter's type; ranges are inclusive.
#[derive(Debug, Clone, PartialEq)]
pub enum ParamKind {
    /// Any JSON number within `min..=max`.
    Number {
        /// Lowest allowed value.
        min: Option<f64>,
        /// Highest allowed value.
        max: Option<f64>,
    },
    /// A JSON integer within `min..=max`.
    Integer {
        /// Lowest allowed value.
        min: Option<i64>,
        /// Highest allowed value.
        max: Option<i64>,
    },
    /// `true` or `false`.
    Boolean,
    /// A string, one of these.
    Enum(Vec<String>),
}

impl ParamKind {
    /// The type's name as written in the schema.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Number { .. } => "number",
            Self::Integer { .. } => "integer",
            Self::Boolean => "boolean",
            Self::Enum(_) => "enum",
        }
    }

    /// `10..35`, `10..`, `..35`, or `None` without bounds (numbers and integers only).
    pub fn range_text(&self) -> Option<String> {
        let text = |min: Option<String>, max: Option<String>| {
            (min.is_some() || max.is_some())
                .then(|| format!("{}..{}", min.unwrap_or_default(), max.unwrap_or_default()))
        };
        match self {
            Self::Number { min, max } => {
                text(min.map(|v| v.to_string()), max.map(|v| v.to_string()))
            }
            Self::Integer { min, max } => {
                text(min.map(|v| v.to_string()), max.map(|v| v.to_string()))
            }
            Self::Boolean | Self::Enum(_) => None,
        }
    }
}

/// One problem in a schema file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchemaProblem {
    /// 1-based line.
    pub line: usize,
    /// 1-based column, in characters.
    pub column: usize,
    /// The dotted key it is about (`types.thermostat.set_temp.celsius`); empty for a
    /// syntax error.
    pub key: String,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for SchemaProblem {
    /// `line:column: key: message`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: ", self.line, self.column)?;
        if !self.key.is_empty() {
            write!(f, "{}: ", self.key)?;
        }
        f.write_str(&self.message)
    }
}

/// Why a schema file is unusable.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum SchemaError {
    /// The file could not be read.
    #[error("cannot read command schema {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file has mistakes; each is listed as `path:line:column: key: message`.
    #[error("invalid command schema: {}", list(path, problems))]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Every problem, in file order.
        problems: Vec<SchemaProblem>,
    },
}

fn list(path: &Path, problems: &[SchemaProblem]) -> String {
    let items: Vec<String> = problems
        .iter()
        .map(|p| format!("{}:{p}", path.display()))
        .collect();
    items.join("; ")
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    device_types: BTreeMap<String, Spanned<String>>,
    #[serde(default)]
    types: BTreeMap<String, BTreeMap<String, Spanned<ParamsEntry>>>,
}

/// One command's table: parameter name to its entry.
type ParamsEntry = BTreeMap<String, Spanned<ParamEntry>>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ParamEntry {
    #[serde(rename = "type")]
    kind: Spanned<String>,
    min: Option<Spanned<toml::Value>>,
    max: Option<Spanned<toml::Value>>,
    values: Option<Spanned<Vec<String>>>,
    required: Option<bool>,
}

impl Schema {
    /// Reads and checks a schema file.
    ///
    /// # Errors
    /// [`SchemaError`].
    pub fn load(path: &Path) -> Result<Self, SchemaError> {
        let text = std::fs::read_to_string(path).map_err(|source| SchemaError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text).map_err(|problems| SchemaError::Invalid {
            path: path.to_owned(),
            problems,
        })
    }

    /// Parses and checks schema text.
    ///
    /// # Errors
    /// Every problem found, in file order (a TOML syntax or shape error stops at the
    /// first one).
    pub fn parse(text: &str) -> Result<Self, Vec<SchemaProblem>> {
        let file: File = toml::from_str(text).map_err(|err| {
            let (line, column) = line_column(text, err.span().map_or(0, |s| s.start));
            vec![SchemaProblem {
                line,
                column,
                key: String::new(),
                message: err.message().trim().to_owned(),
            }]
        })?;
        let mut checker = Checker {
            text,
            problems: Vec::new(),
        };
        let mut schema = Self::default();
        for (type_name, commands) in file.types {
            let mut allowed = TypeCommands {
                device_type: type_name.clone(),
                commands: BTreeMap::new(),
            };
            for (command, params) in commands {
                let key = format!("types.{type_name}.{command}");
                if command == RESERVED_COMMAND {
                    checker.problem(
                        params.span().start,
                        &key,
                        format!("`{RESERVED_COMMAND}` is reserved: key rotation sends it, and the device checks it by its own rules"),
                    );
                    continue;
                }
                let mut spec = CommandSpec::default();
                for (name, entry) in params.into_inner() {
                    let key = format!("{key}.{name}");
                    if name == "cmd" {
                        let at = entry.span().start;
                        checker.problem(
                            at,
                            &key,
                            "`cmd` names the command; it cannot be a parameter".into(),
                        );
                        continue;
                    }
                    if let Some(param) = checker.param(&key, entry) {
                        spec.params.insert(name, param);
                    }
                }
                allowed.commands.insert(command, spec);
            }
            schema.types.insert(type_name, allowed);
        }
        for (device, device_type) in file.device_types {
            if !schema.types.contains_key(device_type.get_ref()) {
                checker.problem(
                    device_type.span().start,
                    &format!("device_types.{device}"),
                    format!(
                        "unknown device type `{}` (no [types.{}.<command>] table)",
                        device_type.get_ref(),
                        device_type.get_ref()
                    ),
                );
            }
            schema.device_types.insert(device, device_type.into_inner());
        }
        if checker.problems.is_empty() {
            Ok(schema)
        } else {
            checker
                .problems
                .sort_by_key(|p| (p.line, p.column, p.key.clone()));
            Err(checker.problems)
        }
    }

    /// The type of `device`, if the schema names one.
    pub fn device_type(&self, device: &str) -> Option<&str> {
        self.device_types.get(device).map(String::as_str)
    }

    /// The commands allowed for `device_type`.
    pub fn type_commands(&self, device_type: &str) -> Option<&TypeCommands> {
        self.types.get(device_type)
    }

    /// The commands allowed for `device`: its type's list, if it has a type.
    pub fn for_device(&self, device: &str) -> Option<&TypeCommands> {
        self.device_type(device)
            .and_then(|device_type| self.type_commands(device_type))
    }
}

struct Checker<'t> {
    text: &'t str,
    problems: Vec<SchemaProblem>,
}

impl Checker<'_> {
    fn problem(&mut self, offset: usize, key: &str, message: String) {
        let (line, column) = line_column(self.text, offset);
        self.problems.push(SchemaProblem {
            line,
            column,
            key: key.to_owned(),
            message,
        });
    }

    /// One parameter's entry, checked: a known type, the keys that type takes, a
    /// non-empty range, a non-empty enum without repeats.
    fn param(&mut self, key: &str, entry: Spanned<ParamEntry>) -> Option<ParamSpec> {
        let at = entry.span().start;
        let entry = entry.into_inner();
        let kind_name = entry.kind.get_ref().as_str();
        let before = self.problems.len();
        let kind = match kind_name {
            "number" => {
                let min = self.bound(key, "min", entry.min.as_ref());
                let max = self.bound(key, "max", entry.max.as_ref());
                ParamKind::Number { min, max }
            }
            "integer" => {
                let min = self.integer_bound(key, "min", entry.min.as_ref());
                let max = self.integer_bound(key, "max", entry.max.as_ref());
                ParamKind::Integer { min, max }
            }
            "boolean" | "enum" => {
                for (name, bound) in [("min", &entry.min), ("max", &entry.max)] {
                    if let Some(bound) = bound {
                        self.problem(
                            bound.span().start,
                            key,
                            format!("`{name}` does not apply to type `{kind_name}`"),
                        );
                    }
                }
                if kind_name == "boolean" {
                    ParamKind::Boolean
                } else {
                    ParamKind::Enum(self.values(key, at, entry.values.as_ref())?)
                }
            }
            other => {
                self.problem(
                    entry.kind.span().start,
                    key,
                    format!("unknown parameter type `{other}` (number, integer, boolean or enum)"),
                );
                return None;
            }
        };
        if kind_name != "enum"
            && let Some(values) = &entry.values
        {
            self.problem(
                values.span().start,
                key,
                format!("`values` applies to type `enum` only, not `{kind_name}`"),
            );
        }
        if let (Some(min), Some(max)) = (&entry.min, &entry.max)
            && let (Some(low), Some(high)) = (number(min.get_ref()), number(max.get_ref()))
            && low > high
        {
            self.problem(
                min.span().start,
                key,
                format!("empty range: min {low} is greater than max {high}"),
            );
        }
        (self.problems.len() == before).then(|| ParamSpec {
            kind,
            required: entry.required.unwrap_or(true),
        })
    }

    /// A `min` or `max` of a `number`: an integer or a finite float.
    fn bound(
        &mut self,
        key: &str,
        name: &str,
        value: Option<&Spanned<toml::Value>>,
    ) -> Option<f64> {
        let value = value?;
        let ok = number(value.get_ref()).filter(|v| v.is_finite());
        if ok.is_none() {
            self.problem(
                value.span().start,
                key,
                format!("`{name}` must be a finite number, not {}", value.get_ref()),
            );
        }
        ok
    }

    /// A `min` or `max` of an `integer`.
    fn integer_bound(
        &mut self,
        key: &str,
        name: &str,
        value: Option<&Spanned<toml::Value>>,
    ) -> Option<i64> {
        let value = value?;
        let toml::Value::Integer(ok) = value.get_ref() else {
            self.problem(
                value.span().start,
                key,
                format!("`{name}` must be an integer, not {}", value.get_ref()),
            );
            return None;
        };
        Some(*ok)
    }

    fn values(
        &mut self,
        key: &str,
        at: usize,
        values: Option<&Spanned<Vec<String>>>,
    ) -> Option<Vec<String>> {
        let Some(values) = values else {
            self.problem(
                at,
                key,
                "type `enum` needs `values = [\"...\", ...]`".into(),
            );
            return None;
        };
        let list = values.get_ref();
        if list.is_empty() {
            self.problem(values.span().start, key, "`values` is empty".into());
            return None;
        }
        for (i, value) in list.iter().enumerate() {
            if list[..i].contains(value) {
                self.problem(
                    values.span().start,
                    key,
                    format!("`values` lists `{value}` twice"),
                );
                return None;
            }
        }
        Some(list.clone())
    }
}

fn number(value: &toml::Value) -> Option<f64> {
    match value {
        toml::Value::Integer(v) => Some(*v as f64),
        toml::Value::Float(v) => Some(*v),
        _ => None,
    }
}

/// 1-based line and column (in characters) of byte `offset` in `text`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = text.get(..offset).unwrap_or_default();
    let line_start = before.rfind('\n').map_or(0, |newline| newline + 1);
    let line = before.matches('\n').count() + 1;
    let column = before.get(line_start..).unwrap_or_default().chars().count() + 1;
    (line, column)
}
