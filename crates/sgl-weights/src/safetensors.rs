use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::WeightsError;

/// Largest header we accept; real headers are a few hundred KiB even for 14B-parameter models.
const MAX_HEADER_BYTES: u64 = 100 * 1024 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct TensorInfo {
    pub dtype: String,
    pub shape: Vec<u64>,
    pub data_offsets: (u64, u64),
}

/// The tensor table at the start of a safetensors file.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SafetensorsHeader {
    pub tensors: BTreeMap<String, TensorInfo>,
    pub metadata: BTreeMap<String, String>,
}

/// Reads the header of a safetensors file (8-byte little-endian length, then JSON).
pub fn read_safetensors_header(path: &Path) -> Result<SafetensorsHeader, WeightsError> {
    let bad = |reason: String| WeightsError::BadSafetensors { path: path.to_path_buf(), reason };
    let mut file = std::fs::File::open(path).map_err(|e| WeightsError::io(path, e))?;
    let file_len = file.metadata().map_err(|e| WeightsError::io(path, e))?.len();
    let mut len_bytes = [0u8; 8];
    file.read_exact(&mut len_bytes).map_err(|e| bad(format!("no header length: {e}")))?;
    let header_len = u64::from_le_bytes(len_bytes);
    if header_len > MAX_HEADER_BYTES || header_len + 8 > file_len {
        return Err(bad(format!("header length {header_len} does not fit a {file_len}-byte file")));
    }
    let mut json = vec![0u8; usize::try_from(header_len).map_err(|e| bad(e.to_string()))?];
    file.read_exact(&mut json).map_err(|e| bad(e.to_string()))?;
    let raw: BTreeMap<String, serde_json::Value> = serde_json::from_slice(&json).map_err(|e| bad(e.to_string()))?;
    let data_len = file_len - 8 - header_len;
    let mut header = SafetensorsHeader::default();
    for (name, value) in raw {
        if name == "__metadata__" {
            header.metadata = serde_json::from_value(value).map_err(|e| bad(format!("__metadata__: {e}")))?;
            continue;
        }
        let info: TensorInfo = serde_json::from_value(value).map_err(|e| bad(format!("tensor `{name}`: {e}")))?;
        if info.data_offsets.0 > info.data_offsets.1 || info.data_offsets.1 > data_len {
            return Err(bad(format!("tensor `{name}` lies outside the file's data")));
        }
        header.tensors.insert(name, info);
    }
    Ok(header)
}

/// The safetensors files holding one component's weights (e.g. `<model>/transformer`).
///
/// A sharded checkpoint is read through its `*.safetensors.index.json`, and every shard it names
/// must exist; otherwise every `.safetensors` file in the folder counts, preferring full-precision
/// files over dtype variants such as `diffusion_pytorch_model.fp16.safetensors`.
pub fn component_weight_files(dir: &Path) -> Result<Vec<PathBuf>, WeightsError> {
    let entries = std::fs::read_dir(dir).map_err(|e| WeightsError::io(dir, e))?;
    let mut indexes = Vec::new();
    let mut files = Vec::new();
    for entry in entries {
        let path = entry.map_err(|e| WeightsError::io(dir, e))?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
        if name.ends_with(".safetensors.index.json") {
            indexes.push(path);
        } else if name.ends_with(".safetensors") {
            files.push(path);
        }
    }
    indexes.sort();
    if let Some(index) = indexes.into_iter().find(|p| !is_variant(p)) {
        return shards_of(&index);
    }
    files.sort();
    let plain: Vec<PathBuf> = files.iter().filter(|p| !is_variant(p)).cloned().collect();
    let chosen = if plain.is_empty() { files } else { plain };
    if chosen.is_empty() {
        return Err(WeightsError::NoWeights { dir: dir.to_path_buf() });
    }
    Ok(chosen)
}

fn is_variant(path: &Path) -> bool {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    [".fp16.", ".bf16.", ".fp32."].iter().any(|v| name.contains(v))
}

#[derive(Deserialize)]
struct ShardIndex {
    weight_map: BTreeMap<String, String>,
}

fn shards_of(index: &Path) -> Result<Vec<PathBuf>, WeightsError> {
    let text = std::fs::read_to_string(index).map_err(|e| WeightsError::io(index, e))?;
    let parsed: ShardIndex = serde_json::from_str(&text)
        .map_err(|e| WeightsError::BadSafetensors { path: index.to_path_buf(), reason: e.to_string() })?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let names: BTreeSet<&String> = parsed.weight_map.values().collect();
    names
        .into_iter()
        .map(|name| {
            let shard = dir.join(name);
            if shard.is_file() {
                Ok(shard)
            } else {
                Err(WeightsError::MissingShard { index: index.to_path_buf(), shard })
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_safetensors(path: &Path, header: &str, data_len: usize) {
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend(std::iter::repeat_n(0u8, data_len));
        std::fs::write(path, bytes).unwrap();
    }

    #[test]
    fn headers_are_parsed_and_checked() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("a.safetensors");
        write_safetensors(
            &path,
            r#"{"__metadata__":{"format":"pt"},"w":{"dtype":"BF16","shape":[2,3],"data_offsets":[0,12]}}"#,
            12,
        );
        let header = read_safetensors_header(&path).unwrap();
        assert_eq!(header.tensors["w"].shape, vec![2, 3]);
        assert_eq!(header.metadata["format"], "pt");

        let short = tmp.path().join("short.safetensors");
        write_safetensors(&short, r#"{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#, 8);
        assert!(matches!(read_safetensors_header(&short), Err(WeightsError::BadSafetensors { .. })));
        std::fs::write(tmp.path().join("junk.safetensors"), b"\xff\xff\xff\xff\xff\xff\xff\xff").unwrap();
        assert!(read_safetensors_header(&tmp.path().join("junk.safetensors")).is_err());
    }

    #[test]
    fn sharded_components_follow_their_index() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        for name in ["m-00001-of-00002.safetensors", "m-00002-of-00002.safetensors"] {
            write_safetensors(&dir.join(name), "{}", 0);
        }
        std::fs::write(
            dir.join("m.safetensors.index.json"),
            r#"{"metadata":{},"weight_map":{"a":"m-00001-of-00002.safetensors","b":"m-00002-of-00002.safetensors","c":"m-00001-of-00002.safetensors"}}"#,
        )
        .unwrap();
        let files = component_weight_files(dir).unwrap();
        assert_eq!(files.len(), 2);
        std::fs::remove_file(dir.join("m-00002-of-00002.safetensors")).unwrap();
        assert!(matches!(component_weight_files(dir), Err(WeightsError::MissingShard { .. })));
    }

    #[test]
    fn single_files_prefer_full_precision_over_variants() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        write_safetensors(&dir.join("diffusion_pytorch_model.safetensors"), "{}", 0);
        write_safetensors(&dir.join("diffusion_pytorch_model.fp16.safetensors"), "{}", 0);
        assert_eq!(component_weight_files(dir).unwrap(), vec![dir.join("diffusion_pytorch_model.safetensors")]);
        let empty = tempfile::tempdir().unwrap();
        assert!(matches!(component_weight_files(empty.path()), Err(WeightsError::NoWeights { .. })));
    }
}
