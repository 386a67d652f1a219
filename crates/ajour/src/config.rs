//! The configuration of `ajour serve`, resolved in one place.
//!
//! The flags are the one definition of every setting: its name, meaning, type, checks and default
//! ([`ServeArgs`], with [`DrogueArgs`](crate::drogue_cli::DrogueArgs) and
//! [`OciServeArgs`](crate::oci_cli::OciServeArgs) flattened in). Defaults the server's own types
//! have ([`ServerConfig::default`](crate::server::ServerConfig), `OciConfig::default`) are read from
//! them, not written again. A setting can come from four layers, each overriding the ones before:
//!
//! 1. its built-in default;
//! 2. the config file (`--config FILE` or `AJOUR_CONFIG`): TOML whose keys are the long flag names;
//! 3. the environment: `AJOUR_` and the flag in upper snake case ([`env_var`]);
//! 4. the command line.
//!
//! Each layer is read into a [`Given`]: the settings it sets, as command-line text. The layers are
//! merged setting by setting and the result is parsed by clap once more, so a value from the file
//! or the environment is checked and converted exactly as the same value given as a flag.
//! [`to_toml`] prints the result (`--print-config`); [`document_flags`] writes the flag tables of
//! docs/configuration.md.

use crate::cli::ServeArgs;
use anyhow::{anyhow, Context};
use clap::parser::ValueSource;
use clap::{Arg, ArgAction, ArgMatches, Args, Command, FromArgMatches};
use std::any::TypeId;
use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

/// The environment as the configuration reads it. The binary passes the process's
/// ([`process_environment`]); tests pass their own and so never touch the process's.
pub type Environment = BTreeMap<String, OsString>;

/// The process's environment variables (those with a name in UTF-8, as all of Ajour's are).
pub fn process_environment() -> Environment {
    std::env::vars_os()
        .filter_map(|(name, value)| Some((name.into_string().ok()?, value)))
        .collect()
}

/// How `serve --help` tells where else a setting can come from (clap's own `[env: ...]` is off:
/// the environment is read here, as a layer of its own).
pub fn layers_help() -> String {
    format!(
        "Every flag can also be set in the environment, as AJOUR_ and the flag in upper snake case \
         (--spec-cache-ms: {}; --application and --exclude-application: {} and {}, \
         comma-separated), or in the TOML file given with --config, under the flag's long name \
         (spec-cache-ms = 60000). Flags override the environment, which overrides the file. \
         --print-config shows the result.",
        env_var("spec-cache-ms"),
        env_var("application"),
        env_var("exclude-application"),
    )
}

/// The environment variable of the `ajour serve` flag `--{long}`.
pub fn env_var(long: &str) -> String {
    match long {
        // Named before the rule was, and kept so that existing deployments keep working.
        "application" => "AJOUR_DROGUE_APPLICATIONS".into(),
        "exclude-application" => "AJOUR_DROGUE_EXCLUDE_APPLICATIONS".into(),
        _ => format!("AJOUR_{}", long.to_uppercase().replace('-', "_")),
    }
}

/// A duration as the whole milliseconds the flags take.
pub fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// Applied to every argument of `ajour serve`: clap must not read the environment itself (some
/// arguments are shared with commands where it does), or it would be read twice, and outside the
/// [`Environment`] tests pass in.
pub fn without_env(arg: Arg) -> Arg {
    arg.env(None)
}

/// Settings given explicitly, by argument id, as command-line text (a switch that is on: `true`).
/// In [`ServeArgs`] parsed from a command line: those given on it. Once [`resolve`]d: those given
/// by any layer.
#[derive(Debug, Clone, Default)]
pub struct Given(BTreeMap<String, Vec<OsString>>);

impl Given {
    fn set(&mut self, arg: &Arg, values: Vec<OsString>) {
        self.0.insert(arg.get_id().to_string(), values);
    }

    /// The values `arg` is given, else its default ones (none when it has no default).
    fn values<'a>(&'a self, arg: &'a Arg) -> Vec<&'a OsStr> {
        match self.0.get(arg.get_id().as_str()) {
            Some(values) => values.iter().map(OsString::as_os_str).collect(),
            None => arg.get_default_values().iter().map(AsRef::as_ref).collect(),
        }
    }

