//! The OpenAPI spec, generated from the route annotations and wire types. A copy is checked in at
//! `crates/sgl-http/openapi.json`; a test fails when the two drift apart.

use utoipa::openapi::content::ContentBuilder;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{Ref, ResponseBuilder};
use utoipa::{Modify, OpenApi};

use crate::auth::PUBLIC_PATHS;
use crate::routes::*;
use crate::wire::*;
use sgl_core::lora::{ActiveLora, LoadedLora, LoraState, MergeLoraRequest, SetLoraRequest, UnmergeLoraRequest};

#[derive(OpenApi)]
#[openapi(
    info(title = "sgl-diffusion", description = "OpenAI-compatible image and video generation server"),
    paths(
        health, health_generate, list_models, get_model, served_model, create_image, edit_image, image_content,
        create_video, list_videos, get_video, video_content, cancel_video, delete_video, set_lora, merge_lora_weights,
        unmerge_lora_weights, list_loras, metrics
    ),
    components(schemas(
        ImageGenerationRequest, ImageEditRequest, ImageGenerationResponse, ImageData, ErrorBody, ErrorDetail, ModelCard, ModelList,
        ServedModelInfo, HealthStatus, VideoCreateRequest, VideoJob, VideoJobList, VideoDeleted, VideoStatus,
        VideoError, SetLoraRequest, MergeLoraRequest, UnmergeLoraRequest, LoraResponse, LoraState, LoadedLora, ActiveLora
    )),
    modifiers(&BearerAuth)
)]
struct ApiDoc;

/// `--api-key` as the spec must say it: every route the key check guards (all but
/// `auth::PUBLIC_PATHS`) needs the bearer key and can answer 401. Derived from the check itself, so
/// a new route cannot be documented without it.
struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        if let Some(components) = openapi.components.as_mut() {
            components.add_security_scheme(
                "bearer",
                SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
            );
        }
        for (path, item) in openapi.paths.paths.iter_mut() {
            if PUBLIC_PATHS.contains(&path.as_str()) {
                continue;
            }
            let operations = [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
                &mut item.options,
                &mut item.head,
                &mut item.patch,
                &mut item.trace,
            ];
            for operation in operations.into_iter().flatten() {
                operation.security = Some(vec![SecurityRequirement::new("bearer", Vec::<String>::new())]);
                operation.responses.responses.entry("401".to_string()).or_insert_with(|| {
                    ResponseBuilder::new()
                        .description("Missing or invalid API key (`Authorization: Bearer <key>`, with --api-key)")
                        .content(
                            "application/json",
                            ContentBuilder::new().schema(Some(Ref::from_schema_name("ErrorBody"))).build(),
                        )
                        .build()
                        .into()
                });
            }
        }
    }
}

/// The spec as pretty-printed JSON (stable: the same build always prints the same text).
pub fn openapi_json() -> String {
    let mut spec = ApiDoc::openapi();
    // The version is the crate's, not utoipa's default, so the spec changes only with the API.
    spec.info.version = env!("CARGO_PKG_VERSION").to_string();
    spec.to_pretty_json().unwrap_or_else(|err| format!("{{\"error\": \"cannot render the spec: {err}\"}}"))
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    fn spec() -> Value {
        serde_json::from_str(&super::openapi_json()).unwrap()
    }

    #[test]
    fn every_route_but_health_documents_the_key_and_its_401() {
        let spec = spec();
        for (path, item) in spec["paths"].as_object().unwrap() {
            for (method, operation) in item.as_object().unwrap() {
                let guarded = path != "/health";
                assert_eq!(operation["responses"].get("401").is_some(), guarded, "{method} {path}");
                assert_eq!(operation.get("security").is_some(), guarded, "{method} {path}");
            }
        }
    }

    #[test]
    fn request_bounds_are_the_validators_bounds() {
        let spec = spec();
        let images = &spec["components"]["schemas"]["ImageGenerationRequest"]["properties"];
        assert_eq!(images["n"]["minimum"], 1);
        assert_eq!(images["n"]["maximum"], sgl_core::MAX_OUTPUTS_PER_REQUEST);
        assert_eq!(spec["components"]["schemas"]["VideoCreateRequest"]["properties"]["n"]["maximum"], 1);
        // Seeds are u64: the full range is accepted, which int64 does not describe.
        for schema in ["ImageGenerationRequest", "VideoCreateRequest"] {
            let seed = &spec["components"]["schemas"][schema]["properties"]["seed"];
            assert_eq!((seed["format"].as_str(), seed["minimum"].as_u64()), (Some("uint64"), Some(0)), "{schema}");
        }
    }

    #[test]
    fn checked_in_spec_matches_the_code() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.json");
        let checked_in = std::fs::read_to_string(path).unwrap_or_default();
        let generated = super::openapi_json();
        if std::env::var_os("UPDATE_OPENAPI").is_some() {
            std::fs::write(path, format!("{generated}\n")).unwrap();
            return;
        }
        assert_eq!(
            checked_in.trim_end(),
            generated,
            "the API changed: review it, then run `UPDATE_OPENAPI=1 cargo test -p sgl-http` to update {path}"
        );
    }
}
