//! Field tables: each request field and each option is declared once, on its Rust struct, and every
//! other face (HTTP wire and OpenAPI, command-line flags of both CLIs, the Python mirror, keyword
//! arguments and `.pyi` stubs) is derived from the table that [`declare_fields!`] generates beside it.
//!
//! A field's table entry holds what the struct alone cannot say: its doc comment as text, the kind of
//! value its Rust type holds, and, written after the type in brackets, how the faces treat it:
//!
//! ```
//! use sgl_core::declare_fields;
//! use sgl_core::fields::{Fields, Route};
//!
//! declare_fields! {
//!     #[derive(Debug, Default)]
//!     pub struct Example {
//!         /// Seconds url outputs stay downloadable.
//!         pub output_ttl_secs: u64 [.flag("--output-ttl").min(1)],
//!         /// Random when absent.
//!         pub seed: Option<u64> [.routes(&[Route::Images])],
//!     }
//! }
//!
//! assert_eq!(Example::FIELDS[0].flag_name(), "--output-ttl");
//! assert_eq!(Example::FIELDS[1].help(), "Random when absent.");
//! ```

use std::path::PathBuf;

use serde::Serialize;

/// The kind of value a field holds: what a command-line flag parses and what a Python hint says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ValueKind {
    Bool,
    Integer,
    Number,
    Text,
    /// One of [`ValueType::choices`].
    Choice,
    /// A nested object (a struct of its own fields); it has no flag.
    Object,
}

/// The type of a field's value, as its Rust type defines it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ValueType {
    pub kind: ValueKind,
    /// `None` is a value: "not given, use the default".
    pub optional: bool,
    /// A list of values of `kind`.
    pub list: bool,
    /// The allowed values of a [`ValueKind::Choice`], as serde names them.
    pub choices: &'static [&'static str],
    /// Smallest allowed number (the type's own bound, or a tighter one the field declares).
    pub min: Option<f64>,
    /// Whether `min` itself is excluded (`> 0` rather than `>= 0`).
    pub min_exclusive: bool,
    /// Largest allowed number.
    pub max: Option<f64>,
}

impl ValueType {
    pub const fn of(kind: ValueKind) -> Self {
        Self { kind, optional: false, list: false, choices: &[], min: None, min_exclusive: false, max: None }
    }

    /// An integer type with its own range (`u16`: 0 to 65535). Wide types leave the top open: no field
    /// nears `u32::MAX`, and a bound there would only clutter every face.
    pub const fn integer(min: f64, max: Option<f64>) -> Self {
        Self { min: Some(min), max, ..Self::of(ValueKind::Integer) }
    }

    pub const fn choice(choices: &'static [&'static str]) -> Self {
        Self { choices, ..Self::of(ValueKind::Choice) }
    }
}

/// A Rust type a field may have, and what that makes its [`ValueType`].
pub trait FieldValue {
    const TYPE: ValueType;
}

macro_rules! field_value {
    ($($ty:ty => $value:expr),* $(,)?) => {
        $(impl FieldValue for $ty {
            const TYPE: ValueType = $value;
        })*
    };
}

field_value! {
    bool => ValueType::of(ValueKind::Bool),
    u8 => ValueType::integer(0.0, Some(u8::MAX as f64)),
    u16 => ValueType::integer(0.0, Some(u16::MAX as f64)),
    u32 => ValueType::integer(0.0, None),
    u64 => ValueType::integer(0.0, None),
    usize => ValueType::integer(0.0, None),
    f64 => ValueType::of(ValueKind::Number),
    String => ValueType::of(ValueKind::Text),
    PathBuf => ValueType::of(ValueKind::Text),
}

/// A free-form mapping (`diffusers_kwargs`): a `--config` key, no flag.
impl FieldValue for serde_json::Map<String, serde_json::Value> {
    const TYPE: ValueType = ValueType::of(ValueKind::Object);
}

impl<T: FieldValue> FieldValue for Option<T> {
    const TYPE: ValueType = ValueType { optional: true, ..T::TYPE };
}

impl<T: FieldValue> FieldValue for Vec<T> {
    const TYPE: ValueType = ValueType { list: true, ..T::TYPE };
}

/// An HTTP route family that takes a request field in its body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Route {
    /// `POST /v1/images/generations`, and the form fields of `POST /v1/images/edits`.
    Images,
    /// `POST /v1/videos` (JSON and multipart).
    Videos,
}

/// Both HTTP routes.
pub const ALL_ROUTES: &[Route] = &[Route::Images, Route::Videos];