    /// The arguments of `ajour serve` that say the same.
    fn to_argv(&self, command: &Command) -> Vec<OsString> {
        let mut argv = vec![OsString::from(command.get_name())];
        for arg in command.get_arguments() {
            let (Some(long), Some(values)) = (arg.get_long(), self.0.get(arg.get_id().as_str())) else {
                continue;
            };
            if shape(arg) == Shape::Switch {
                // A switch takes no value: on is the flag, off its absence.
                if values.iter().any(|value| value == "true") {
                    argv.push(format!("--{long}").into());
                }
                continue;
            }
            for value in values {
                // `--flag=value`, so that a value starting with `-` is not taken for a flag.
                let mut flag = OsString::from(format!("--{long}="));
                flag.push(value);
                argv.push(flag);
            }
        }
        argv
    }
}

/// Records, when flattened into [`ServeArgs`] as its first field, which settings the command line
/// gave (fields after it take their values out of the matches).
impl FromArgMatches for Given {
    fn from_arg_matches(matches: &ArgMatches) -> Result<Self, clap::Error> {
        let given = matches
            .ids()
            .filter(|id| matches.value_source(id.as_str()) == Some(ValueSource::CommandLine))
            .map(|id| {
                let values = matches
                    .get_raw(id.as_str())
                    .into_iter()
                    .flatten()
                    .map(OsStr::to_os_string)
                    .collect();
                (id.to_string(), values)
            })
            .collect();
        Ok(Self(given))
    }

    fn update_from_arg_matches(&mut self, matches: &ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_arg_matches(matches)?;
        Ok(())
    }
}

/// Adds no argument: [`Given`] only reads the others.
impl Args for Given {
    fn augment_args(command: Command) -> Command {
        command
    }

    fn augment_args_for_update(command: Command) -> Command {
        command
    }
}

/// What a setting's value looks like in TOML.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// On or off: a boolean.
    Switch,
    /// A flag that may be repeated: an array of strings.
    List,
    /// An integer (or, for `--progress-step`, a float).
    Number,
    /// A string: text, a path, a URL, one of a few names.
    Text,
}

impl Shape {
    fn expected(self) -> &'static str {
        match self {
            Shape::Switch => "a boolean (true or false)",
            Shape::List => "an array of strings",
            Shape::Number => "a number",
            Shape::Text => "a string",
        }
    }
}

fn shape(arg: &Arg) -> Shape {
    let numbers = [
        TypeId::of::<u16>(),
        TypeId::of::<u32>(),
        TypeId::of::<u64>(),
        TypeId::of::<f64>(),
    ];
    match arg.get_action() {
        ArgAction::SetTrue => Shape::Switch,
        ArgAction::Append => Shape::List,
        _ if numbers
            .iter()
            .any(|number| arg.get_value_parser().type_id() == *number) =>
        {
            Shape::Number
        }
        _ => Shape::Text,
    }
}

/// The arguments of `ajour serve`, built (every action and value parser final).
fn serve_command() -> Command {
    let mut command = ServeArgs::augment_args(Command::new("serve"));
    command.build();
    command
}

/// Arguments of `ajour serve` that are not settings: they say where settings are, or what to do.
const NOT_SETTINGS: [&str; 3] = ["config", "print-config", "help"];

/// The arguments of `ajour serve` that are settings (config file keys), in the order of `--help`.
fn settings(command: &Command) -> impl Iterator<Item = &Arg> {
    command
        .get_arguments()
        .filter(|arg| arg.get_long().is_some_and(|long| !NOT_SETTINGS.contains(&long)))
}

fn long(arg: &Arg) -> &str {
    arg.get_long().unwrap_or_default()
}

