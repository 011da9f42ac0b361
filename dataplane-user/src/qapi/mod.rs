//! QAPI input: turns a JSON value (a QMP command's `arguments`) or a QEMU keyval string (`-netdev`)
//! into typed Rust structs, with QEMU's validation order and error texts.
//!
//! QEMU's input visitor walks a struct's members in schema order: the first missing or mistyped
//! member is reported, and only when every member is fine are leftover keys reported as unexpected.
//! [`de::Input`] reproduces that walk on top of serde: the struct's field list (schema order) drives
//! the iteration, absent members are offered as "absent" so that `Option` fields become `None` and
//! required ones fail with `Parameter 'x' is missing`.

pub mod de;
pub mod keyval;

use serde::Deserialize;
use serde_json::Value;

pub use self::de::{Input, Mode};

/// A QAPI input error; `Display` is QEMU's text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QapiError {
    #[error("Parameter '{0}' is missing")]
    Missing(String),
    #[error("Parameter '{0}' is unexpected")]
    Unexpected(String),
    #[error("Invalid parameter type for '{name}', expected: {expected}")]
    InvalidType { name: String, expected: &'static str },
    #[error("Parameter '{name}' does not accept value '{value}'")]
    BadEnumValue { name: String, value: String },
    /// QEMU's `QERR_INVALID_PARAMETER_VALUE`: `Parameter 'x' expects int32_t`.
    #[error("Parameter '{name}' expects {what}")]
    Expects { name: String, what: &'static str },
    #[error("{0}")]
    Custom(String),
}

impl serde::de::Error for QapiError {
    fn custom<T: std::fmt::Display>(msg: T) -> Self {
        Self::Custom(msg.to_string())
    }

    fn missing_field(field: &'static str) -> Self {
        Self::Missing(field.to_owned())
    }

    fn unknown_field(field: &str, _expected: &'static [&'static str]) -> Self {
        Self::Unexpected(field.to_owned())
    }
}

/// QAPI's "fat" string, `{"str": "…"}`, used for lists of strings.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
pub struct QapiString {
    pub str: String,
}

/// QAPI `size`: an unsigned byte count; keyval input also takes the suffixes k, M, G, T, P, E.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Size(pub u64);

/// Name under which [`Size`] asks the deserializer for suffix parsing.
pub(crate) const SIZE_NEWTYPE: &str = "QapiSize";

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SizeVisitor;
        impl<'de> serde::de::Visitor<'de> for SizeVisitor {
            type Value = Size;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a size")
            }
            fn visit_newtype_struct<D: serde::Deserializer<'de>>(self, d: D) -> Result<Size, D::Error> {
                u64::deserialize(d).map(Size)
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Size, E> {
                Ok(Size(v))
            }
        }
        deserializer.deserialize_newtype_struct(SIZE_NEWTYPE, SizeVisitor)
    }
}

/// Deserializes `T` from a whole JSON value (a command's arguments).
pub fn from_json<'a, T: Deserialize<'a>>(value: &'a Value) -> Result<T, QapiError> {
    T::deserialize(Input::root(value, Mode::Json))
}

/// `util/id.c: id_wellformed`: an ASCII letter, then letters, digits, `-`, `.` or `_`.
#[must_use]
pub fn id_wellformed(id: &str) -> bool {
    let mut chars = id.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        for good in ["a", "n0", "net-0.x_y", "Z"] {
            assert!(id_wellformed(good), "{good}");
        }
        for bad in ["", "1bad", "a/b", "-a", "a b", "é"] {
            assert!(!id_wellformed(bad), "{bad}");
        }
    }
}
