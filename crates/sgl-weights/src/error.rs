use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error(
        "model `{name}` not found: `{local}` is not a diffusers folder (no model_index.json) and the Hugging Face \
         cache `{cache}` has no snapshot of it (set HF_HUB_CACHE or HF_HOME, or pass a local folder)"
    )]
    ModelNotFound { name: String, local: PathBuf, cache: PathBuf },
    #[error("`{path}` is not a usable diffusers model_index.json: {reason}")]
    BadModelIndex { path: PathBuf, reason: String },
    #[error("component folder `{dir}` has no .safetensors weights")]
    NoWeights { dir: PathBuf },
    #[error("shard `{shard}` named by `{index}` is missing")]
    MissingShard { index: PathBuf, shard: PathBuf },
    #[error("`{path}` is not a valid safetensors file: {reason}")]
    BadSafetensors { path: PathBuf, reason: String },
    #[error(
        "LoRA `{name}` not found: `{name}` is no local file or folder and the Hugging Face cache `{cache}` has no \
         snapshot of it with a .safetensors file"
    )]
    LoraNotFound { name: String, cache: PathBuf },
    #[error("LoRA `{path}` is outside the LoRA folder `{dir}` (--lora-dir) the server reads adapters from")]
    OutsideLoraDir { path: PathBuf, dir: PathBuf },
    #[error("`{path}` is not a LoRA file: {reason}")]
    NotALora { path: PathBuf, reason: String },
    #[error("cannot read `{path}`: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

impl WeightsError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io { path: path.into(), source }
    }
}
