//! A generation route's request body: the route's own (OpenAI) fields beside the engine's request
//! fields that the route takes, in one flat JSON object.
//!
//! The engine's fields are not listed here: they are `sgl_core::GenerationRequest`'s, taken where its
//! field table names the route. The body's OpenAPI schema is built from the same two sources, so a
//! field added to the core request appears on the wire, in the spec and in its validation at once.

use std::borrow::Cow;

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};
use sgl_core::fields::{FieldSpec, Fields, Route};
use sgl_core::GenerationRequest;
use utoipa::openapi::schema::{Object, Schema, SchemaType, Type};
use utoipa::openapi::RefOr;
use utoipa::{Number, PartialSchema, ToSchema};

use crate::error::ApiError;

/// A route's own fields (those that are not the engine's), and the route they belong to.
pub trait RouteFields: DeserializeOwned + ToSchema {
    const ROUTE: Route;
    /// The name of the whole body's schema in the OpenAPI spec.
    const SCHEMA_NAME: &'static str;
}

/// A parsed body: the route's own fields and the engine's request (with only the fields the route
/// takes; the route sets the others from its own fields).
#[derive(Debug, Clone)]
pub struct RouteBody<O> {
    pub own: O,
    pub request: GenerationRequest,
}

/// The engine's fields a route takes.
fn engine_fields(route: Route) -> impl Iterator<Item = &'static FieldSpec> {
    GenerationRequest::FIELDS.iter().filter(move |field| field.routes.contains(&route))
}

/// The properties of an object schema (empty for anything else).
fn properties(schema: &RefOr<Schema>) -> Option<&Object> {
    match schema {
        RefOr::T(Schema::Object(object)) => Some(object),
        _ => None,
    }
}

impl<O: RouteFields> RouteBody<O> {
    /// Splits a JSON body between the route's fields and the engine's, naming the field at fault
    /// when one is unknown, missing or of the wrong type.
    pub fn from_value(body: Value) -> Result<Self, ApiError> {
        let Value::Object(fields) = body else {
            return Err(ApiError::bad_request(format!(
                "invalid request body: expected a JSON object of {} fields, got {}",
                O::SCHEMA_NAME,
                kind_of(&body)
            )));
        };
        let own_schema = O::schema();
        let own_names = properties(&own_schema).map(|object| &object.properties);
        let (mut own, mut engine) = (Map::new(), Map::new());
        for (name, value) in fields {
            if own_names.is_some_and(|names| names.contains_key(&name)) {
                own.insert(name, value);
            } else if engine_fields(O::ROUTE).any(|field| field.name == name) {
                engine.insert(name, value);
            } else {
                return Err(unknown_field::<O>(&name));
            }
        }
        Ok(Self { own: from_fields(own)?, request: from_fields(engine)? })
    }

    /// Whether the engine's request field `name` holds objects (a request's `lora`): a multipart form sends
    /// it as JSON text.
    pub fn is_structured(name: &str) -> bool {
        use sgl_core::fields::{Fields, ValueKind};
        GenerationRequest::FIELDS.iter().any(|field| field.name == name && field.value.kind == ValueKind::Object)
    }

    /// Whether the field `name` holds a number (multipart forms send every value as text).
    pub fn is_numeric(name: &str) -> bool {
        let schema = Self::schema();
        let property = properties(&schema).and_then(|object| object.properties.get(name));
        let types = match property.and_then(properties).map(|object| &object.schema_type) {
            Some(SchemaType::Type(kind)) => vec![kind.clone()],
            Some(SchemaType::Array(kinds)) => kinds.clone(),
            _ => Vec::new(),
        };
        types.iter().any(|kind| matches!(kind, Type::Integer | Type::Number))
    }
}

fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// serde reports a missing field at the body's root: name it as the field at fault.
pub(crate) fn missing_field(message: &str) -> Option<ApiError> {
    let field = message.strip_prefix("missing field `")?.split('`').next()?;
    let mut err = ApiError::invalid(field, format!("`{field}` is required"));
    err.code = Some("missing_required_parameter");
    Some(err)
}

/// serde's own wording, listing every field the route takes.
fn unknown_field<O: RouteFields>(name: &str) -> ApiError {
    let schema = RouteBody::<O>::schema();
    let expected: Vec<String> = properties(&schema)
        .map(|object| object.properties.keys().map(|key| format!("`{key}`")).collect())
        .unwrap_or_default();
    ApiError::invalid(name, format!("unknown field `{name}`, expected one of {}", expected.join(", ")))
}

/// Deserializes one side of the body; errors name the field (serde's path) like a whole-body parse.
fn from_fields<T: DeserializeOwned>(fields: Map<String, Value>) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(Value::Object(fields)).map_err(|err| {
        let path = err.path().to_string();
        let message = err.into_inner().to_string();
        match missing_field(&message) {
            Some(missing) if path == "." => missing,
            _ if path == "." => ApiError::bad_request(format!("invalid request body: {message}")),
            _ => ApiError::invalid(path, message),
        }
    })
}