/// One field of a declared struct, with everything its faces need.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct FieldSpec {
    /// The serde key (JSON, config files' canonical key).
    pub name: &'static str,
    /// The doc comment, as written (see [`FieldSpec::help`]).
    pub doc: &'static str,
    #[serde(flatten)]
    pub value: ValueType,
    /// Must be given (it has no default).
    pub required: bool,
    /// The command-line flag when it is not `--` plus the name in kebab case.
    pub flag: Option<&'static str>,
    /// Further spellings of the flag (SGLang's `--precision` for `--dit-precision`).
    pub aliases: &'static [&'static str],
    /// Heading of the flag in `--help`, when it is not the table's own.
    pub group: Option<&'static str>,
    /// A list given by repeating the flag (`--cors-origin A --cors-origin B`), not as several values
    /// after one flag.
    pub repeat: bool,
    /// A boolean with a `--no-` form that turns it off.
    pub negatable: bool,
    /// Whether it is a command-line flag at all.
    pub cli: bool,
    /// A flag of `sgl-diffusion serve` (and the native binary) only; `generate` names it an error.
    pub serve_only: bool,
    /// HTTP routes whose request body takes it.
    pub routes: &'static [Route],
    /// Whether serde writes it: a `#[serde(skip)]` field is internal, and no face shows it.
    pub serialized: bool,
}

impl FieldSpec {
    pub const fn new(name: &'static str, doc: &'static str, value: ValueType) -> Self {
        Self {
            name,
            doc,
            value,
            required: false,
            flag: None,
            aliases: &[],
            group: None,
            repeat: false,
            negatable: false,
            cli: !matches!(value.kind, ValueKind::Object),
            serve_only: false,
            routes: &[],
            serialized: true,
        }
    }

    pub const fn required(self) -> Self {
        Self { required: true, ..self }
    }

    pub const fn flag(self, flag: &'static str) -> Self {
        Self { flag: Some(flag), ..self }
    }

    pub const fn aliases(self, aliases: &'static [&'static str]) -> Self {
        Self { aliases, ..self }
    }

    pub const fn group(self, group: &'static str) -> Self {
        Self { group: Some(group), ..self }
    }

    pub const fn repeat(self) -> Self {
        Self { repeat: true, ..self }
    }

    pub const fn negatable(self) -> Self {
        Self { negatable: true, ..self }
    }

    /// Not a command-line flag (filled in from another option, or only set in code).
    pub const fn no_flag(self) -> Self {
        Self { cli: false, ..self }
    }

    pub const fn serve_only(self) -> Self {
        Self { serve_only: true, ..self }
    }

    pub const fn routes(self, routes: &'static [Route]) -> Self {
        Self { routes, ..self }
    }

    /// Marks a `#[serde(skip)]` field: internal, in no face.
    pub const fn skipped(self) -> Self {
        Self { serialized: false, cli: false, ..self }
    }

    /// Allowed values of a text field (its Rust type is a string, the faces offer a choice).
    pub const fn choices(self, choices: &'static [&'static str]) -> Self {
        Self { value: ValueType { kind: ValueKind::Choice, choices, ..self.value }, ..self }
    }

    /// A tighter lower bound than the type's, e.g. 1 for counts that must be positive.
    pub const fn min(self, min: i64) -> Self {
        Self { value: ValueType { min: Some(min as f64), min_exclusive: false, ..self.value }, ..self }
    }

    /// Numbers must be greater than `bound` (timeouts in seconds: `> 0`).
    pub const fn above(self, bound: i64) -> Self {
        Self { value: ValueType { min: Some(bound as f64), min_exclusive: true, ..self.value }, ..self }
    }

    pub const fn max(self, max: i64) -> Self {
        Self { value: ValueType { max: Some(max as f64), ..self.value }, ..self }
    }

    /// The command-line flag: the declared one, else `--` plus the name in kebab case.
    pub fn flag_name(&self) -> String {
        match self.flag {
            Some(flag) => flag.to_string(),
            None => format!("--{}", self.name.replace('_', "-")),
        }
    }

    /// The doc comment as one line of text (rustdoc's line breaks are not sentence breaks).
    pub fn help(&self) -> String {
        self.doc.lines().map(str::trim).filter(|line| !line.is_empty()).collect::<Vec<_>>().join(" ")
    }

    /// Why `value` (this field's value as JSON) is outside the field's bounds, naming the flag; `None`
    /// when it is within them or not a number. Lists are checked item by item.
    pub fn bound_problem(&self, value: &serde_json::Value) -> Option<String> {
        if let serde_json::Value::Array(items) = value {
            return items.iter().find_map(|item| self.bound_problem(item));
        }
        let number = value.as_f64()?;
        let flag = self.flag_name();
        match (self.value.min, self.value.max) {
            (Some(min), _) if self.value.min_exclusive && number <= min => Some(format!("{flag} must be > {min}")),
            (Some(min), _) if number < min => Some(format!("{flag} must be at least {min}")),
            (_, Some(max)) if number > max => Some(format!("{flag} must be at most {max}")),
            _ => None,
        }
    }
}

