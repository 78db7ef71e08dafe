//! The binary's command line, parsed with clap from the same declarations as `sgl-diffusion serve`:
//! the Rust field tables of the model, scheduler and server options (`_native::fields::tables`), and
//! the flags declared in Python (`--config`, SGLang's), which the Python package describes in the
//! same shape (`sgl_diffusion.cli.serve.python_flags_json`). What is given goes back to Python's
//! `config_from_flags` for `--config` merging and the checks `serve` runs, so both commands accept
//! exactly the same flags and report the same errors.

use clap::builder::{PossibleValuesParser, TypedValueParser};
use clap::parser::ValueSource;
use clap::{Arg, ArgAction, ArgMatches, Command};
use serde::Deserialize;
use serde_json::{Map, Value};

/// The tables whose flags `serve` takes.
const SERVE_TABLES: [&str; 3] = ["model", "engine", "server"];

/// One flag, as a table entry describes it (`sgl_core::fields::table_json`, or Python's
/// `python_flags_json` for the flags declared there).
#[derive(Debug, Clone, Deserialize)]
pub struct FlagSpec {
    /// The key of the parsed value (the config key of a Rust-declared option, the argparse `dest` of
    /// a Python-declared flag).
    pub name: String,
    pub flag: String,
    #[serde(default)]
    pub aliases: Vec<String>,
    #[serde(default)]
    pub help: String,
    pub group: String,
    pub kind: Kind,
    #[serde(default)]
    pub choices: Vec<String>,
    #[serde(default)]
    pub list: bool,
    #[serde(default)]
    pub repeat: bool,
    #[serde(default)]
    pub negatable: bool,
    #[serde(default = "yes")]
    pub cli: bool,
    /// A Python flag whose value may be left out (`--pin-cpu-memory` means `--pin-cpu-memory true`).
    #[serde(default)]
    pub optional_value: bool,
    #[serde(default)]
    pub metavar: Option<String>,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Bool,
    Integer,
    Number,
    Text,
    Choice,
    Object,
}