/// A JSON Schema bound: an integer where the bound is one (as utoipa writes integer bounds).
fn bound(value: f64) -> Number {
    if value.fract() == 0.0 && value >= 0.0 && value <= usize::MAX as f64 {
        Number::UInt(value as usize)
    } else {
        Number::Float(value)
    }
}

/// The engine field's schema as `GenerationRequest` derives it, with the bounds its table declares.
fn engine_property(engine: &Object, field: &FieldSpec) -> Option<RefOr<Schema>> {
    let mut property = engine.properties.get(field.name)?.clone();
    if let RefOr::T(Schema::Object(object)) = &mut property {
        let value = field.value;
        match value.min {
            Some(min) if value.min_exclusive => (object.minimum, object.exclusive_minimum) = (None, Some(bound(min))),
            Some(min) => object.minimum = Some(bound(min)),
            None => {}
        }
        if let Some(max) = value.max {
            object.maximum = Some(bound(max));
        }
    }
    Some(property)
}

impl<O: RouteFields> PartialSchema for RouteBody<O> {
    fn schema() -> RefOr<Schema> {
        let RefOr::T(Schema::Object(mut object)) = O::schema() else {
            return O::schema();
        };
        let engine_schema = GenerationRequest::schema();
        let Some(engine) = properties(&engine_schema) else {
            return RefOr::T(Schema::Object(object));
        };
        for field in engine_fields(O::ROUTE) {
            if let Some(property) = engine_property(engine, field) {
                object.properties.insert(field.name.to_string(), property);
            }
            if field.required {
                object.required.push(field.name.to_string());
            }
        }
        RefOr::T(Schema::Object(object))
    }
}

impl<O: RouteFields> ToSchema for RouteBody<O> {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed(O::SCHEMA_NAME)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{ImageFields, VideoFields};

    #[test]
    fn a_body_splits_between_the_route_and_the_engine() {
        let body = serde_json::json!({"prompt": "a fox", "n": 2, "seed": 3, "size": "64x32"});
        let parsed = RouteBody::<ImageFields>::from_value(body).unwrap();
        assert_eq!((parsed.own.n, parsed.own.size.as_deref()), (Some(2), Some("64x32")));
        assert_eq!((parsed.request.prompt.as_str(), parsed.request.seed), ("a fox", Some(3)));
    }

    #[test]
    fn fields_of_another_route_are_unknown_here() {
        // `fps` is a video field, `true_cfg_scale` an image field.
        let err = RouteBody::<ImageFields>::from_value(serde_json::json!({"prompt": "a", "fps": 8})).unwrap_err();
        assert_eq!(err.param.as_deref(), Some("fps"));
        assert!(err.message.starts_with("unknown field `fps`, expected one of `background`"), "{}", err.message);
        let err = RouteBody::<VideoFields>::from_value(serde_json::json!({"prompt": "a", "true_cfg_scale": 2}));
        assert_eq!(err.unwrap_err().param.as_deref(), Some("true_cfg_scale"));
    }

    #[test]
    fn errors_name_the_field() {
        let wrong = RouteBody::<ImageFields>::from_value(serde_json::json!({"prompt": "a", "seed": -1})).unwrap_err();
        assert_eq!(wrong.param.as_deref(), Some("seed"));
        let own = RouteBody::<ImageFields>::from_value(serde_json::json!({"prompt": "a", "n": "two"})).unwrap_err();
        assert_eq!(own.param.as_deref(), Some("n"));
        let missing = RouteBody::<ImageFields>::from_value(serde_json::json!({"n": 1})).unwrap_err();
        assert_eq!((missing.param.as_deref(), missing.code), (Some("prompt"), Some("missing_required_parameter")));
        let array = RouteBody::<ImageFields>::from_value(serde_json::json!([])).unwrap_err();
        assert_eq!((array.param, array.status.as_u16()), (None, 400));
    }

    #[test]
    fn the_schema_lists_the_route_fields_of_the_core_request() {
        let routes = [
            (Route::Images, RouteBody::<ImageFields>::schema(), ImageFields::schema()),
            (Route::Videos, RouteBody::<VideoFields>::schema(), VideoFields::schema()),
        ];
        for (route, schema, own) in routes {
            let (object, own) = (properties(&schema).unwrap(), properties(&own).unwrap());
            for field in GenerationRequest::FIELDS.iter().filter(|field| !own.properties.contains_key(field.name)) {
                assert_eq!(object.properties.contains_key(field.name), field.routes.contains(&route), "{}", field.name);
            }
            assert_eq!(object.required, ["prompt"]);
        }
        assert!(RouteBody::<VideoFields>::is_numeric("guidance_scale_2"));
        assert!(RouteBody::<VideoFields>::is_numeric("n"));
        assert!(!RouteBody::<VideoFields>::is_numeric("prompt") && !RouteBody::<VideoFields>::is_numeric("seconds"));
    }
}