/// The settings of `ajour serve` in force: built-in defaults, overridden by the config file, by
/// the environment, and by what `args` gave on the command line. Rules between settings are for
/// [`ServeArgs::server_config`] to judge, on the result, never on one layer alone.
pub fn resolve(args: &ServeArgs, env: &Environment) -> anyhow::Result<ServeArgs> {
    let command = serve_command();
    let mut over_file = read_environment(&command, env)?;
    over_file.0.extend(args.given.0.clone());
    let mut given = match over_file.0.get("config_file").and_then(|values| values.last()) {
        Some(path) => read_file(&command, Path::new(path))?,
        None => Given::default(),
    };
    given.0.extend(over_file.0);
    let matches = command
        .clone()
        .try_get_matches_from(given.to_argv(&command))
        .map_err(|error| {
            anyhow!(
                "the configuration (file, environment and flags) is invalid: {}",
                message(&error)
            )
        })?;
    ServeArgs::from_arg_matches(&matches).map_err(|error| anyhow!(message(&error)))
}

/// A clap error in one line, without its `error: ` and the advice to try `--help`.
fn message(error: &clap::Error) -> String {
    let rendered = error.render().to_string();
    let first = rendered.lines().next().unwrap_or_default();
    first.strip_prefix("error: ").unwrap_or(first).to_string()
}

/// Checks `value` as clap would if it were given to `arg` on the command line.
fn check_value(command: &Command, arg: &Arg, value: &OsStr) -> anyhow::Result<()> {
    if shape(arg) == Shape::Switch {
        // On the command line a switch takes no value; elsewhere it is on or off.
        return match value.to_str() {
            Some("true" | "false") => Ok(()),
            _ => Err(anyhow!(
                "invalid value '{}' for '--{}': true or false",
                value.to_string_lossy(),
                long(arg)
            )),
        };
    }
    let mut alone = Given::default();
    alone.set(arg, vec![value.to_os_string()]);
    command
        .clone()
        .try_get_matches_from(alone.to_argv(command))
        .map(drop)
        .map_err(|error| anyhow!(message(&error)))
}

/// The settings the environment gives, and `AJOUR_CONFIG`.
fn read_environment(command: &Command, env: &Environment) -> anyhow::Result<Given> {
    let mut given = Given::default();
    let config_file = command
        .get_arguments()
        .filter(|arg| arg.get_long() == Some("config"));
    for arg in settings(command).chain(config_file) {
        let name = env_var(long(arg));
        let Some(value) = env.get(&name) else { continue };
        check_value(command, arg, value).with_context(|| format!("environment variable {name}"))?;
        given.set(arg, vec![value.clone()]);
    }
    Ok(given)
}

/// The settings a config file gives.
fn read_file(command: &Command, path: &Path) -> anyhow::Result<Given> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the config file {}", path.display()))?;
    let table: toml::Table = text
        .parse()
        .with_context(|| format!("the config file {} is not valid TOML", path.display()))?;
    let mut given = Given::default();
    for (key, value) in &table {
        let at = || format!("config file {}, key `{key}`", path.display());
        let arg = settings(command).find(|arg| long(arg) == key).ok_or_else(|| {
            anyhow!(
                "{}: no such setting (the keys are the long flag names of `ajour serve`, see docs/configuration.md)",
                at()
            )
        })?;
        let values = file_values(shape(arg), value).ok_or_else(|| {
            anyhow!(
                "{}: must be {}, not the {} {value}",
                at(),
                shape(arg).expected(),
                value.type_str()
            )
        })?;
        for value in &values {
            check_value(command, arg, value).with_context(at)?;
        }
        given.set(arg, values);
    }
    Ok(given)
}

/// A value from the config file as command-line text, when it has the shape its setting takes.
fn file_values(shape: Shape, value: &toml::Value) -> Option<Vec<OsString>> {
    let text = match (shape, value) {
        (Shape::Switch, toml::Value::Boolean(on)) => on.to_string(),
        (Shape::Number, toml::Value::Integer(number)) => number.to_string(),
        (Shape::Number, toml::Value::Float(number)) => number.to_string(),
        (Shape::Text | Shape::List, toml::Value::String(text)) => text.clone(),
        (Shape::List, toml::Value::Array(items)) => {
            return items
                .iter()
                .map(|item| item.as_str().map(OsString::from))
                .collect();
        }
        _ => return None,
    };
    Some(vec![text.into()])
}

