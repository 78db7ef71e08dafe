//! LoRA management requests (`POST /v1/set_lora`, `/v1/merge_lora_weights`, `/v1/unmerge_lora_weights`,
//! `GET /v1/list_loras`; `DiffGenerator.set_lora`, `.merge_lora`, `.unmerge_lora`, `.list_loras`), declared
//! once here with their checks, and the command the engine's worker runs between batches.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::fields::{FieldValue, ValueKind, ValueType};
use crate::ValidationError;

/// Most adapters one request may carry.
pub const MAX_REQUEST_LORAS: usize = 8;

/// One adapter of a request's `lora`: a nickname registered with set_lora and its strength.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RequestLora {
    pub nickname: String,
    /// Default 1.0.
    #[serde(default = "full_strength")]
    pub strength: f64,
}

fn full_strength() -> f64 {
    1.0
}

impl FieldValue for RequestLora {
    const TYPE: ValueType = ValueType::of(ValueKind::Object);
}

/// A request's adapters, checked: at most [`MAX_REQUEST_LORAS`], named, each once, finite strengths.
pub fn check_request_loras(loras: &[RequestLora]) -> Result<Vec<RequestLora>, ValidationError> {
    if loras.len() > MAX_REQUEST_LORAS {
        return Err(ValidationError::new(
            "lora",
            format!("names {} adapters; at most {MAX_REQUEST_LORAS}", loras.len()),
        ));
    }
    for (index, lora) in loras.iter().enumerate() {
        if lora.nickname.trim().is_empty() {
            return Err(ValidationError::new("lora", format!("entry {index} names no adapter")));
        }
        if loras[..index].iter().any(|earlier| earlier.nickname == lora.nickname) {
            return Err(ValidationError::new("lora", format!("names {:?} twice", lora.nickname)));
        }
        check_strength("lora", lora.strength)?;
    }
    Ok(loras.to_vec())
}

/// Which denoiser an adapter applies to. `all`: every denoiser the model has (Wan2.2 A14B: both experts).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum LoraTarget {
    All,
    Transformer,
    #[serde(rename = "transformer_2")]
    Transformer2,
    /// A distillation critic (SGLang's `fake_score_transformer`); no served model has one.
    Critic,
}

const TARGETS: &str = "all, transformer, transformer_2, critic";

impl LoraTarget {
    pub fn parse(field: &str, value: &str) -> Result<Self, ValidationError> {
        match value {
            "all" => Ok(Self::All),
            "transformer" => Ok(Self::Transformer),
            "transformer_2" => Ok(Self::Transformer2),
            "critic" => Ok(Self::Critic),
            other => Err(ValidationError::new(field, format!("unknown LoRA target {other:?}; one of {TARGETS}"))),
        }
    }
}

/// A value given once for every adapter or once per adapter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum OneOrMany<T> {
    One(T),
    Many(Vec<T>),
}

impl<T: Clone> OneOrMany<T> {
    /// `count` values: the one repeated, or the list, which must have `count` entries.
    fn spread(&self, field: &str, count: usize) -> Result<Vec<T>, ValidationError> {
        match self {
            Self::One(value) => Ok(vec![value.clone(); count]),
            Self::Many(values) if values.len() == count => Ok(values.clone()),
            Self::Many(values) => Err(ValidationError::new(
                field,
                format!("has {} entries for {count} adapters; give one value or one per lora_nickname", values.len()),
            )),
        }
    }
}

/// `POST /v1/set_lora`: loads adapters (or re-activates cached nicknames) and merges them, replacing what the
/// targets had merged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetLoraRequest {
    /// One name or a list; names an adapter for later calls (and for requests' `lora`).
    pub lora_nickname: OneOrMany<String>,
    /// The adapter's .safetensors file, a folder holding one, or a Hugging Face id in the local cache; one per
    /// nickname. Left out (or null) for a nickname loaded before.
    #[serde(default)]
    pub lora_path: Option<OneOrMany<Option<String>>>,
    /// all (default), transformer, transformer_2 or critic; one for every adapter or one per nickname.
    #[serde(default)]
    pub target: Option<OneOrMany<String>>,
    /// Strength of the merge (default 1.0); one for every adapter or one per nickname.
    #[serde(default)]
    pub strength: Option<OneOrMany<f64>>,
    /// SGLang's merge modes: auto and merge merge the weights; dynamic (an unmerged low-rank path) is refused.
    #[serde(default)]
    pub merge_mode: Option<String>,
}

