//! What a simulated device does with a command other than `rekey` when it has an
//! allowlist: check it with [`crate::commands::check_command`] (the rule firmware
//! mirrors) and say what became of it in a [`CommandResult`], which the device seals
//! and sends back up like any uplink. A refused command is never executed.

use crate::commands::{CommandOutcome, CommandResult, TypeCommands, check_command, quote};

/// Longest refusal message sent back, in characters: the result must fit in any
/// envelope limit, whatever the schema's enum lists hold.
const MESSAGE_LEN: usize = 256;

/// Checks the opened command `plaintext` (downlink `seq`) against `allowed`.
pub(super) fn decide(allowed: &TypeCommands, seq: u64, plaintext: &[u8]) -> CommandResult {
    let json: Option<serde_json::Value> = serde_json::from_slice(plaintext).ok();
    let cmd = json
        .as_ref()
        .and_then(|json| json.get("cmd"))
        .and_then(serde_json::Value::as_str)
        .map(quote)
        .unwrap_or_default();
    let checked = match &json {
        Some(json) => check_command(allowed, json).map(|_| ()),
        None => Err(crate::commands::Refusal::NotAnObject),
    };
    match checked {
        Ok(()) => CommandResult {
            seq,
            cmd,
            result: CommandOutcome::Executed,
            message: "executed".into(),
        },
        Err(refusal) => CommandResult {
            seq,
            cmd,
            result: CommandOutcome::Refused,
            message: format!("refused: {refusal}")
                .chars()
                .take(MESSAGE_LEN)
                .collect(),
        },
    }
}
