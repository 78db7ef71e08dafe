//! The embedded interpreter: made to look like the target environment's, then checked.

use pyo3::exceptions::PyModuleNotFoundError;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::environment::Environment;
use crate::flags::FlagSpec;
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

/// The Python module that declares the flags the binary cannot know (`--config`, SGLang's) and
/// turns parsed flags into the server config, as `sgl-diffusion serve` does.
const SERVE_MODULE: &str = "sgl_diffusion.cli.serve";

/// What `config_from_flags` decided.
pub enum FromFlags {
    /// The server config (`sgl_python::serve::ServeConfig` as JSON).
    Config(String),
    /// A usage error (`CommandError`): a value out of bounds, a `--config` problem, a feature not built yet.
    Usage(String),
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

fn python_error(py: Python<'_>, what: &str, err: &PyErr) -> ServerError {
    err.display(py);
    ServerError::Python(format!("{what}: {err}"))
}

/// The serve flags declared in Python, described like the Rust tables' entries.
pub fn python_flags(py: Python<'_>) -> Result<Vec<FlagSpec>, ServerError> {
    let json: String = py
        .import(SERVE_MODULE)
        .and_then(|module| module.getattr("python_flags_json")?.call0()?.extract())
        .map_err(|err| python_error(py, "cannot read the Python flags", &err))?;
    serde_json::from_str(&json).map_err(|err| ServerError::Python(format!("malformed Python flags: {err}")))
}

/// The server config from the flags clap parsed, through `--config` and the checks `serve` runs.
pub fn config_from_flags(
    py: Python<'_>,
    given: &serde_json::Map<String, serde_json::Value>,
) -> Result<FromFlags, ServerError> {
    let given_json = serde_json::Value::Object(given.clone()).to_string();
    let module = py.import(SERVE_MODULE).map_err(|err| python_error(py, "cannot import the serve command", &err))?;
    match module.getattr("config_from_flags").and_then(|convert| convert.call1((given_json,))) {
        Ok(config) => config
            .extract::<String>()
            .map(FromFlags::Config)
            .map_err(|err| ServerError::Python(format!("config_from_flags returned a non-string: {err}"))),
        Err(err) if is_command_error(py, &err) => Ok(FromFlags::Usage(err.value(py).to_string())),
        Err(err) => Err(python_error(py, "cannot build the server config", &err)),
    }
}

/// Whether `err` is the CLI's usage error (`sgl_diffusion.cli.options.CommandError`).
fn is_command_error(py: Python<'_>, err: &PyErr) -> bool {
    py.import("sgl_diffusion.cli.options")
        .and_then(|module| module.getattr("CommandError"))
        .is_ok_and(|class| err.value(py).is_instance(&class).unwrap_or(false))
}

/// Flushes Python's `sys.stdout` and `sys.stderr` (the pipeline's prints, warnings while importing): the
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
