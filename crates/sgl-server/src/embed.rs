//! The embedded interpreter: made to look like the target environment's, then checked.

use pyo3::exceptions::{PyModuleNotFoundError, PySystemExit};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::environment::Environment;
use crate::ServerError;

/// Mirrors the target interpreter: `sys.executable` first (torch.compile and multiprocessing's
/// spawn start subprocesses through it), then the prefixes and `sys.path`, then the `.pth` files of
/// site-packages folders the embedded interpreter did not process at start-up (their `import`
/// lines install editable-install finders and the like).
const MIRROR: &std::ffi::CStr = cr#"
import importlib, json, site, sys
info = json.loads(info_json)
started_with = set(sys.path)
sys.executable = info["executable"]
sys._base_executable = info["base_executable"]
sys.prefix = info["prefix"]
sys.exec_prefix = info["exec_prefix"]
sys.base_prefix = info["base_prefix"]
sys.base_exec_prefix = info["base_exec_prefix"]
sys.path[:] = info["path"]
for folder in info["site_dirs"]:
    if folder not in started_with:
        site.addsitedir(folder)
if "multiprocessing" in sys.modules:
    sys.modules["multiprocessing"].set_executable(sys.executable)
importlib.invalidate_caches()
"#;

/// The modules the server needs, imported up front so a broken environment fails clearly.
const REQUIRED: [&str; 2] = ["torch", "sgl_diffusion"];

/// What `sgl_diffusion.cli.serve.parse_serve_config` decided.
pub enum Parsed {
    Config(String),
    /// It printed usage or help and asked to exit with this status.
    Exit(u8),
}

/// Starts Python (once), mirrors `env` into it and imports torch and sgl_diffusion.
pub fn prepare(py: Python<'_>, env: &Environment) -> Result<(), ServerError> {
    let (major, minor) = (py.version_info().major, py.version_info().minor);
    if (u32::from(major), u32::from(minor)) != env.version {
        return Err(ServerError::VersionMismatch {
            interpreter: env.executable.clone(),
            found: env.version_string(),
            linked: format!("{major}.{minor}"),
        });
    }
    let mirror = || -> PyResult<()> {
        let locals = PyDict::new(py);
        let info = serde_json::json!({
            "executable": env.executable,
            "base_executable": env.base_executable,
            "prefix": env.prefix,
            "exec_prefix": env.exec_prefix,
            "base_prefix": env.base_prefix,
            "base_exec_prefix": env.base_exec_prefix,
            "path": env.path,
            "site_dirs": env.site_dirs,
        });
        locals.set_item("info_json", info.to_string())?;
        py.run(MIRROR, None, Some(&locals))
    };
    mirror().map_err(|err| ServerError::Python(format!("cannot set up the embedded interpreter: {err}")))?;
    for module in REQUIRED {
        if let Err(err) = py.import(module) {
            if !err.is_instance_of::<PyModuleNotFoundError>(py) {
                // Not a plain absence (a broken install, a missing shared library): show where.
                err.display(py);
            }
            return Err(ServerError::Import {
                module,
                interpreter: env.executable.clone(),
                path: env.path.clone(),
                reason: err.to_string(),
            });
        }
    }
    Ok(())
}

/// Hands the flags to the Python option parser (the one `sgl-diffusion serve` uses).
pub fn parse_flags(py: Python<'_>, argv: Vec<std::ffi::OsString>) -> Result<Parsed, ServerError> {
    let parsed = py
        .import("sgl_diffusion.cli.serve")
        .and_then(|module| module.getattr("parse_serve_config"))
        .and_then(|parse| parse.call1((argv,)));
    match parsed {
        Ok(config) => config
            .extract::<String>()
            .map(Parsed::Config)
            .map_err(|err| ServerError::Python(format!("parse_serve_config returned a non-string: {err}"))),
        Err(err) if err.is_instance_of::<PySystemExit>(py) => Ok(Parsed::Exit(exit_status(py, &err))),
        Err(err) => {
            err.display(py);
            Err(ServerError::Python(format!("cannot parse the flags: {err}")))
        }
    }
}

/// The status a `SystemExit` asks for, as Python's own exit would compute it.
fn exit_status(py: Python<'_>, err: &PyErr) -> u8 {
    let code = match err.value(py).getattr("code") {
        Ok(code) => code,
        Err(_) => return 1,
    };
    if code.is_none() {
        return 0;
    }
    match code.extract::<i64>() {
        Ok(status) => (status & 0xff) as u8,
        Err(_) => {
            eprintln!("{code}");
            1
        }
    }
}

/// Flushes Python's `sys.stdout` and `sys.stderr` (argparse's help, the pipeline's prints): the
/// process exits without finalizing Python.
pub fn flush(py: Python<'_>) {
    if let Ok(sys) = py.import("sys") {
        for stream in ["stdout", "stderr"] {
            if let Ok(stream) = sys.getattr(stream) {
                if !stream.is_none() {
                    let _ = stream.call_method0("flush");
                }
            }
        }
    }
}
