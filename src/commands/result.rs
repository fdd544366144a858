//! The command result a device sends back up (an ordinary E3 uplink, sealed with its
//! key): which command (by its downlink seq), whether it was executed or refused, and
//! why. The cloud ingest recognises it by its `command_result` field.
//!
//! ```json
//! {"device_id": "thermostat-1", "ts_ms": 1795000000000,
//!  "command_result": {"seq": 12, "cmd": "set_temp", "result": "refused",
//!                     "message": "refused: celsius out of range 10..35: 40"}}
//! ```

use serde::{Deserialize, Serialize};

/// What the device did with a command: the closed label set of the cloud's metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CommandOutcome {
    /// On the list and in range: done.
    Executed,
    /// Off the list, malformed or out of range: not done.
    Refused,
}

impl CommandOutcome {
    /// Every value.
    pub const ALL: [Self; 2] = [Self::Executed, Self::Refused];

    /// The label value, as in the JSON.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Executed => "executed",
            Self::Refused => "refused",
        }
    }
}

/// The `command_result` object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandResult {
    /// The command envelope's downlink seq.
    pub seq: u64,
    /// The command's `cmd` (quoted safely; empty if it had none).
    pub cmd: String,
    /// Executed or refused.
    pub result: CommandOutcome,
    /// `executed`, or `refused: <why>`.
    pub message: String,
}

#[derive(Serialize)]
struct Uplink<'a> {
    device_id: &'a str,
    ts_ms: u64,
    command_result: &'a CommandResult,
}

impl CommandResult {
    /// The uplink plaintext (JSON) for `device_id` at `ts_ms`.
    pub fn to_plaintext(&self, device_id: &str, ts_ms: u64) -> Vec<u8> {
        serde_json::to_vec(&Uplink {
            device_id,
            ts_ms,
            command_result: self,
        })
        // Serialising strings and integers into memory cannot fail; an empty
        // plaintext would be stored as opaque data, never lost silently.
        .unwrap_or_default()
    }

    /// The result inside a decoded JSON uplink, if it is one.
    pub fn from_uplink(json: &serde_json::Value) -> Option<Self> {
        serde_json::from_value(json.get("command_result")?.clone()).ok()
    }
}