/// A table as Python and the native binary read it: each field's entry with its `flag` spelled out, its
/// `group` (the field's own heading, else `group`), its `default` taken from `defaults` (the struct's
/// `Default` serialized; `null` where there is none), and its doc comment as one line of `help` that
/// ends with that default when there is one to show.
pub fn table_json(fields: &[FieldSpec], group: &str, defaults: Option<&serde_json::Value>) -> serde_json::Value {
    let entries = fields.iter().filter(|field| field.serialized).map(|field| {
        let default = defaults.and_then(|defaults| defaults.get(field.name)).cloned().unwrap_or_default();
        let shown = match &default {
            serde_json::Value::Null | serde_json::Value::Bool(_) => None,
            serde_json::Value::Array(items) if items.is_empty() => None,
            serde_json::Value::String(text) if text.is_empty() => None,
            serde_json::Value::String(text) => Some(text.clone()),
            other => Some(other.to_string()),
        };
        let help = match shown {
            Some(shown) => {
                let help = field.help();
                let (text, stop) = help.strip_suffix('.').map_or((help.as_str(), ""), |text| (text, "."));
                format!("{text} (default {shown}){stop}").trim_start().to_string()
            }
            None => field.help(),
        };
        let mut entry = serde_json::to_value(field).unwrap_or_default();
        if let Some(object) = entry.as_object_mut() {
            object.remove("doc");
            object.insert("help".into(), help.into());
            object.insert("flag".into(), field.flag_name().into());
            object.insert("group".into(), field.group.unwrap_or(group).into());
            object.insert("default".into(), default);
        }
        entry
    });
    serde_json::Value::Array(entries.collect())
}

/// [`table_json`] of a struct whose `Default` holds the defaults its flags show.
pub fn table_json_with_defaults<T: Fields + Default + Serialize>(group: &str) -> serde_json::Value {
    table_json(T::FIELDS, group, serde_json::to_value(T::default()).ok().as_ref())
}

/// A struct declared with [`declare_fields!`]: its fields in declaration order.
pub trait Fields {
    const FIELDS: &'static [FieldSpec];

    /// The field named `name` (its serde key).
    fn field(name: &str) -> Option<&'static FieldSpec> {
        Self::FIELDS.iter().find(|field| field.name == name)
    }
}

/// A value outside the bounds its field declares.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BoundError(pub String);

/// Checks every bounded field of `value` (a declared struct serialized to JSON) against its bounds;
/// the error names the first field's flag, the way the command line spells it.
pub fn check_bounds<T: Fields + Serialize>(value: &T) -> Result<(), BoundError> {
    let json = serde_json::to_value(value).map_err(|err| BoundError(format!("cannot check the bounds: {err}")))?;
    check_json_bounds(T::FIELDS, &json)
}

/// [`check_bounds`] of a JSON object before it is parsed: a negative count is then named by its flag
/// ("must be at least 0") rather than by serde ("expected u64").
pub fn check_json_bounds(fields: &[FieldSpec], json: &serde_json::Value) -> Result<(), BoundError> {
    match fields.iter().find_map(|field| json.get(field.name).and_then(|value| field.bound_problem(value))) {
        Some(problem) => Err(BoundError(problem)),
        None => Ok(()),
    }
}