/// The TOML value of a setting given `values` on the command line.
fn toml_value(shape: Shape, values: &[&OsStr]) -> toml::Value {
    let text = |value: &OsStr| value.to_string_lossy().into_owned();
    let first = values.first().map(|value| text(value)).unwrap_or_default();
    match shape {
        Shape::Switch => toml::Value::Boolean(first == "true"),
        Shape::List => toml::Value::Array(values.iter().map(|value| text(value).into()).collect()),
        Shape::Number => match (first.parse::<i64>(), first.parse::<f64>()) {
            (Ok(integer), _) => toml::Value::Integer(integer),
            (_, Ok(float)) => toml::Value::Float(float),
            _ => toml::Value::String(first),
        },
        Shape::Text => toml::Value::String(first),
    }
}

/// Settings whose values are secrets, never printed.
pub const SECRETS: [&str; 6] = [
    "api-token",
    "credential-secret",
    "drogue-token",
    "hawkbit-gateway-token",
    "oci-password",
    "oci-token",
];

/// How a secret is printed in place of its value.
const HIDDEN: &str = "***";

/// How `value` of setting `long` may be shown when it holds a secret; `None` when it holds none.
fn redacted(long: &str, value: &toml::Value) -> Option<toml::Value> {
    if SECRETS.contains(&long) {
        return Some(HIDDEN.into());
    }
    // A URL's password (`postgres://user:password@host/db`), whatever the setting.
    let text = value.as_str()?;
    let shown = crate::server::redact(text);
    (shown != text).then(|| shown.into())
}

/// The settings of `args` as a config file (`--print-config`): every setting under its key, in the
/// order of `--help`; one not set, or holding a secret, commented out (secrets hidden).
pub fn to_toml(args: &ServeArgs) -> String {
    let command = serve_command();
    let mut toml = String::from(
        "# The configuration `ajour serve` runs with (--print-config), usable as its --config file.\n\
         # Secrets are hidden and commented out: give them again (flag, environment or file).\n",
    );
    let mut heading = None;
    for arg in settings(&command) {
        if arg.get_help_heading() != heading {
            heading = arg.get_help_heading();
            let _ = writeln!(toml, "\n# {}", heading_of(arg));
        }
        let values = args.given.values(arg);
        if values.is_empty() {
            let _ = writeln!(toml, "# {} is not set", long(arg));
            continue;
        }
        let value = toml_value(shape(arg), &values);
        let _ = match redacted(long(arg), &value) {
            Some(shown) => writeln!(toml, "# {} = {shown} (secret hidden)", long(arg)),
            None => writeln!(toml, "{} = {value}", long(arg)),
        };
    }
    toml
}

/// The heading of `arg` in `--help` and in docs/configuration.md.
fn heading_of(arg: &Arg) -> &str {
    arg.get_help_heading().unwrap_or("Options")
}

/// The table of the settings under `heading`: flag, environment variable, default, meaning.
fn flag_table(command: &Command, heading: &str) -> String {
    let mut table = String::from("| flag | env | default | meaning |\n|---|---|---|---|\n");
    for arg in settings(command).filter(|arg| heading_of(arg) == heading) {
        let shape = shape(arg);
        let mut flag = format!("--{}", long(arg));
        if shape != Shape::Switch {
            for name in arg.get_value_names().unwrap_or_default() {
                let _ = write!(flag, " {name}");
            }
        }
        let mut env = format!("`{}`", env_var(long(arg)));
        if arg.get_value_delimiter().is_some() {
            env.push_str(" (comma-separated)");
        }
        let defaults: Vec<String> = arg
            .get_default_values()
            .iter()
            .map(|value| value.to_string_lossy().into_owned())
            .collect();
        let default = match shape {
            Shape::Switch => "off".to_string(),
            _ if defaults.is_empty() => "none".to_string(),
            Shape::Number => defaults.join(", "),
            Shape::List | Shape::Text => format!("`{}`", defaults.join(", ")),
        };
        let help = arg
            .get_long_help()
            .or(arg.get_help())
            .map(ToString::to_string)
            .unwrap_or_default();
        let meaning = help
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
            .replace('|', "\\|");
        let meaning = meaning.strip_suffix('.').unwrap_or(&meaning);
        let _ = writeln!(table, "| `{flag}` | {env} | {default} | {meaning} |");
    }
    table
}

