//! Where a model's files are and what its weight files hold, without loading any tensor.
//!
//! * [`resolve_model`] turns a `--model-path` (a diffusers folder or a Hugging Face id) into a
//!   folder, looking in the local Hugging Face cache only: there is no network access at run time.
//! * [`component_weight_files`] lists a component's safetensors files, following a sharded
//!   checkpoint's `*.index.json` and checking that every shard is present.
//! * [`read_safetensors_header`] reads a file's tensor table (names, dtypes, shapes) from its header.
//! * [`lora`] keeps the LoRA adapters by nickname, each file checked by its header.

mod error;
pub mod lora;
mod resolve;
mod safetensors;

pub use error::WeightsError;
pub use resolve::{hf_cache_dir, resolve_model, ResolvedModel};
pub use safetensors::{component_weight_files, read_safetensors_header, SafetensorsHeader, TensorInfo};
