//! `sgl-diffusion-server`: the same HTTP server as `sgl-diffusion serve`, as a native binary that
//! embeds the Python environment it runs in.
//!
//! It finds that environment (`--python PATH`, else `$VIRTUAL_ENV/bin/python`, else `python3` on
//! `PATH`) and asks its interpreter for its `sys.path` and version before starting Python, then
//! mirrors it in the embedded interpreter (`sys.executable` included: torch.compile and
//! multiprocessing start subprocesses through it), imports torch and sgl_diffusion, parses the
//! flags with clap from the same declarations as `sgl-diffusion serve` (see [`flags`]) and runs the
//! server with the GIL released.

mod embed;
mod environment;
mod flags;

use std::ffi::OsString;
use std::process::ExitCode;

use _native::serve::ServeConfig;
use clap::error::ErrorKind;
use clap::Arg;
use pyo3::prelude::*;
use sgl_http::ServeError;

use crate::embed::FromFlags;
use crate::environment::{Source, Target};
use crate::flags::FlagError;

const PROG: &str = "sgl-diffusion-server";

/// The Python version the binary links against (see build.rs).
const LINKED_PYTHON: &str = env!("SGL_LINKED_PYTHON_VERSION");

/// `--python PATH`, read before Python starts (see `split_args`); listed in `--help` with the rest.
fn python_flag() -> Arg {
    Arg::new("python").long("python").value_name("PATH").help_heading("native binary").help(
        "The Python interpreter of the environment to run in (default: $VIRTUAL_ENV/bin/python, else python3 on \
         PATH); it needs torch and sgl-diffusion installed and the same Python version as the binary",
    )
}

