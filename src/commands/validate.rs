//! Checking one command against its device type's allowlist: the cloud before it
//! seals, the device after it opens. [`check_command`] is the whole rule, small and
//! pure so that device firmware can mirror it line by line.

use std::fmt;

use serde_json::{Map, Value};

use super::schema::{CommandSpec, ParamKind, ParamSpec, RESERVED_COMMAND, TypeCommands};

/// Longest command name, parameter name or value quoted in a refusal, in characters.
const QUOTE_LEN: usize = 64;

/// Why a command is refused. `Display` says exactly what is wrong, e.g.
/// "unknown command `reboot` for device type `thermostat`" or
/// "celsius out of range 10..35: 40".
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Refusal {
    /// The plaintext is not a JSON object.
    NotAnObject,
    /// No `cmd` string.
    NoCmd,
    /// `rekey` goes through key rotation, never as an ordinary command.
    Reserved,
    /// The command is not on the type's list.
    UnknownCommand {
        /// The command (quoted safely).
        cmd: String,
        /// The device type.
        device_type: String,
    },
    /// A field the command does not take.
    UnknownParameter {
        /// The command.
        cmd: String,
        /// The parameter (quoted safely).
        param: String,
    },
    /// A required parameter is absent.
    MissingParameter {
        /// The command.
        cmd: String,
        /// The parameter.
        param: String,
    },
    /// A parameter of the wrong JSON type.
    WrongType {
        /// The parameter.
        param: String,
        /// The type the schema wants.
        expected: &'static str,
        /// The value (quoted safely).
        value: String,
    },
    /// A number outside its inclusive range.
    OutOfRange {
        /// The parameter.
        param: String,
        /// `10..35`.
        range: String,
        /// The value.
        value: String,
    },
    /// A string not among the enum's values.
    NotAllowedValue {
        /// The parameter.
        param: String,
        /// The allowed values.
        values: Vec<String>,
        /// The value (quoted safely).
        value: String,
    },
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotAnObject => f.write_str("the command is not a JSON object"),
            Self::NoCmd => f.write_str("the command has no \"cmd\" string"),
            Self::Reserved => write!(
                f,
                "`{RESERVED_COMMAND}` is sent by key rotation only (blindgate keys rotate)"
            ),
            Self::UnknownCommand { cmd, device_type } => {
                write!(f, "unknown command `{cmd}` for device type `{device_type}`")
            }
            Self::UnknownParameter { cmd, param } => {
                write!(f, "unknown parameter `{param}` for command `{cmd}`")
            }
            Self::MissingParameter { cmd, param } => {
                write!(f, "missing parameter `{param}` for command `{cmd}`")
            }
            Self::WrongType {
                param,
                expected,
                value,
            } => write!(f, "{param} must be {expected}: {value}"),
            Self::OutOfRange {
                param,
                range,
                value,
            } => write!(f, "{param} out of range {range}: {value}"),
            Self::NotAllowedValue {
                param,
                values,
                value,
            } => write!(f, "{param} must be one of {}: {value}", values.join(", ")),
        }
    }
}

impl std::error::Error for Refusal {}

/// Checks one command (the JSON plaintext, parsed) against the commands allowed for
/// the device's type. Returns the command's name if it is allowed.
///
/// The rule, for firmware to mirror:
///
/// 1. The command is a JSON object with a string `cmd`; `cmd` is on the list.
/// 2. Every other field is a parameter of that command (no unknown fields).
/// 3. Every required parameter is present.
/// 4. Each parameter has its type: `number` any JSON number, `integer` a JSON integer
///    (`22.0` is not one), `boolean` true/false, `enum` one of its strings; numbers
///    and integers lie within their inclusive `min..max`.
///
/// `rekey` is not handled here: the device treats it by its own rules, and the cloud
/// never sends it as an ordinary command ([`Refusal::Reserved`] from
/// [`check_outgoing`]).
///
/// # Errors
/// The first rule broken, as a [`Refusal`]; never panics, whatever the input.
pub fn check_command<'c>(allowed: &TypeCommands, command: &'c Value) -> Result<&'c str, Refusal> {
    let object = command.as_object().ok_or(Refusal::NotAnObject)?;
    let cmd = object
        .get("cmd")
        .and_then(Value::as_str)
        .ok_or(Refusal::NoCmd)?;
    let spec = allowed
        .commands
        .get(cmd)
        .ok_or_else(|| Refusal::UnknownCommand {
            cmd: quote(cmd),
            device_type: allowed.device_type.clone(),
        })?;
    check_params(cmd, spec, object)?;
    Ok(cmd)
}

