//! Command allowlists at both ends (docs/COMMANDS.md). The gateway cannot read
//! commands (they are sealed end to end), so the allowlist lives where commands are
//! sealed (`blindgate cloud send-command`) and where they are opened (the device).
//! Both ends use this module.
//!
//! - `schema`: the schema file the operator edits (device types, their commands,
//!   typed parameters with ranges), checked with line:column diagnostics.
//! - `validate`: [`check_command`], the rule both ends apply, small enough for
//!   firmware to mirror; [`Refusal`] says exactly what is wrong.
//! - `result`: the command result a device sends back up, and its closed outcome set.

mod result;
mod schema;
mod validate;

pub use result::{CommandOutcome, CommandResult};
pub use schema::{
    CommandSpec, ParamKind, ParamSpec, RESERVED_COMMAND, Schema, SchemaError, SchemaProblem,
    TypeCommands,
};
pub use validate::{Refusal, check_command, check_outgoing, quote, quote_up_to};

#[cfg(test)]
mod tests;