/// `POST /v1/merge_lora_weights`: merges again what `unmerge_lora_weights` took out.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MergeLoraRequest {
    /// all (default), transformer, transformer_2 or critic.
    #[serde(default)]
    pub target: Option<String>,
    /// The strength to merge at; default: each adapter's own from set_lora.
    #[serde(default)]
    pub strength: Option<f64>,
}

/// `POST /v1/unmerge_lora_weights`: restores the targets' base weights exactly.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UnmergeLoraRequest {
    /// all (default), transformer, transformer_2 or critic.
    #[serde(default)]
    pub target: Option<String>,
}

/// One adapter of a set_lora call, every default applied.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraAssignment {
    pub nickname: String,
    pub path: Option<String>,
    pub target: LoraTarget,
    pub strength: f64,
}

fn check_strength(field: &str, strength: f64) -> Result<f64, ValidationError> {
    if strength.is_finite() {
        Ok(strength)
    } else {
        Err(ValidationError::new(field, format!("must be a finite number, got {strength}")))
    }
}

fn target_or_all(field: &str, target: Option<&str>) -> Result<LoraTarget, ValidationError> {
    target.map_or(Ok(LoraTarget::All), |value| LoraTarget::parse(field, value))
}

impl SetLoraRequest {
    /// The adapters to set, in order, each with its path, target and strength.
    pub fn assignments(&self) -> Result<Vec<LoraAssignment>, ValidationError> {
        let nicknames = match &self.lora_nickname {
            OneOrMany::One(name) => vec![name.clone()],
            OneOrMany::Many(names) => names.clone(),
        };
        if nicknames.is_empty() {
            return Err(ValidationError::new("lora_nickname", "names no adapter"));
        }
        if let Some(name) = nicknames.iter().find(|name| name.trim().is_empty()) {
            return Err(ValidationError::new("lora_nickname", format!("{name:?} is no name")));
        }
        match self.merge_mode.as_deref() {
            None | Some("auto") | Some("merge") => {}
            Some("dynamic") => {
                return Err(ValidationError::new(
                    "merge_mode",
                    "dynamic (an unmerged LoRA forward) is not served; requests choose their own adapters through \
                     their `lora` field instead; use auto or merge",
                ))
            }
            Some(other) => {
                return Err(ValidationError::new("merge_mode", format!("{other:?} is none of auto, merge, dynamic")))
            }
        }
        let count = nicknames.len();
        let paths = match &self.lora_path {
            None => vec![None; count],
            Some(paths) => paths.spread("lora_path", count)?,
        };
        let targets = match &self.target {
            None => vec![LoraTarget::All; count],
            Some(targets) => targets
                .spread("target", count)?
                .iter()
                .map(|target| LoraTarget::parse("target", target))
                .collect::<Result<_, _>>()?,
        };
        let strengths = match &self.strength {
            None => vec![1.0; count],
            Some(strengths) => strengths
                .spread("strength", count)?
                .into_iter()
                .map(|strength| check_strength("strength", strength))
                .collect::<Result<_, _>>()?,
        };
        Ok(nicknames
            .into_iter()
            .zip(paths)
            .zip(targets.into_iter().zip(strengths))
            .map(|((nickname, path), (target, strength))| LoraAssignment { nickname, path, target, strength })
            .collect())
    }
}

/// What the engine's worker runs between batches: every request above, checked, and `list`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum LoraCommand {
    Set { adapters: Vec<LoraAssignment> },
    Merge { target: LoraTarget, strength: Option<f64> },
    Unmerge { target: LoraTarget },
    List,
}

impl LoraCommand {
    pub fn set(request: &SetLoraRequest) -> Result<Self, ValidationError> {
        Ok(Self::Set { adapters: request.assignments()? })
    }

    pub fn merge(request: &MergeLoraRequest) -> Result<Self, ValidationError> {
        let strength = request.strength.map(|strength| check_strength("strength", strength)).transpose()?;
        Ok(Self::Merge { target: target_or_all("target", request.target.as_deref())?, strength })
    }

