//! The LoRA registry: which adapter a nickname names, where its file is and what its header says, checked
//! before anything reaches the Python side (no tensor is read here).
//!
//! A path is a local `.safetensors` file, a folder holding one (diffusers' `pytorch_lora_weights.safetensors`
//! first), or a Hugging Face id found in the local cache (no downloads). With a LoRA folder set
//! (`--lora-dir`), a path must lie inside it once symlinks are resolved: a server then reads no file the
//! operator did not put there for the purpose, whatever a client sends. A file whose header is truncated or
//! holds no LoRA weights is refused here, before the model is touched.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::resolve::{find_snapshot, hf_cache_dir};
use crate::{read_safetensors_header, WeightsError};

/// The key layout of a LoRA file, as its names tell it (the Python side converts each to the model's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LoraFormat {
    /// diffusers / PEFT: `<component>.<module>.lora_A.weight` / `.lora_B.weight`.
    Diffusers,
    /// kohya: `lora_unet_<module>.lora_down.weight` / `.lora_up.weight` (musubi's Wan LoRAs too).
    Kohya,
    /// The original checkpoints' names: `diffusion_model.<module>...` (Wan, ai-toolkit's FLUX).
    Original,
    /// XLabs' FLUX.1 LoRAs: `double_blocks.<i>.processor.*`.
    XLabs,
}

/// A LoRA file, as its header describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoraFile {
    /// The `.safetensors` file itself.
    pub file: PathBuf,
    pub format: LoraFormat,
    pub tensors: usize,
    /// Bytes of tensor data.
    pub bytes: u64,
}

/// An adapter known by its nickname.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegisteredLora {
    pub nickname: String,
    /// The path as the user gave it.
    pub given: String,
    pub lora: LoraFile,
}

fn detect_format(names: &[&str]) -> Option<LoraFormat> {
    let any = |test: &dyn Fn(&str) -> bool| names.iter().any(|name| test(name));
    if any(&|name| name.starts_with("lora_unet_") || name.starts_with("lora_te")) {
        Some(LoraFormat::Kohya)
    } else if any(&|name| name.contains(".processor.")) {
        Some(LoraFormat::XLabs)
    } else if any(&|name| name.starts_with("diffusion_model.")) {
        Some(LoraFormat::Original)
    } else if any(&|name| name.contains(".lora_A.") || name.contains(".lora_B.") || name.contains(".lora.down.")) {
        Some(LoraFormat::Diffusers)
    } else {
        None
    }
}

/// The `.safetensors` file of `path`: the file itself, or the one such file of a folder
/// (`pytorch_lora_weights.safetensors` when there are several).
fn safetensors_file(path: &Path) -> Result<PathBuf, WeightsError> {
    if path.is_file() {
        return Ok(path.to_path_buf());
    }
    let preferred = path.join("pytorch_lora_weights.safetensors");
    if preferred.is_file() {
        return Ok(preferred);
    }
    let entries = std::fs::read_dir(path).map_err(|e| WeightsError::io(path, e))?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|file| file.is_file() && file.extension().is_some_and(|ext| ext == "safetensors"))
        .collect();
    files.sort();
    match files.len() {
        1 => Ok(files.remove(0)),
        count => Err(WeightsError::NotALora {
            path: path.to_path_buf(),
            reason: format!("the folder holds {count} .safetensors files; name one, or keep one there"),
        }),
    }
}

/// Reads what `path` (a file, a folder or a cached Hugging Face id) holds, confined to `lora_dir` when set.
pub fn inspect_lora(path: &str, lora_dir: Option<&Path>) -> Result<LoraFile, WeightsError> {
    let local = PathBuf::from(path);
    let found = if local.exists() {
        local
    } else {
        let has_weights = |dir: &Path| safetensors_file(dir).is_ok();
        find_snapshot(&hf_cache_dir(), path, has_weights)
            .ok_or_else(|| WeightsError::LoraNotFound { name: path.to_string(), cache: hf_cache_dir() })?
    };
    let file = safetensors_file(&found)?;
    let file = file.canonicalize().map_err(|e| WeightsError::io(&file, e))?;
    if let Some(dir) = lora_dir {
        let dir = dir.canonicalize().map_err(|e| WeightsError::io(dir, e))?;
        if !file.starts_with(&dir) {
            return Err(WeightsError::OutsideLoraDir { path: PathBuf::from(path), dir });
        }
    }
    let header = read_safetensors_header(&file)?;
    let names: Vec<&str> = header.tensors.keys().map(String::as_str).collect();
    let format = detect_format(&names).ok_or_else(|| WeightsError::NotALora {
        path: file.clone(),
        reason: format!(
            "none of its {} tensors is a LoRA weight (first: {:?})",
            names.len(),
            names.first().copied().unwrap_or("none")
        ),
    })?;
    let bytes = header.tensors.values().map(|info| info.data_offsets.1 - info.data_offsets.0).sum();
    Ok(LoraFile { file, format, tensors: names.len(), bytes })
}