const TABLE_START: &str = "<!-- flags: ";
const TABLE_START_END: &str = " (generated from the code: AJOUR_BLESS=1 cargo test -p ajour config_doc) -->";
const TABLE_END: &str = "<!-- end of flags -->";

/// `doc` (docs/configuration.md) with each flag table regenerated from the flags. A table is the
/// text between `<!-- flags: HEADING (generated ...) -->` and `<!-- end of flags -->`; every
/// heading of `serve --help` must have one.
pub fn document_flags(doc: &str) -> anyhow::Result<String> {
    let command = serve_command();
    let mut headings: Vec<&str> = settings(&command).map(heading_of).collect();
    headings.dedup();
    let mut out = String::new();
    let mut rest = doc;
    while let Some(start) = rest.find(TABLE_START) {
        let line_end = rest[start..].find('\n').map_or(rest.len(), |end| start + end + 1);
        let marker = &rest[start..line_end];
        let heading = marker[TABLE_START.len()..]
            .split(" (")
            .next()
            .unwrap_or_default()
            .trim_end_matches(" -->")
            .trim();
        anyhow::ensure!(
            headings.contains(&heading),
            "docs name flags under \"{heading}\", which `ajour serve --help` has no heading for (it has {headings:?})"
        );
        headings.retain(|known| *known != heading);
        let end = rest[line_end..]
            .find(TABLE_END)
            .map(|end| line_end + end)
            .ok_or_else(|| anyhow!("the flags under \"{heading}\" have no `{TABLE_END}`"))?;
        out.push_str(&rest[..start]);
        let _ = writeln!(out, "{TABLE_START}{heading}{TABLE_START_END}");
        out.push_str(&flag_table(&command, heading));
        rest = &rest[end..];
    }
    out.push_str(rest);
    anyhow::ensure!(
        headings.is_empty(),
        "no table of the flags under {headings:?}: add `{TABLE_START}HEADING{TABLE_START_END}` and `{TABLE_END}` where it belongs"
    );
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_setting_has_an_environment_variable_named_after_its_flag() {
        let command = serve_command();
        for arg in settings(&command) {
            let by_rule = format!("AJOUR_{}", long(arg).to_uppercase().replace('-', "_"));
            let legacy = ["application", "exclude-application"].contains(&long(arg));
            assert_eq!(env_var(long(arg)) == by_rule, !legacy, "--{}", long(arg));
        }
        // `firmware push` and `inspect` let clap read the OCI connection's environment: the same
        // variables.
        let connection = crate::oci_cli::OciConnectionArgs::augment_args(Command::new("push"));
        for arg in connection.get_arguments() {
            let declared = arg.get_env().map(|name| name.to_string_lossy().into_owned());
            assert_eq!(declared, Some(env_var(long(arg))), "--{}", long(arg));
        }
    }

    #[test]
    fn switches_are_off_unless_given() {
        // A switch is given as its flag or not at all (`Given::to_argv`), so a layer can only turn
        // it off if off is its default.
        let command = serve_command();
        for arg in settings(&command).filter(|arg| shape(arg) == Shape::Switch) {
            assert_eq!(arg.get_default_values(), ["false"], "--{}", long(arg));
        }
    }

    #[test]
    fn every_secret_is_a_setting() {
        let command = serve_command();
        for secret in SECRETS {
            assert!(settings(&command).any(|arg| long(arg) == secret), "{secret}");
        }
    }

    #[test]
    fn numbers_and_text_are_told_apart() {
        let command = serve_command();
        let shape_of = |name: &str| shape(settings(&command).find(|arg| long(arg) == name).unwrap());
        assert_eq!(shape_of("spec-cache-ms"), Shape::Number);
        assert_eq!(shape_of("progress-step"), Shape::Number);
        assert_eq!(shape_of("drogue-workers"), Shape::Number);
        assert_eq!(shape_of("listen"), Shape::Text);
        assert_eq!(shape_of("drogue-mqtt-version"), Shape::Text);
        assert_eq!(shape_of("oci-ca-file"), Shape::Text);
        assert_eq!(shape_of("application"), Shape::List);
        assert_eq!(shape_of("oci-plain-http"), Shape::Switch);
    }
}