#[derive(Debug, thiserror::Error)]
pub enum FlagError {
    #[error("malformed flag table: {0}")]
    Table(#[from] serde_json::Error),
}

/// The serve flags of the Rust tables (`tables` is `_native::fields::tables()`).
pub fn rust_flags(tables: &Value) -> Result<Vec<FlagSpec>, FlagError> {
    let mut flags = Vec::new();
    for table in SERVE_TABLES {
        let entries: Vec<FlagSpec> = serde_json::from_value(tables[table].clone())?;
        flags.extend(entries.into_iter().filter(|flag| flag.cli));
    }
    Ok(flags)
}

/// The `--no-` form of a negatable flag is an argument of its own.
fn negated_id(spec: &FlagSpec) -> String {
    format!("no-{}", spec.name)
}

fn long(flag: &str) -> String {
    flag.trim_start_matches('-').to_string()
}

/// Numbers keep their JSON form, so that the config parses them exactly as a config file's.
fn number(text: &str, integer: bool) -> Result<Value, String> {
    let value: serde_json::Number = text.trim().parse().map_err(|_| format!("{text:?} is not a number"))?;
    if integer && !(value.is_i64() || value.is_u64()) {
        return Err(format!("{text:?} is not an integer"));
    }
    Ok(Value::Number(value))
}

fn arguments(spec: &FlagSpec) -> Vec<Arg> {
    let mut arg = Arg::new(spec.name.clone())
        .long(long(&spec.flag))
        .visible_aliases(spec.aliases.iter().map(|alias| long(alias)))
        .help(spec.help.clone())
        .help_heading(spec.group.clone());
    // argparse's default: the flag in capitals.
    let metavar = spec.metavar.clone().unwrap_or_else(|| long(&spec.flag).replace('-', "_").to_uppercase());
    arg = arg.value_name(metavar);
    arg = match spec.kind {
        Kind::Bool => arg.action(ArgAction::SetTrue),
        Kind::Integer => arg.value_parser(|text: &str| number(text, true)).allow_negative_numbers(true),
        Kind::Number => arg.value_parser(|text: &str| number(text, false)).allow_negative_numbers(true),
        Kind::Choice => arg.value_parser(PossibleValuesParser::new(spec.choices.clone()).map(Value::String)),
        Kind::Text | Kind::Object => arg.value_parser(|text: &str| Ok::<_, String>(Value::String(text.into()))),
    };
    if spec.kind != Kind::Bool {
        arg = match (spec.list, spec.repeat, spec.optional_value) {
            (true, true, _) => arg.action(ArgAction::Append),
            (true, false, _) => arg.action(ArgAction::Append).num_args(1..),
            (false, _, true) => arg.num_args(0..=1).default_missing_value("true"),
            (false, _, false) => arg.action(ArgAction::Set),
        };
    }
    let mut arguments = vec![arg];
    if spec.kind == Kind::Bool && spec.negatable {
        arguments.push(
            Arg::new(negated_id(spec))
                .long(format!("no-{}", long(&spec.flag)))
                .action(ArgAction::SetTrue)
                .overrides_with(spec.name.clone())
                .help(format!("turn {} off", spec.flag))
                .help_heading(spec.group.clone()),
        );
    }
    arguments
}

/// The command: every flag, under its `--help` heading, plus the binary's own `extra` arguments.
pub fn command(name: &'static str, flags: &[FlagSpec], extra: impl IntoIterator<Item = Arg>) -> Command {
    let command = Command::new(name).about("sgl-diffusion HTTP server").args(flags.iter().flat_map(arguments));
    command.args(extra)
}

/// Each flag given on the command line, by name: JSON values as a config file would hold them
/// (a negated flag as `false`, a list as an array).
pub fn given(matches: &ArgMatches, flags: &[FlagSpec]) -> Map<String, Value> {
    let on_command_line = |id: &str| matches.value_source(id) == Some(ValueSource::CommandLine);
    let mut given = Map::new();
    for spec in flags {
        if spec.kind == Kind::Bool {
            if on_command_line(&spec.name) && matches.get_flag(&spec.name) {
                given.insert(spec.name.clone(), Value::Bool(true));
            } else if spec.negatable && on_command_line(&negated_id(spec)) && matches.get_flag(&negated_id(spec)) {
                given.insert(spec.name.clone(), Value::Bool(false));
            }
            continue;
        }
        if !on_command_line(&spec.name) {
            continue;
        }
        let mut values: Vec<Value> =
            matches.get_many::<Value>(&spec.name).map(|values| values.cloned().collect()).unwrap_or_default();
        let value = if spec.list { Value::Array(values) } else { values.pop().unwrap_or(Value::Null) };
        given.insert(spec.name.clone(), value);
    }
    given
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags() -> Vec<FlagSpec> {
        let mut flags = rust_flags(&_native::fields::tables()).unwrap();
        let python = serde_json::json!([
            {"name": "config", "flag": "--config", "group": "config", "kind": "text"},
            {"name": "pin_cpu_memory", "flag": "--pin-cpu-memory", "group": "SGLang", "kind": "text",
             "optional_value": true, "metavar": "BOOL"},
            {"name": "sp_degree", "flag": "--sp-degree", "aliases": ["--sp-size"], "group": "SGLang",
             "kind": "integer"}
        ]);
        flags.extend(serde_json::from_value::<Vec<FlagSpec>>(python).unwrap());
        flags
    }

    fn parse(args: &[&str]) -> Result<Map<String, Value>, clap::Error> {
        let flags = flags();
        let matches =
            command("test", &flags, []).try_get_matches_from(std::iter::once("test").chain(args.iter().copied()))?;
        Ok(given(&matches, &flags))
    }

    #[test]
    fn flags_parse_to_config_values() {
        let given = parse(&[
            "--port",
            "8080",
            "--precision",
            "fp16",
            "--cors-origin",
            "a",
            "--cors-origin",
            "b",
            "--text-encoder-precisions",
            "fp16",
            "bf16",
            "--request-timeout",
            "2.5",
            "--no-warmup",
            "--enable-torch-compile",
            "--pin-cpu-memory",
            "--sp-size",
            "1",
            "--log-format",
            "json",
        ])
        .unwrap();
        let expected = serde_json::json!({
            "port": 8080, "dit_precision": "fp16", "cors_origins": ["a", "b"],
            "text_encoder_precisions": ["fp16", "bf16"], "request_timeout_secs": 2.5, "warmup": false,
            "enable_torch_compile": true, "pin_cpu_memory": "true", "sp_degree": 1, "log_format": "json",
        });
        assert_eq!(Value::Object(given), expected);
        assert!(parse(&[]).unwrap().is_empty());
    }

    #[test]
    fn bad_values_are_usage_errors() {
        for args in [&["--port", "eighty"][..], &["--dit-precision", "fp8"], &["--stepz", "3"], &["--warmup", "x"]] {
            let err = parse(args).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{args:?}: {err}");
        }
        // Bounds are the config's to check (they name the flag the same way for both commands).
        assert_eq!(parse(&["--batch-delay-ms", "-1"]).unwrap()["batch_delay_ms"], -1);
    }

    #[test]
    fn every_table_flag_is_listed_in_help() {
        let flags = flags();
        let help = command("test", &flags, []).render_long_help().to_string();
        for flag in &flags {
            assert!(help.contains(&flag.flag), "{}", flag.flag);
        }
        assert!(help.contains("--no-warmup"), "{help}");
    }
}
