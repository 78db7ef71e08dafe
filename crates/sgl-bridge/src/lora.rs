//! LoRA commands on the worker thread: the registry (Rust) checks each adapter's path and header, then the
//! Python side loads, checks against the model and merges (`sgl_diffusion.lora`).
//!
//! The command the Python side receives names files, never user paths: every `set` adapter has been found,
//! confined to `--lora-dir` and its header read before Python sees it.

use serde::Serialize;
use sgl_core::lora::{LoraCommand, LoraState, LoraTarget};
use sgl_scheduler::{ExecError, ExecErrorKind};
use sgl_weights::lora::{LoraFormat, LoraRegistry, LoraRegistryError};

/// One adapter as Python loads it.
#[derive(Debug, Serialize)]
struct PythonAdapter<'a> {
    nickname: &'a str,
    /// The user's path (for list_loras) and the file it resolved to.
    path: &'a str,
    file: String,
    format: LoraFormat,
    target: LoraTarget,
    strength: f64,
}

/// The command as the Python executor's `lora_command` takes it.
#[derive(Debug, Serialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum PythonCommand<'a> {
    /// `drop`: adapters whose tensors to let go of (unless a target still has them set), least recent first.
    Set {
        adapters: Vec<PythonAdapter<'a>>,
        drop: Vec<String>,
    },
    Merge {
        target: LoraTarget,
        strength: Option<f64>,
    },
    Unmerge {
        target: LoraTarget,
    },
    List,
}

fn invalid(field: &str, message: String) -> ExecError {
    ExecError::new(ExecErrorKind::InvalidInput { field: Some(field.to_string()) }, message)
}

/// Checks `command` against the registry (registering `set`'s new paths) and returns the JSON the Python
/// side runs. A bad path or file is an `InvalidInput` naming `lora_path` (or `lora_nickname` for an unknown
/// nickname), and nothing reaches Python.
pub(crate) fn python_command(registry: &mut LoraRegistry, command: &str) -> Result<String, ExecError> {
    let command: LoraCommand =
        serde_json::from_str(command).map_err(|e| ExecError::internal(format!("malformed LoRA command: {e}")))?;
    let python = match &command {
        LoraCommand::Set { adapters } => {
            let mut resolved = Vec::with_capacity(adapters.len());
            for adapter in adapters {
                let registered =
                    registry.register(&adapter.nickname, adapter.path.as_deref()).map_err(|err| match err {
                        LoraRegistryError::UnknownNickname(_) => invalid("lora_nickname", err.to_string()),
                        LoraRegistryError::Weights(err) => invalid("lora_path", err.to_string()),
                    })?;
                resolved.push((adapter, registered.given.clone(), registered.lora.clone()));
            }
            let nicknames: Vec<&str> = adapters.iter().map(|adapter| adapter.nickname.as_str()).collect();
            let drop = registry.plan_use(&nicknames);
            PythonCommand::Set {
                drop,
                adapters: resolved
                    .iter()
                    .map(|(adapter, given, lora)| PythonAdapter {
                        nickname: &adapter.nickname,
                        path: given,
                        file: lora.file.to_string_lossy().into_owned(),
                        format: lora.format,
                        target: adapter.target,
                        strength: adapter.strength,
                    })
                    .collect(),
            }
            .to_json()?
        }
        LoraCommand::Merge { target, strength } => {
            PythonCommand::Merge { target: *target, strength: *strength }.to_json()?
        }
        LoraCommand::Unmerge { target } => PythonCommand::Unmerge { target: *target }.to_json()?,
        LoraCommand::List => PythonCommand::List.to_json()?,
    };
    Ok(python)
}

/// Takes note of the adapters the Python side holds after a command (its answer, `LoraState`).
pub(crate) fn reconcile(registry: &mut LoraRegistry, answer: &str) -> Result<(), ExecError> {
    let state: LoraState = serde_json::from_str(answer)
        .map_err(|e| ExecError::internal(format!("the executor answered malformed LoRA state: {e}")))?;
    let loaded: Vec<String> = state.loaded_adapters.into_iter().map(|adapter| adapter.nickname).collect();
    registry.reconcile(&loaded);
    Ok(())
}

impl PythonCommand<'_> {
    fn to_json(&self) -> Result<String, ExecError> {
        serde_json::to_string(self).map_err(|e| ExecError::internal(format!("cannot encode the LoRA command: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_nicknames_and_missing_files_never_reach_python() {
        let mut registry = LoraRegistry::new(None, u64::MAX);
        let set = |path: Option<&str>| {
            serde_json::json!({"op": "set", "adapters": [
                {"nickname": "style", "path": path, "target": "all", "strength": 1.0}
            ]})
            .to_string()
        };
        let err = python_command(&mut registry, &set(None)).unwrap_err();
        assert_eq!(err.kind, ExecErrorKind::InvalidInput { field: Some("lora_nickname".into()) });
        let err = python_command(&mut registry, &set(Some("/no/such.safetensors"))).unwrap_err();
        assert_eq!(err.kind, ExecErrorKind::InvalidInput { field: Some("lora_path".into()) });
        assert!(err.message.contains("/no/such.safetensors"), "{}", err.message);
        let list = python_command(&mut registry, r#"{"op": "list"}"#).unwrap();
        assert_eq!(list, r#"{"op":"list"}"#);
    }
}