/// Nickname → adapter, for one engine. Re-registering a nickname with a path replaces it.
///
/// It also keeps the books of the adapters' tensors the Python side holds in memory (CPU), least recently
/// used first, against a byte budget: [`LoraRegistry::plan_use`] says which to drop when a `set` or a batch's
/// requests would pass it. A dropped adapter stays registered: set again by its nickname, it is read from its file again.
#[derive(Debug, Default)]
pub struct LoraRegistry {
    lora_dir: Option<PathBuf>,
    adapters: BTreeMap<String, RegisteredLora>,
    budget_bytes: u64,
    /// Nicknames whose tensors are in memory, least recently used first.
    in_memory: Vec<String>,
}

/// Why a nickname could not be registered or found.
#[derive(Debug, thiserror::Error)]
pub enum LoraRegistryError {
    #[error("no adapter is registered as `{0}`; give its lora_path")]
    UnknownNickname(String),
    #[error(transparent)]
    Weights(#[from] WeightsError),
}

impl LoraRegistry {
    pub fn new(lora_dir: Option<PathBuf>, budget_bytes: u64) -> Self {
        Self { lora_dir, adapters: BTreeMap::new(), budget_bytes, in_memory: Vec::new() }
    }

    /// `nicknames` (registered) are about to be set, or read for a batch's requests: they become the most
    /// recent, and the least recent others leave the books and are returned for dropping until the adapters in
    /// memory fit the budget. Adapters a target still has set cannot be dropped: the Python side keeps them,
    /// and [`LoraRegistry::reconcile`] learns so.
    pub fn plan_use(&mut self, nicknames: &[&str]) -> Vec<String> {
        self.in_memory.retain(|name| !nicknames.contains(&name.as_str()));
        self.in_memory.extend(nicknames.iter().map(|name| name.to_string()));
        let bytes = |name: &str| self.adapters.get(name).map_or(0, |adapter| adapter.lora.bytes);
        let mut total: u64 = self.in_memory.iter().map(|name| bytes(name)).sum();
        let mut dropped = Vec::new();
        for name in &self.in_memory {
            if total <= self.budget_bytes {
                break;
            }
            if nicknames.contains(&name.as_str()) {
                continue;
            }
            total -= bytes(name);
            dropped.push(name.clone());
        }
        self.in_memory.retain(|name| !dropped.contains(name));
        dropped
    }

    /// The nicknames the Python side says it holds after a command, in the registry's recency order.
    pub fn reconcile(&mut self, loaded: &[String]) {
        self.in_memory.retain(|name| loaded.contains(name));
        for name in loaded {
            if !self.in_memory.contains(name) {
                self.in_memory.push(name.clone());
            }
        }
    }

    /// Bytes of the adapters in memory.
    pub fn bytes_in_memory(&self) -> u64 {
        self.in_memory.iter().filter_map(|name| self.adapters.get(name)).map(|adapter| adapter.lora.bytes).sum()
    }

    /// Registers `nickname` for `path`, checking the file; without a path, the adapter registered before.
    pub fn register(&mut self, nickname: &str, path: Option<&str>) -> Result<&RegisteredLora, LoraRegistryError> {
        if let Some(path) = path {
            let lora = inspect_lora(path, self.lora_dir.as_deref())?;
            let entry = RegisteredLora { nickname: nickname.to_string(), given: path.to_string(), lora };
            self.adapters.insert(nickname.to_string(), entry);
        }
        self.get(nickname)
    }

    pub fn get(&self, nickname: &str) -> Result<&RegisteredLora, LoraRegistryError> {
        self.adapters.get(nickname).ok_or_else(|| LoraRegistryError::UnknownNickname(nickname.to_string()))
    }