/// What the command line asks for.
enum Parsed {
    /// Serve with this config (`ServeConfig` as JSON).
    Config(String),
    /// Help was printed (0), or a usage error (2).
    Exit(u8),
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("--python needs the path of a Python interpreter")]
    MissingPythonPath,
    #[error(
        "cannot run the Python interpreter {interpreter} ({origin}): {source} — pass --python PATH to use another"
    )]
    NoInterpreter { interpreter: String, origin: Source, source: std::io::Error },
    #[error(
        "the Python interpreter {interpreter} ({origin}) cannot be used: {reason} — pass --python PATH to use another"
    )]
    BadInterpreter { interpreter: String, origin: Source, reason: String },
    #[error(
        "the Python environment {interpreter} is Python {found}, but this binary is built for Python {linked}; \
         use an environment of Python {linked} (--python PATH) or rebuild the binary with PYO3_PYTHON={interpreter}"
    )]
    VersionMismatch { interpreter: String, found: String, linked: String },
    #[error("the Python interpreter {interpreter} is {implementation}; the binary embeds CPython")]
    NotCPython { interpreter: String, implementation: String },
    #[error(
        "cannot import {module} in the Python environment {interpreter} (sys.path: {path:?}): {reason} — \
         install sgl-diffusion there (pip install sgl-diffusion) or pass --python PATH"
    )]
    Import { module: &'static str, interpreter: String, path: Vec<String>, reason: String },
    #[error("{0}")]
    Python(String),
    #[error("invalid server config from config_from_flags: {0}")]
    Config(#[from] serde_json::Error),
    #[error("{0}")]
    Flags(#[from] FlagError),
    #[error("{0}")]
    Serve(#[from] ServeError),
}

/// Splits off the binary's own `--python PATH` / `--python=PATH`: it chooses the Python that declares
/// the other flags.
fn split_args(args: impl IntoIterator<Item = OsString>) -> Result<(Option<OsString>, Vec<OsString>), ServerError> {
    let mut python = None;
    let mut rest = Vec::new();
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        if arg == "--" {
            rest.push(arg);
            rest.extend(args.by_ref());
            break;
        }
        if arg == "--python" {
            python = Some(args.next().filter(|p| !p.is_empty()).ok_or(ServerError::MissingPythonPath)?);
        } else if let Some(value) = arg.to_str().and_then(|a| a.strip_prefix("--python=")) {
            if value.is_empty() {
                return Err(ServerError::MissingPythonPath);
            }
            python = Some(OsString::from(value));
        } else {
            rest.push(arg);
        }
    }
    Ok((python, rest))
}

/// Parses the flags: clap, from the Rust tables and the flags Python declares; then Python's
/// `config_from_flags` for `--config` and the checks `sgl-diffusion serve` runs.
fn parse_flags(py: Python<'_>, argv: Vec<OsString>) -> Result<Parsed, ServerError> {
    let mut flags = flags::rust_flags(&_native::fields::tables())?;
    flags.extend(embed::python_flags(py)?);
    let mut command = flags::command(PROG, &flags, [python_flag()]);
    let matches = match command.try_get_matches_from_mut(std::iter::once(OsString::from(PROG)).chain(argv)) {
        Ok(matches) => matches,
        Err(err) => {
            embed::flush(py);
            let _ = err.print();
            return Ok(Parsed::Exit(u8::try_from(err.exit_code()).unwrap_or(2)));
        }
    };
    match embed::config_from_flags(py, &flags::given(&matches, &flags))? {
        FromFlags::Config(json) => Ok(Parsed::Config(json)),
        FromFlags::Usage(message) => {
            embed::flush(py);
            let _ = command.error(ErrorKind::ValueValidation, message).print();
            Ok(Parsed::Exit(2))
        }
    }
}

fn run() -> Result<ExitCode, ServerError> {
    let (python, argv) = split_args(std::env::args_os().skip(1))?;
    let target = Target::choose(python, std::env::var_os("VIRTUAL_ENV"));
    let env = target.discover()?;
    if env.implementation != "cpython" {
        return Err(ServerError::NotCPython { interpreter: env.executable, implementation: env.implementation });
    }
    // Checked before Python starts (prepare checks the running interpreter again).
    if env.version_string() != LINKED_PYTHON {
        return Err(ServerError::VersionMismatch {
            found: env.version_string(),
            interpreter: env.executable,
            linked: LINKED_PYTHON.to_string(),
        });
    }
    let parsed = Python::attach(|py| {
        let parsed = embed::prepare(py, &env).and_then(|()| parse_flags(py, argv));
        embed::flush(py);
        parsed
    })?;
    let config_json = match parsed {
        Parsed::Config(json) => json,
        Parsed::Exit(status) => return Ok(ExitCode::from(status)),
    };
    let config: ServeConfig = serde_json::from_str(&config_json)?;
    // The GIL is free here: the engine's worker thread takes it to load and run the pipeline.
    let served = config.run();
    Python::attach(embed::flush);
    served?;
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    match run() {
        Ok(code) => code,
        Err(err) => {
            eprintln!("{PROG}: error: {err}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(args: &[&str]) -> Result<(Option<OsString>, Vec<OsString>), ServerError> {
        split_args(args.iter().map(OsString::from))
    }

    #[test]
    fn strips_the_python_flag_in_both_forms() {
        let (python, rest) = split(&["--port", "1", "--python", "/v/bin/python", "--device", "cpu"]).unwrap();
        assert_eq!(python, Some(OsString::from("/v/bin/python")));
        assert_eq!(rest, ["--port", "1", "--device", "cpu"]);
        let (python, rest) = split(&["--python=/p", "--help"]).unwrap();
        assert_eq!(python, Some(OsString::from("/p")));
        assert_eq!(rest, ["--help"]);
    }

    #[test]
    fn leaves_everything_after_double_dash() {
        let (python, rest) = split(&["--", "--python", "x"]).unwrap();
        assert_eq!(python, None);
        assert_eq!(rest, ["--", "--python", "x"]);
    }

    #[test]
    fn a_python_flag_without_a_path_is_an_error() {
        assert!(matches!(split(&["--python"]), Err(ServerError::MissingPythonPath)));
        assert!(matches!(split(&["--python="]), Err(ServerError::MissingPythonPath)));
    }
}
