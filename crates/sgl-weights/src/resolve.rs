use std::path::{Path, PathBuf};

use crate::WeightsError;

/// A model folder ready to load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedModel {
    pub dir: PathBuf,
    /// The Hugging Face id, when the model was named by one.
    pub hf_id: Option<String>,
    /// `_class_name` of `model_index.json`, e.g. `FluxPipeline`.
    pub pipeline_class: String,
}

/// The Hugging Face hub cache folder, as huggingface_hub computes it: `HF_HUB_CACHE`, else
/// `HF_HOME/hub`, else `~/.cache/huggingface/hub` (honouring `XDG_CACHE_HOME`).
pub fn hf_cache_dir() -> PathBuf {
    if let Some(dir) = non_empty_env("HF_HUB_CACHE") {
        return PathBuf::from(dir);
    }
    if let Some(home) = non_empty_env("HF_HOME") {
        return PathBuf::from(home).join("hub");
    }
    let cache = non_empty_env("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| non_empty_env("HOME").map(|home| PathBuf::from(home).join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"));
    cache.join("huggingface").join("hub")
}

fn non_empty_env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// Resolves a local diffusers folder or a Hugging Face id (`org/name`) from the local cache.
pub fn resolve_model(name: &str) -> Result<ResolvedModel, WeightsError> {
    let local = PathBuf::from(name);
    if local.join("model_index.json").is_file() {
        let pipeline_class = read_pipeline_class(&local)?;
        let dir = local.canonicalize().map_err(|e| WeightsError::io(&local, e))?;
        return Ok(ResolvedModel { dir, hf_id: None, pipeline_class });
    }
    let cache = hf_cache_dir();
    if let Some(dir) = find_snapshot(&cache, name, |dir| dir.join("model_index.json").is_file()) {
        let pipeline_class = read_pipeline_class(&dir)?;
        return Ok(ResolvedModel { dir, hf_id: Some(name.to_string()), pipeline_class });
    }
    Err(WeightsError::ModelNotFound { name: name.to_string(), local, cache })
}

/// `models--{org}--{name}/snapshots/{revision}`: the revision `refs/main` points at, else any
/// snapshot that `usable` accepts (a cache filled by `snapshot_download(revision=...)`).
pub(crate) fn find_snapshot(cache: &Path, id: &str, usable: impl Fn(&Path) -> bool) -> Option<PathBuf> {
    let (org, name) = id.split_once('/')?;
    if org.is_empty() || name.is_empty() || name.contains('/') {
        return None;
    }
    let repo = cache.join(format!("models--{org}--{name}"));
    let snapshots = repo.join("snapshots");
    if let Ok(revision) = std::fs::read_to_string(repo.join("refs").join("main")) {
        let dir = snapshots.join(revision.trim());
        if usable(&dir) {
            return Some(dir);
        }
    }
    let mut candidates: Vec<PathBuf> = std::fs::read_dir(&snapshots)
        .ok()?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|dir| usable(dir))
        .collect();
    candidates.sort();
    candidates.pop()
}

fn read_pipeline_class(dir: &Path) -> Result<String, WeightsError> {
    let path = dir.join("model_index.json");
    let text = std::fs::read_to_string(&path).map_err(|e| WeightsError::io(&path, e))?;
    let index: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| WeightsError::BadModelIndex { path: path.clone(), reason: e.to_string() })?;
    // A custom pipeline (code shipped in the folder) names `[module, class]`: the class is what loaders match.
    let class = match index.get("_class_name") {
        Some(serde_json::Value::String(class)) => Some(class.clone()),
        Some(serde_json::Value::Array(parts)) if parts.len() == 2 => parts[1].as_str().map(str::to_string),
        _ => None,
    };
    class.ok_or_else(|| WeightsError::BadModelIndex {
        path,
        reason: "no `_class_name` string (or `[module, class]` pair)".into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_model(dir: &Path, class: &str) {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("model_index.json"), format!(r#"{{"_class_name": "{class}"}}"#)).unwrap();
    }

    #[test]
    fn local_folders_and_cache_snapshots_resolve() {
        let tmp = tempfile::tempdir().unwrap();
        let local = tmp.path().join("local");
        write_model(&local, "FluxPipeline");
        let resolved = resolve_model(local.to_str().unwrap()).unwrap();
        assert_eq!(resolved.pipeline_class, "FluxPipeline");
        assert_eq!(resolved.hf_id, None);

        let cache = tmp.path().join("hub");
        let repo = cache.join("models--black-forest-labs--FLUX.1-dev");
        write_model(&repo.join("snapshots").join("abc123"), "FluxPipeline");
        write_model(&repo.join("snapshots").join("old"), "Other");
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs").join("main"), "abc123\n").unwrap();
        let has_index = |dir: &Path| dir.join("model_index.json").is_file();
        assert_eq!(
            find_snapshot(&cache, "black-forest-labs/FLUX.1-dev", has_index),
            Some(repo.join("snapshots").join("abc123"))
        );
        assert_eq!(find_snapshot(&cache, "black-forest-labs/missing", has_index), None);
        assert_eq!(find_snapshot(&cache, "not-an-id", has_index), None);
    }

    #[test]
    fn a_custom_pipeline_names_its_class_after_its_module() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("model_index.json"), r#"{"_class_name": ["my_pipeline", "MyPipeline"]}"#)
            .unwrap();
        assert_eq!(resolve_model(tmp.path().to_str().unwrap()).unwrap().pipeline_class, "MyPipeline");
        std::fs::write(tmp.path().join("model_index.json"), r#"{"_class_name": ["only_one"]}"#).unwrap();
        assert!(resolve_model(tmp.path().to_str().unwrap()).unwrap_err().to_string().contains("_class_name"));
    }

    #[test]
    fn a_missing_model_names_both_places() {
        let err = resolve_model("/definitely/not/here-org/model").unwrap_err();
        let text = err.to_string();
        assert!(text.contains("/definitely/not/here-org/model"), "{text}");
        assert!(text.contains("cache"), "{text}");
    }
}