    pub fn unmerge(request: &UnmergeLoraRequest) -> Result<Self, ValidationError> {
        Ok(Self::Unmerge { target: target_or_all("target", request.target.as_deref())? })
    }
}

/// An adapter the engine has loaded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct LoadedLora {
    pub nickname: String,
    pub path: String,
}

/// An adapter set on a denoiser.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ActiveLora {
    pub nickname: String,
    pub path: String,
    /// Whether its weights are merged now (false after unmerge_lora_weights).
    pub merged: bool,
    pub strength: f64,
}

/// `GET /v1/list_loras`, and every LoRA command's answer: the engine's adapters after the command.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct LoraState {
    pub loaded_adapters: Vec<LoadedLora>,
    /// Per denoiser (transformer, transformer_2), the adapters set on it in merge order.
    pub active: std::collections::BTreeMap<String, Vec<ActiveLora>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(json: serde_json::Value) -> Result<Vec<LoraAssignment>, ValidationError> {
        serde_json::from_value::<SetLoraRequest>(json).unwrap().assignments()
    }

    #[test]
    fn scalars_apply_to_every_adapter_and_lists_go_one_per_nickname() {
        let adapters = set(serde_json::json!({
            "lora_nickname": ["a", "b"], "lora_path": ["/a.safetensors", null], "target": "transformer", "strength": [0.5, 2]
        }))
        .unwrap();
        assert_eq!(
            adapters,
            vec![
                LoraAssignment {
                    nickname: "a".into(),
                    path: Some("/a.safetensors".into()),
                    target: LoraTarget::Transformer,
                    strength: 0.5
                },
                LoraAssignment { nickname: "b".into(), path: None, target: LoraTarget::Transformer, strength: 2.0 },
            ]
        );
        let one = set(serde_json::json!({"lora_nickname": "x", "lora_path": "/x"})).unwrap();
        assert_eq!((one[0].target, one[0].strength), (LoraTarget::All, 1.0));
    }

    #[test]
    fn bad_fields_are_named() {
        let field = |json| set(json).unwrap_err().field;
        assert_eq!(field(serde_json::json!({"lora_nickname": ["a", "b"], "strength": [1.0]})), "strength");
        assert_eq!(field(serde_json::json!({"lora_nickname": ["a", "b"], "lora_path": ["/a"]})), "lora_path");
        assert_eq!(field(serde_json::json!({"lora_nickname": "a", "target": "unet"})), "target");
        assert_eq!(field(serde_json::json!({"lora_nickname": []})), "lora_nickname");
        assert_eq!(field(serde_json::json!({"lora_nickname": "a", "merge_mode": "dynamic"})), "merge_mode");
        let err = LoraCommand::merge(&MergeLoraRequest { target: Some("nope".into()), strength: None }).unwrap_err();
        assert_eq!(err.field, "target");
        assert!(serde_json::from_value::<SetLoraRequest>(serde_json::json!({"lora_nickname": "a", "x": 1})).is_err());
    }

    #[test]
    fn commands_travel_as_tagged_json() {
        let command = LoraCommand::unmerge(&UnmergeLoraRequest { target: Some("transformer_2".into()) }).unwrap();
        let json = serde_json::to_value(&command).unwrap();
        assert_eq!(json, serde_json::json!({"op": "unmerge", "target": "transformer_2"}));
        assert_eq!(serde_json::to_value(LoraCommand::List).unwrap(), serde_json::json!({"op": "list"}));
    }

    #[test]
    fn a_requests_adapters_are_checked() {
        let lora = |nickname: &str, strength: f64| RequestLora { nickname: nickname.into(), strength };
        assert_eq!(check_request_loras(&[lora("a", 0.5), lora("b", 1.0)]).unwrap().len(), 2);
        let parsed: RequestLora = serde_json::from_value(serde_json::json!({"nickname": "a"})).unwrap();
        assert_eq!(parsed.strength, 1.0);
        for bad in [vec![lora("a", 1.0), lora("a", 2.0)], vec![lora(" ", 1.0)], vec![lora("a", f64::NAN)]] {
            assert_eq!(check_request_loras(&bad).unwrap_err().field, "lora");
        }
        let many: Vec<RequestLora> = (0..9).map(|i| lora(&i.to_string(), 1.0)).collect();
        assert!(check_request_loras(&many).unwrap_err().message.contains("at most 8"));
    }
}