    pub fn adapters(&self) -> impl Iterator<Item = &RegisteredLora> {
        self.adapters.values()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A safetensors file holding zero-filled f32 tensors of the given names and shapes.
    fn write_safetensors(path: &Path, tensors: &[(&str, &[u64])]) {
        let mut header = serde_json::Map::new();
        let mut offset = 0u64;
        for (name, shape) in tensors {
            let bytes = shape.iter().product::<u64>() * 4;
            header.insert(
                (*name).to_string(),
                serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + bytes]}),
            );
            offset += bytes;
        }
        let json = serde_json::to_vec(&header).unwrap();
        let mut data = (json.len() as u64).to_le_bytes().to_vec();
        data.extend_from_slice(&json);
        data.resize(data.len() + offset as usize, 0);
        std::fs::write(path, data).unwrap();
    }

    #[test]
    fn formats_are_told_by_their_names() {
        let dir = tempfile::tempdir().unwrap();
        let cases: [(&str, LoraFormat); 4] = [
            ("transformer.blocks.0.attn1.to_q.lora_A.weight", LoraFormat::Diffusers),
            ("lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight", LoraFormat::Kohya),
            ("diffusion_model.blocks.0.self_attn.q.lora_down.weight", LoraFormat::Original),
            ("double_blocks.0.processor.qkv_lora1.down.weight", LoraFormat::XLabs),
        ];
        for (index, (name, format)) in cases.into_iter().enumerate() {
            let file = dir.path().join(format!("{index}.safetensors"));
            write_safetensors(&file, &[(name, &[4, 8])]);
            let lora = inspect_lora(file.to_str().unwrap(), None).unwrap();
            assert_eq!((lora.format, lora.tensors, lora.bytes), (format, 1, 128));
        }
    }

    #[test]
    fn what_is_no_lora_is_refused_before_anything_loads() {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("model.safetensors");
        write_safetensors(&model, &[("blocks.0.attn1.to_q.weight", &[8, 8])]);
        let err = inspect_lora(model.to_str().unwrap(), None).unwrap_err().to_string();
        assert!(err.contains("not a LoRA file") && err.contains("blocks.0.attn1.to_q.weight"), "{err}");
        let cut = dir.path().join("cut.safetensors");
        std::fs::write(&cut, &std::fs::read(&model).unwrap()[..20]).unwrap();
        assert!(matches!(inspect_lora(cut.to_str().unwrap(), None), Err(WeightsError::BadSafetensors { .. })));
        assert!(matches!(inspect_lora("no/such-lora", None), Err(WeightsError::LoraNotFound { .. })));
    }

    #[test]
    fn a_lora_folder_confines_paths_and_folders_resolve_to_their_file() {
        let root = tempfile::tempdir().unwrap();
        let allowed = root.path().join("loras");
        let adapter = allowed.join("style");
        std::fs::create_dir_all(&adapter).unwrap();
        write_safetensors(
            &adapter.join("pytorch_lora_weights.safetensors"),
            &[("transformer.x.lora_A.weight", &[2, 4])],
        );
        let outside = root.path().join("outside.safetensors");
        write_safetensors(&outside, &[("transformer.x.lora_A.weight", &[2, 4])]);
        let mut registry = LoraRegistry::new(Some(allowed.clone()), u64::MAX);
        let style = registry.register("style", Some(adapter.to_str().unwrap())).unwrap();
        assert!(style.lora.file.ends_with("style/pytorch_lora_weights.safetensors"));
        // `..` cannot climb out.
        let climbing = allowed.join("..").join("outside.safetensors");
        let err = registry.register("evil", Some(climbing.to_str().unwrap())).unwrap_err();
        assert!(matches!(err, LoraRegistryError::Weights(WeightsError::OutsideLoraDir { .. })), "{err}");
        // A nickname without a path is the one registered before, or an error naming it.
        assert_eq!(registry.register("style", None).unwrap().given, adapter.to_str().unwrap());
        assert!(matches!(registry.register("other", None), Err(LoraRegistryError::UnknownNickname(_))));
        assert_eq!(registry.adapters().count(), 1);
    }

    #[test]
    fn the_least_recently_used_adapters_leave_memory_first_when_over_budget() {
        let dir = tempfile::tempdir().unwrap();
        // 128 bytes of tensor data each.
        let mut registry = LoraRegistry::new(None, 300);
        for name in ["a", "b", "c", "d"] {
            let file = dir.path().join(format!("{name}.safetensors"));
            write_safetensors(&file, &[("transformer.x.lora_A.weight", &[4, 8])]);
            registry.register(name, Some(file.to_str().unwrap())).unwrap();
        }
        assert!(registry.plan_use(&["a"]).is_empty());
        // a, b, c: 384 bytes > 300: a, the least recent, goes (b and c are being set).
        assert_eq!(registry.plan_use(&["b", "c"]), ["a"]);
        assert_eq!(registry.bytes_in_memory(), 256); // the plan takes a off the books at once
        registry.reconcile(&["b".into(), "c".into()]);
        assert_eq!(registry.plan_use(&["d"]), ["b"]);
        // The Python side kept b (a target still has it set): the books follow it.
        registry.reconcile(&["b".into(), "c".into(), "d".into()]);
        assert_eq!(registry.bytes_in_memory(), 384);
        registry.reconcile(&["c".into(), "d".into()]);
        assert_eq!(registry.bytes_in_memory(), 256);
        // Setting a again reads it again: it stays registered.
        assert_eq!(registry.get("a").unwrap().nickname, "a");
        assert_eq!(registry.plan_use(&["a"]), ["c"]);
    }
}
