//! The OpenAPI spec, generated from the route annotations and wire types. A copy is checked in at
//! `crates/sgl-http/openapi.json`; a test fails when the two drift apart.

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::routes::*;
use crate::wire::*;

#[derive(OpenApi)]
#[openapi(
    info(title = "sgl-diffusion", description = "OpenAI-compatible image and video generation server"),
    paths(
        health, health_generate, list_models, get_model, served_model, create_image, edit_image, image_content,
        create_video, list_videos, get_video, video_content, cancel_video, delete_video, metrics
    ),
    components(schemas(
        ImageGenerationRequest, ImageGenerationResponse, ImageData, ErrorBody, ErrorDetail, ModelCard, ModelList,
        ServedModelInfo, HealthStatus, VideoCreateRequest, VideoJob, VideoJobList, VideoDeleted, VideoStatus,
        VideoError
    )),
    modifiers(&BearerAuth)
)]
struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        if let Some(components) = openapi.components.as_mut() {
            components.add_security_scheme(
                "bearer",
                SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
            );
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
