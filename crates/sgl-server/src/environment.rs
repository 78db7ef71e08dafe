//! Finding the Python environment the binary runs in, before Python starts.
//!
//! The target interpreter is `--python PATH`, else `$VIRTUAL_ENV/bin/python`, else `python3` on
//! `PATH`. It is run once as a subprocess to learn what the embedded interpreter must mirror: its
//! `sys.executable`, prefixes, `sys.path` (with `PYTHONPATH` and `.pth` entries applied), its
//! site-packages folders and its version.

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::path::PathBuf;
use std::process::Command;

use serde::Deserialize;

use crate::ServerError;

/// Prints what the embedded interpreter needs from the target one, as JSON on one line.
const DISCOVER: &str = r#"
import json, os, site, sys
path = list(sys.path)
# `-c` puts the working directory first; a console command would not have it.
if path and path[0] == "" and not getattr(sys.flags, "safe_path", False):
    path = path[1:]
sites = list(getattr(site, "getsitepackages", lambda: [])())
if site.ENABLE_USER_SITE:
    user = site.getusersitepackages()
    if os.path.isdir(user):
        sites.append(user)
print(json.dumps({
    "executable": sys.executable,
    "base_executable": getattr(sys, "_base_executable", sys.executable),
    "prefix": sys.prefix,
    "exec_prefix": sys.exec_prefix,
    "base_prefix": getattr(sys, "base_prefix", sys.prefix),
    "base_exec_prefix": getattr(sys, "base_exec_prefix", sys.exec_prefix),
    "path": path,
    "site_dirs": sites,
    "version": list(sys.version_info[:2]),
    "implementation": getattr(getattr(sys, "implementation", None), "name", "cpython"),
}))
"#;

/// Where the target interpreter came from (for error messages).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Flag,
    VirtualEnv,
    Path,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Flag => "given by --python",
            Self::VirtualEnv => "from VIRTUAL_ENV",
            Self::Path => "python3 on PATH, as no virtual environment is active",
        })
    }
}

/// The interpreter to mirror, before it is run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub interpreter: OsString,
    pub source: Source,
}

impl Target {
    /// `--python PATH`, else `$VIRTUAL_ENV/bin/python`, else `python3` (looked up on `PATH`).
    pub fn choose(flag: Option<OsString>, virtual_env: Option<OsString>) -> Self {
        if let Some(interpreter) = flag {
            return Self { interpreter, source: Source::Flag };
        }
        if let Some(env) = virtual_env.filter(|env| !env.is_empty()) {
            let bin = if cfg!(windows) { ["Scripts", "python.exe"] } else { ["bin", "python"] };
            let interpreter = PathBuf::from(env).join(bin[0]).join(bin[1]).into_os_string();
            return Self { interpreter, source: Source::VirtualEnv };
        }
        Self { interpreter: OsString::from("python3"), source: Source::Path }
    }

    fn display(&self) -> String {
        self.interpreter.to_string_lossy().into_owned()
    }

    /// Runs the interpreter and reads its environment.
    pub fn discover(&self) -> Result<Environment, ServerError> {
        let output = Command::new(&self.interpreter).arg("-c").arg(DISCOVER).output().map_err(|source| {
            ServerError::NoInterpreter { interpreter: self.display(), origin: self.source, source }
        })?;
        if !output.status.success() {
            return Err(ServerError::BadInterpreter {
                interpreter: self.display(),
                origin: self.source,
                reason: match String::from_utf8_lossy(&output.stderr).trim() {
                    "" => format!("it exited with {} while reporting its environment", output.status),
                    stderr => format!("it exited with {} while reporting its environment: {stderr}", output.status),
                },
            });
        }
        parse_environment(&output.stdout, &self.interpreter).map_err(|reason| ServerError::BadInterpreter {
            interpreter: self.display(),
            origin: self.source,
            reason,
        })
    }
}

/// What the target interpreter reported about itself.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Environment {
    pub executable: String,
    pub base_executable: String,
    pub prefix: String,
    pub exec_prefix: String,
    pub base_prefix: String,
    pub base_exec_prefix: String,
    pub path: Vec<String>,
    pub site_dirs: Vec<String>,
    pub version: (u32, u32),
    pub implementation: String,
}

impl Environment {
    pub fn version_string(&self) -> String {
        format!("{}.{}", self.version.0, self.version.1)
    }
}

/// Parses the discovery output (the last line: warnings printed by `.pth` files may come first).
fn parse_environment(stdout: &[u8], interpreter: &OsStr) -> Result<Environment, String> {
    let text = String::from_utf8_lossy(stdout);
    let line = text.lines().rev().find(|line| !line.trim().is_empty()).unwrap_or_default();
    let mut env: Environment = serde_json::from_str(line)
        .map_err(|e| format!("it reported its environment in an unexpected form ({e}): {}", text.trim()))?;
    if env.executable.is_empty() {
        // sys.executable can be empty when Python cannot tell; the command we ran is the answer.
        env.executable = interpreter.to_string_lossy().into_owned();
    }
    if env.base_executable.is_empty() {
        env.base_executable = env.executable.clone();
    }
    Ok(env)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flag_wins_then_virtual_env_then_path() {
        let flag = Target::choose(Some("/x/python".into()), Some("/venv".into()));
        assert_eq!(flag, Target { interpreter: "/x/python".into(), source: Source::Flag });
        let venv = Target::choose(None, Some("/venv".into()));
        assert_eq!(venv.interpreter, OsString::from("/venv/bin/python"));
        assert_eq!(venv.source, Source::VirtualEnv);
        let path = Target::choose(None, Some("".into()));
        assert_eq!(path, Target { interpreter: "python3".into(), source: Source::Path });
    }

    #[test]
    fn parses_the_last_line_and_fills_an_empty_executable() {
        let out = br#"a .pth file said hello
{"executable": "", "base_executable": "", "prefix": "/v", "exec_prefix": "/v", "base_prefix": "/b",
"base_exec_prefix": "/b", "path": ["/b/lib/python3.11"], "site_dirs": ["/v/site"], "version": [3, 11],
"implementation": "cpython"}"#;
        let joined: Vec<u8> = String::from_utf8_lossy(out).replace(",\n", ", ").into_bytes();
        let env = parse_environment(&joined, OsStr::new("/v/bin/python")).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(env.executable, "/v/bin/python");
        assert_eq!(env.base_executable, "/v/bin/python");
        assert_eq!(env.version_string(), "3.11");
        assert_eq!(env.path, vec!["/b/lib/python3.11".to_string()]);
    }

    #[test]
    fn rejects_garbage() {
        let err = parse_environment(b"not json", OsStr::new("python3")).err().unwrap_or_default();
        assert!(err.contains("unexpected form"), "{err}");
    }

    #[test]
    fn a_missing_interpreter_is_a_clear_error() {
        let target = Target::choose(Some("/nonexistent/python".into()), None);
        let err = target.discover().err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("/nonexistent/python") && err.contains("--python"), "{err}");
    }
}