/// What the cloud checks before it seals: [`check_command`], and `rekey` refused.
///
/// # Errors
/// [`Refusal`].
pub fn check_outgoing<'c>(allowed: &TypeCommands, command: &'c Value) -> Result<&'c str, Refusal> {
    if command.get("cmd").and_then(Value::as_str) == Some(RESERVED_COMMAND) {
        return Err(Refusal::Reserved);
    }
    check_command(allowed, command)
}

fn check_params(cmd: &str, spec: &CommandSpec, object: &Map<String, Value>) -> Result<(), Refusal> {
    if let Some(unknown) = object
        .keys()
        .find(|name| *name != "cmd" && !spec.params.contains_key(*name))
    {
        return Err(Refusal::UnknownParameter {
            cmd: cmd.to_owned(),
            param: quote(unknown),
        });
    }
    for (name, param) in &spec.params {
        match object.get(name) {
            Some(value) => check_value(name, param, value)?,
            None if param.required => {
                return Err(Refusal::MissingParameter {
                    cmd: cmd.to_owned(),
                    param: name.clone(),
                });
            }
            None => {}
        }
    }
    Ok(())
}

fn check_value(name: &str, param: &ParamSpec, value: &Value) -> Result<(), Refusal> {
    let wrong = |expected| Refusal::WrongType {
        param: name.to_owned(),
        expected,
        value: quote(&value.to_string()),
    };
    let out_of_range = || Refusal::OutOfRange {
        param: name.to_owned(),
        range: param.kind.range_text().unwrap_or_default(),
        value: quote(&value.to_string()),
    };
    match &param.kind {
        ParamKind::Number { min, max } => {
            let v = value.as_f64().ok_or_else(|| wrong("a number"))?;
            if min.is_some_and(|min| v < min) || max.is_some_and(|max| v > max) {
                return Err(out_of_range());
            }
        }
        ParamKind::Integer { min, max } => {
            if !(value.is_i64() || value.is_u64()) {
                return Err(wrong("an integer"));
            }
            // Beyond i64 is beyond any i64 bound; without bounds it is an integer.
            let Some(v) = value.as_i64() else {
                return match max {
                    Some(_) => Err(out_of_range()),
                    None => Ok(()),
                };
            };
            if min.is_some_and(|min| v < min) || max.is_some_and(|max| v > max) {
                return Err(out_of_range());
            }
        }
        ParamKind::Boolean => {
            value.as_bool().ok_or_else(|| wrong("true or false"))?;
        }
        ParamKind::Enum(values) => {
            let v = value.as_str().ok_or_else(|| wrong("a string"))?;
            if !values.iter().any(|allowed| allowed == v) {
                return Err(Refusal::NotAllowedValue {
                    param: name.to_owned(),
                    values: values.clone(),
                    value: quote(v),
                });
            }
        }
    }
    Ok(())
}

/// A name or value safe to quote in a message and a log: at most [`QUOTE_LEN`]
/// characters, non-printable ones replaced by `?`.
pub fn quote(text: &str) -> String {
    quote_up_to(text, QUOTE_LEN)
}

/// As [`quote`], at most `len` characters (then `…`).
pub fn quote_up_to(text: &str, len: usize) -> String {
    let mut out: String = text
        .chars()
        .take(len)
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .collect();
    if text.chars().count() > len {
        out.push('…');
    }
    out
}