/// Declares a struct and its field table ([`Fields::FIELDS`]) in one place.
///
/// Each field may end with a bracketed chain of [`FieldSpec`] builder calls (`[.flag("--x").min(1)]`);
/// its doc comment becomes its help text. Attributes (serde's, utoipa's) pass through unchanged.
#[macro_export]
macro_rules! declare_fields {
    (
        $(#[$($struct_attr:tt)*])*
        $vis:vis struct $name:ident {
            $(
                $(#[$($attr:tt)*])*
                $field_vis:vis $field:ident : $ty:ty $([$($spec:tt)*])?
            ),* $(,)?
        }
    ) => {
        $(#[$($struct_attr)*])*
        $vis struct $name {
            $($(#[$($attr)*])* $field_vis $field: $ty,)*
        }

        impl $crate::fields::Fields for $name {
            const FIELDS: &'static [$crate::fields::FieldSpec] = &[$(
                $crate::fields::FieldSpec::new(
                    stringify!($field),
                    $crate::__doc_text!($([$($attr)*])*),
                    <$ty as $crate::fields::FieldValue>::TYPE,
                ) $($($spec)*)?
            ),*];
        }

        // A declared struct nests in another as an object (the engine config holds the model's).
        impl $crate::fields::FieldValue for $name {
            const TYPE: $crate::fields::ValueType =
                $crate::fields::ValueType::of($crate::fields::ValueKind::Object);
        }
    };
}

/// The `#[doc = "..."]` attributes among a field's attributes, one line each.
#[doc(hidden)]
#[macro_export]
macro_rules! __doc_text {
    () => { "" };
    ([doc = $doc:literal] $($rest:tt)*) => { concat!($doc, "\n", $crate::__doc_text!($($rest)*)) };
    ([$($other:tt)*] $($rest:tt)*) => { $crate::__doc_text!($($rest)*) };
}

#[cfg(test)]
mod tests {
    use super::*;

    declare_fields! {
        /// A struct to test the table with.
        #[derive(Debug, Default, Serialize)]
        struct Sample {
            /// First line
            /// and second line.
            #[serde(default)]
            name: String [.required()],
            count: u32 [.flag("--how-many").min(1).max(5)],
            /// Seconds.
            timeout: Option<f64> [.above(0)],
            port: u16,
            origins: Vec<String> [.repeat().serve_only()],
            kind: Option<String> [.choices(&["a", "b"]).aliases(&["--sort"])],
        }
    }

    #[test]
    fn the_table_follows_the_declaration() {
        let names: Vec<_> = Sample::FIELDS.iter().map(|f| f.name).collect();
        assert_eq!(names, ["name", "count", "timeout", "port", "origins", "kind"]);
        let name = Sample::field("name").unwrap();
        assert_eq!(name.help(), "First line and second line.");
        assert!(name.required && name.cli && name.value.kind == ValueKind::Text && !name.value.optional);
        let count = Sample::field("count").unwrap();
        assert_eq!((count.flag_name(), count.value.min, count.value.max), ("--how-many".into(), Some(1.0), Some(5.0)));
        assert_eq!(Sample::field("port").unwrap().value.max, Some(65535.0));
        assert_eq!(Sample::field("timeout").unwrap().flag_name(), "--timeout");
        let origins = Sample::field("origins").unwrap();
        assert!(origins.value.list && origins.repeat && origins.serve_only);
        let kind = Sample::field("kind").unwrap();
        assert_eq!(
            (kind.value.kind, kind.value.choices, kind.aliases),
            (ValueKind::Choice, &["a", "b"][..], &["--sort"][..])
        );
    }

    #[test]
    fn bounds_name_the_flag() {
        let count = Sample::field("count").unwrap();
        assert_eq!(count.bound_problem(&0.into()).as_deref(), Some("--how-many must be at least 1"));
        assert_eq!(count.bound_problem(&6.into()).as_deref(), Some("--how-many must be at most 5"));
        assert_eq!(count.bound_problem(&3.into()), None);
        let timeout = Sample::field("timeout").unwrap();
        assert_eq!(timeout.bound_problem(&0.0.into()).as_deref(), Some("--timeout must be > 0"));
        assert_eq!(timeout.bound_problem(&serde_json::Value::Null), None);
        let sample = Sample { count: 9, ..Default::default() };
        assert_eq!(check_bounds(&sample).unwrap_err().0, "--how-many must be at most 5");
        assert!(check_bounds(&Sample { count: 2, ..Default::default() }).is_ok());
    }

    #[test]
    fn the_table_serializes_for_python() {
        let json = table_json_with_defaults::<Sample>("sample");
        assert_eq!((json[1]["default"].as_u64(), json[2]["default"].as_null()), (Some(0), Some(())));
        assert_eq!(json[2]["help"], "Seconds.");
        assert_eq!(json[1]["help"], "(default 0)");
        assert_eq!(json[3]["help"], "(default 0)");
        assert_eq!((json[0]["group"].as_str(), json[4]["group"].as_str()), (Some("sample"), Some("sample")));
        assert_eq!((json[1]["kind"].as_str(), json[1]["min"].as_f64()), (Some("integer"), Some(1.0)));
        assert_eq!((json[1]["flag"].as_str(), json[3]["flag"].as_str()), (Some("--how-many"), Some("--port")));
        assert_eq!(json[0]["help"], "First line and second line.");
        assert!(json[0].get("doc").is_none());
        assert_eq!(json[5]["choices"], serde_json::json!(["a", "b"]));
    }
}
