//! Unit tests of the schema parser and the command check.

use serde_json::json;

use super::*;

const SCHEMA: &str = r#"
[device_types]
thermostat-1 = "thermostat"

[types.thermostat.set_temp]
celsius = { type = "number", min = 10, max = 35 }

[types.thermostat.set_mode]
mode = { type = "enum", values = ["heat", "cool", "off"] }
boost = { type = "boolean", required = false }

[types.thermostat.set_fan]
rpm = { type = "integer", min = 0, max = 3000 }

[types.thermostat.reboot]
"#;

fn thermostat() -> TypeCommands {
    let schema = Schema::parse(SCHEMA).expect("valid schema");
    schema
        .for_device("thermostat-1")
        .expect("thermostat-1 has a type")
        .clone()
}

fn refusal(command: serde_json::Value) -> String {
    check_command(&thermostat(), &command)
        .expect_err("refused")
        .to_string()
}

fn problems(text: &str) -> Vec<String> {
    Schema::parse(text)
        .expect_err("invalid schema")
        .iter()
        .map(ToString::to_string)
        .collect()
}

#[test]
fn allowed_commands_in_range_pass() {
    let allowed = thermostat();
    for command in [
        json!({"cmd": "set_temp", "celsius": 10}),
        json!({"cmd": "set_temp", "celsius": 35}),
        json!({"cmd": "set_temp", "celsius": 21.5}),
        json!({"cmd": "set_mode", "mode": "cool"}),
        json!({"cmd": "set_mode", "mode": "heat", "boost": true}),
        json!({"cmd": "set_fan", "rpm": 3000}),
        json!({"cmd": "reboot"}),
    ] {
        assert!(check_command(&allowed, &command).is_ok(), "{command}");
    }
}

#[test]
fn each_broken_rule_is_named() {
    assert_eq!(
        refusal(json!({"cmd": "reboot_all"})),
        "unknown command `reboot_all` for device type `thermostat`"
    );
    assert_eq!(
        refusal(json!({"cmd": "set_temp", "celsius": 40})),
        "celsius out of range 10..35: 40"
    );
    assert_eq!(
        refusal(json!({"cmd": "set_temp", "celsius": 9.99})),
        "celsius out of range 10..35: 9.99"
    );
    assert_eq!(
        refusal(json!({"cmd": "set_temp", "celsius": "22"})),
        "celsius must be a number: \"22\""
    );
    assert_eq!(
        refusal(json!({"cmd": "set_temp"})),
        "missing parameter `celsius` for command `set_temp`"
    );
    assert_eq!(
        refusal(json!({"cmd": "set_temp", "celsius": 20, "force": true})),
        "unknown parameter `force` for command `set_temp`"
    );
    assert_eq!(
        refusal(json!({"cmd": "set_fan", "rpm": 12.0})),
        "rpm must be an integer: 12.0"
    );
    assert_eq!(
        refusal(json!({"cmd": "set_fan", "rpm": -1})),
        "rpm out of range 0..3000: -1"
    );
    assert_eq!(
        refusal(json!({"cmd": "set_fan", "rpm": u64::MAX})),
        format!("rpm out of range 0..3000: {}", u64::MAX)
    );
    assert_eq!(
        refusal(json!({"cmd": "set_mode", "mode": "dry"})),
        "mode must be one of heat, cool, off: dry"
    );
    assert_eq!(
        refusal(json!({"cmd": "set_mode", "mode": "off", "boost": 1})),
        "boost must be true or false: 1"
    );
    assert_eq!(refusal(json!(["cmd"])), "the command is not a JSON object");
    assert_eq!(
        refusal(json!({"cmd": 7})),
        "the command has no \"cmd\" string"
    );
}

#[test]
fn the_cloud_never_sends_rekey_and_quotes_are_bounded() {
    let allowed = thermostat();
    let rekey = json!({"cmd": "rekey", "key_id": 2});
    assert_eq!(check_outgoing(&allowed, &rekey), Err(Refusal::Reserved));
    let long = "x\u{7}".repeat(100);
    let message = check_command(&allowed, &json!({ "cmd": long }))
        .expect_err("refused")
        .to_string();
    assert!(message.len() < 120, "{message}");
    assert!(!message.contains('\u{7}'));
}

#[test]
fn schema_problems_have_line_and_column() {
    let text = "\
[types.t.a]
x = { type = \"number\", min = 35, max = 10 }
y = { type = \"float\" }
z = { type = \"integer\", min = 1.5 }
w = { type = \"enum\", values = [] }
v = { type = \"boolean\", min = 1 }
u = { type = \"enum\", values = [\"a\", \"a\"] }
s = { type = \"number\", values = [\"a\"] }
cmd = { type = \"boolean\" }

[types.t.rekey]
[device_types]
d-1 = \"pump\"
";
    assert_eq!(
        problems(text),
        [
            "2:30: types.t.a.x: empty range: min 35 is greater than max 10",
            "3:14: types.t.a.y: unknown parameter type `float` (number, integer, boolean or enum)",
            "4:31: types.t.a.z: `min` must be an integer, not 1.5",
            "5:31: types.t.a.w: `values` is empty",
            "6:31: types.t.a.v: `min` does not apply to type `boolean`",
            "7:31: types.t.a.u: `values` lists `a` twice",
            "8:33: types.t.a.s: `values` applies to type `enum` only, not `number`",
            "9:7: types.t.a.cmd: `cmd` names the command; it cannot be a parameter",
            "11:1: types.t.rekey: `rekey` is reserved: key rotation sends it, and the device checks it by its own rules",
            "13:7: device_types.d-1: unknown device type `pump` (no [types.pump.<command>] table)",
        ]
    );
}

#[test]
fn malformed_schemas_stop_at_the_first_toml_error_with_its_position() {
    let unknown_key = problems("[types.t.a]\nx = { type = \"number\", maximum = 3 }\n");
    assert_eq!(unknown_key.len(), 1);
    assert!(
        unknown_key[0].starts_with("2:") && unknown_key[0].contains("unknown field `maximum`"),
        "{unknown_key:?}"
    );
    let duplicate = problems("[types.t.a]\n[types.t.a]\n");
    assert!(
        duplicate[0].starts_with("2:") && duplicate[0].contains("duplicate"),
        "{duplicate:?}"
    );
    let section = problems("[typo]\n");
    assert!(section[0].contains("unknown field `typo`"), "{section:?}");
    let syntax = problems("[types.t.a]\nx = { type = \n");
    assert!(syntax[0].starts_with("2:"), "{syntax:?}");
    let missing_type = problems("[types.t.a]\nx = { min = 1 }\n");
    assert!(
        missing_type[0].contains("missing field `type`"),
        "{missing_type:?}"
    );
}

#[test]
fn a_command_result_round_trips_through_its_uplink() {
    let result = CommandResult {
        seq: 12,
        cmd: "set_temp".into(),
        result: CommandOutcome::Refused,
        message: "refused: celsius out of range 10..35: 40".into(),
    };
    let plaintext = result.to_plaintext("thermostat-1", 5);
    let json: serde_json::Value = serde_json::from_slice(&plaintext).expect("JSON");
    assert_eq!(json["device_id"], "thermostat-1");
    assert_eq!(json["command_result"]["result"], "refused");
    assert_eq!(CommandResult::from_uplink(&json), Some(result));
    assert_eq!(CommandResult::from_uplink(&json!({"readings": []})), None);
}
