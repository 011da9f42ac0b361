//! A serde `Deserializer` over `serde_json::Value` that behaves like QEMU's QObject input visitor.
//!
//! Two modes, as in QEMU: [`Mode::Json`] (QMP: JSON types must match) and [`Mode::Keyval`]
//! (`-netdev` strings: every scalar is a string and is converted on demand).

use serde::de::{
    self, DeserializeSeed, EnumAccess, IntoDeserializer, MapAccess, SeqAccess, VariantAccess, Visitor,
};
use serde_json::{Map, Value};

use super::{QapiError, SIZE_NEWTYPE};

/// Where the input came from; decides how scalars are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// QMP JSON: an integer member needs a JSON integer.
    Json,
    /// QEMU keyval (`-netdev tap,id=t0,queues=2`): scalars are strings.
    Keyval,
}

/// The discriminator of QAPI flat unions (`Netdev`, `SocketAddress`).
pub const UNION_TAG: &str = "type";

/// Serde name (`#[serde(rename = "QapiFlatUnion")]`) that marks an enum as a QAPI flat union: its
/// input must be an object (`Invalid parameter type for 'addr', expected: object`), whereas any
/// other enum is a QAPI enum, whose input must be a string.
pub const FLAT_UNION: &str = "QapiFlatUnion";

/// One node of the input, with its QAPI path (`addr.port`, `dnssearch[0]`) for error messages.
#[derive(Debug, Clone)]
pub struct Input<'a> {
    /// `None` when the member is absent.
    value: Option<&'a Value>,
    path: String,
    mode: Mode,
    /// Keys of this object already consumed by an enclosing union (its base members and tag).
    consumed: &'a [&'a str],
}

impl<'a> Input<'a> {
    #[must_use]
    pub fn root(value: &'a Value, mode: Mode) -> Self {
        Self { value: Some(value), path: String::new(), mode, consumed: &[] }
    }

    /// The same object with some keys already handled by the caller (a union's base members).
    #[must_use]
    pub fn consuming(mut self, keys: &'a [&'a str]) -> Self {
        self.consumed = keys;
        self
    }

    /// The member `name` of this object (absent if missing or if this is not an object).
    #[must_use]
    pub fn member(&self, name: &str) -> Self {
        let value = self.value.and_then(Value::as_object).and_then(|o| o.get(name));
        Self { value, path: self.child_path(name), mode: self.mode, consumed: &[] }
    }

    fn child_path(&self, name: &str) -> String {
        if self.path.is_empty() { name.to_owned() } else { format!("{}.{name}", self.path) }
    }

    fn missing(&self) -> QapiError {
        QapiError::Missing(self.path_or_null())
    }

    fn invalid_type(&self, expected: &'static str) -> QapiError {
        QapiError::InvalidType { name: self.path_or_null(), expected }
    }

    fn expects(&self, what: &'static str) -> QapiError {
        QapiError::Expects { name: self.path_or_null(), what }
    }

    /// QEMU names the root `null` in messages (e.g. a bad element of an unnamed list).
    fn path_or_null(&self) -> String {
        if self.path.is_empty() { "null".to_owned() } else { self.path.clone() }
    }

    /// The member's own name without its path, as `qapi-visit-core.c` reports bad enum values and
    /// out-of-range integers (`name ? name : "null"`): `to` for `addr.to`, `null` for a list element.
    fn bare_name(&self) -> String {
        match self.path.rsplit('.').next() {
            Some(last) if !last.is_empty() && !last.ends_with(']') => last.to_owned(),
            _ => "null".to_owned(),
        }
    }

    fn present(&self) -> Result<&'a Value, QapiError> {
        self.value.ok_or_else(|| self.missing())
    }

    /// An integer member: read as QEMU's `int64`/`uint64` visitors do, then range-checked for `T`
    /// as `visit_type_intN`/`visit_type_uintN` do (`type_name` is QEMU's C type, `int32_t`…).
    fn integer<T: TryFrom<i128>>(&self, type_name: &'static str) -> Result<T, QapiError> {
        let value = self.present()?;
        let unsigned = type_name.starts_with('u');
        let wide: i128 = match (self.mode, value) {
            (Mode::Json, Value::Number(n)) => match (n.as_i64(), n.as_u64()) {
                // `qobject_input_type_uint64` takes a negative integer modulo 2^64 "for backward
                // compatibility".
                (Some(i), _) if unsigned => i128::from(i.cast_unsigned()),
                (Some(i), _) => i128::from(i),
                (None, Some(u)) if unsigned => i128::from(u),
                // Beyond the 64-bit range of the visitor (QEMU reads such numbers as doubles).
                _ => return Err(self.not_an_integer(unsigned)),
            },
            (Mode::Json, _) => return Err(self.not_an_integer(unsigned)),
            (Mode::Keyval, Value::String(s)) => {
                keyval_integer(s, unsigned).ok_or_else(|| self.expects("integer"))?
            }
            (Mode::Keyval, _) => return Err(self.invalid_type("string")),
        };
        T::try_from(wide).map_err(|_| QapiError::Expects { name: self.bare_name(), what: type_name })
    }

    /// JSON that is no integer: `qobject_input_type_int64` reports the type, `…_uint64` the value.
    fn not_an_integer(&self, unsigned: bool) -> QapiError {
        if unsigned { self.expects("uint64") } else { self.invalid_type("integer") }
    }

    fn size(&self) -> Result<u64, QapiError> {
        match (self.mode, self.present()?) {
            (Mode::Keyval, Value::String(s)) => parse_size(s).ok_or_else(|| self.expects("size")),
            _ => self.integer("uint64_t"),
        }
    }

    fn boolean(&self) -> Result<bool, QapiError> {
        match (self.mode, self.present()?) {
            (Mode::Json, Value::Bool(b)) => Ok(*b),
            (Mode::Json, _) => Err(self.invalid_type("boolean")),
            (Mode::Keyval, Value::String(s)) => match s.as_str() {
                "on" | "yes" | "true" | "y" => Ok(true),
                "off" | "no" | "false" | "n" => Ok(false),
                _ => Err(self.expects("'on' or 'off'")),
            },
            (Mode::Keyval, _) => Err(self.invalid_type("string")),
        }
    }

    fn string(&self) -> Result<&'a str, QapiError> {
        match self.present()? {
            Value::String(s) => Ok(s),
            _ => Err(self.invalid_type("string")),
        }
    }

    fn object(&self) -> Result<&'a Map<String, Value>, QapiError> {
        match self.present()? {
            Value::Object(o) => Ok(o),
            _ => Err(self.invalid_type("object")),
        }
    }
}

/// C `strtoll(s, NULL, 0)` without its leniency: decimal, `0x` hex or leading-`0` octal, whole string.
fn parse_c_integer(s: &str) -> Option<i128> {
    let (negative, digits) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    let (radix, body) = if let Some(hex) = digits.strip_prefix("0x").or_else(|| digits.strip_prefix("0X")) {
        (16, hex)
    } else if digits.len() > 1 && digits.starts_with('0') {
        (8, &digits[1..])
    } else {
        (10, digits)
    };
    // Digits only: `from_str_radix` would also take a sign after the prefix (`0x-1`, `0+7`).
    if body.is_empty() || !body.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    let magnitude = i128::from_str_radix(body, radix).ok()?;
    Some(if negative { -magnitude } else { magnitude })
}

/// `qemu_strtoi64`/`qemu_strtou64` (base 0) of a keyval value. Like `strtoull`, the unsigned form
/// negates a leading minus modulo 2^64 (`-1` is 2^64 - 1).
fn keyval_integer(s: &str, unsigned: bool) -> Option<i128> {
    let value = parse_c_integer(s)?;
    if unsigned {
        let magnitude = u64::try_from(value.unsigned_abs()).ok()?;
        Some(i128::from(if value < 0 { magnitude.wrapping_neg() } else { magnitude }))
    } else {
        i64::try_from(value).ok().map(i128::from)
    }
}

/// `qemu_strtosz`: a byte count with an optional k/M/G/T/P/E suffix (binary multiples).
fn parse_size(s: &str) -> Option<u64> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, suffix) = s.split_at(split);
    let number: u64 = number.parse().ok()?;
    let shift = match suffix {
        "" | "b" | "B" => 0,
        "k" | "K" => 10,
        "m" | "M" => 20,
        "g" | "G" => 30,
        "t" | "T" => 40,
        "p" | "P" => 50,
        "e" | "E" => 60,
        _ => return None,
    };
    number.checked_mul(1u64.checked_shl(shift)?)
}

macro_rules! deserialize_integer {
    ($($method:ident => $visit:ident, $ty:ty, $name:literal;)*) => {$(
        fn $method<V: Visitor<'a>>(self, visitor: V) -> Result<V::Value, QapiError> {
            visitor.$visit(self.integer::<$ty>($name)?)
        }
    )*};
}

impl<'a> de::Deserializer<'a> for Input<'a> {
    type Error = QapiError;

    fn deserialize_any<V: Visitor<'a>>(self, visitor: V) -> Result<V::Value, QapiError> {
        match self.present()? {
            Value::Null => visitor.visit_unit(),
            Value::Bool(b) => visitor.visit_bool(*b),
            Value::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
                (Some(i), _, _) => visitor.visit_i64(i),
                (None, Some(u), _) => visitor.visit_u64(u),
                (_, _, Some(f)) => visitor.visit_f64(f),
                _ => Err(self.invalid_type("number")),
            },
            Value::String(s) => visitor.visit_borrowed_str(s),
            Value::Array(_) => self.deserialize_seq(visitor),
            Value::Object(_) => self.deserialize_map(visitor),
        }
    }

    fn deserialize_bool<V: Visitor<'a>>(self, visitor: V) -> Result<V::Value, QapiError> {
        visitor.visit_bool(self.boolean()?)
    }

    deserialize_integer! {
        deserialize_i8 => visit_i8, i8, "int8_t";
        deserialize_i16 => visit_i16, i16, "int16_t";
        deserialize_i32 => visit_i32, i32, "int32_t";
        deserialize_i64 => visit_i64, i64, "int64_t";
        deserialize_u8 => visit_u8, u8, "uint8_t";
        deserialize_u16 => visit_u16, u16, "uint16_t";
        deserialize_u32 => visit_u32, u32, "uint32_t";
        deserialize_u64 => visit_u64, u64, "uint64_t";
    }

    fn deserialize_f32<V: Visitor<'a>>(self, visitor: V) -> Result<V::Value, QapiError> {
        self.deserialize_f64(visitor)
    }

    fn deserialize_f64<V: Visitor<'a>>(self, visitor: V) -> Result<V::Value, QapiError> {
        match (self.mode, self.present()?) {
            (Mode::Json, Value::Number(n)) => visitor.visit_f64(n.as_f64().unwrap_or(f64::NAN)),
            (Mode::Keyval, Value::String(s)) => {
                visitor.visit_f64(s.parse().map_err(|_| self.invalid_type("number"))?)
            }
            _ => Err(self.invalid_type("number")),
        }
    }

    fn deserialize_char<V: Visitor<'a>>(self, visitor: V) -> Result<V::Value, QapiError> {
        self.deserialize_str(visitor)
    }

    fn deserialize_str<V: Visitor<'a>>(self, visitor: V) -> Result<V::Value, QapiError> {
        visitor.visit_borrowed_str(self.string()?)
    }

    fn deserialize_string<V: Visitor<'a>>(self, visitor: V) -> Result<V::Value, QapiError> {
        self.deserialize_str(visitor)
    }

    fn deserialize_bytes<V: Visitor<'a>>(self, visitor: V) -> Result<V::Value, QapiError> {
        self.deserialize_str(visitor)
    }

    fn deserialize_byte_buf<V: Visitor<'a>>(self, visitor: V) -> Result<V::Value, QapiError> {
        self.deserialize_str(visitor)
    }

    fn deserialize_option<V: Visitor<'a>>(self, visitor: V) -> Result<V::Value, QapiError> {
        if self.value.is_some() { visitor.visit_some(self) } else { visitor.visit_none() }
    }

    fn deserialize_unit<V: Visitor<'a>>(self, visitor: V) -> Result<V::Value, QapiError> {
        visitor.visit_unit()
    }

    fn deserialize_unit_struct<V: Visitor<'a>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, QapiError> {
        visitor.visit_unit()
    }

    fn deserialize_newtype_struct<V: Visitor<'a>>(
        self,
        name: &'static str,
        visitor: V,
    ) -> Result<V::Value, QapiError> {
        if name == SIZE_NEWTYPE {
            return visitor.visit_u64(self.size()?);
        }
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_seq<V: Visitor<'a>>(self, visitor: V) -> Result<V::Value, QapiError> {
        match (self.mode, self.present()?) {
            (_, Value::Array(items)) => visitor.visit_seq(Elements { items, next: 0, parent: &self }),
            // A keyval key given once is a one-element list (`hostfwd=…` without repetition).
            (Mode::Keyval, single @ Value::String(_)) => visitor.visit_seq(Elements {
                items: std::slice::from_ref(single),
                next: 0,
                parent: &self,
            }),
            _ => Err(self.invalid_type("array")),
        }
    }

    fn deserialize_tuple<V: Visitor<'a>>(self, _len: usize, visitor: V) -> Result<V::Value, QapiError> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_tuple_struct<V: Visitor<'a>>(
        self,
        _name: &'static str,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, QapiError> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_map<V: Visitor<'a>>(self, visitor: V) -> Result<V::Value, QapiError> {
        let object = self.object()?;
        visitor.visit_map(FreeMap { entries: object.iter(), pending: None, parent: &self })
    }

    fn deserialize_struct<V: Visitor<'a>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, QapiError> {
        // In keyval form a list of fat strings is written `dnssearch=a,dnssearch=b`.
        if let (Mode::Keyval, Some(text @ Value::String(_)), ["str"]) = (self.mode, self.value, fields) {
            return visitor.visit_map(FatString { text: Some(text), parent: &self });
        }
        self.object()?;
        let value = visitor.visit_map(Members { fields, next: 0, parent: &self })?;
        self.check_unexpected(fields)?;
        Ok(value)
    }

    fn deserialize_enum<V: Visitor<'a>>(
        self,
        name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, QapiError> {
        match (self.present()?, name == FLAT_UNION) {
            // A QAPI enum: the value names a unit variant.
            (Value::String(s), false) => {
                if !variants.contains(&s.as_str()) {
                    return Err(QapiError::BadEnumValue { name: self.bare_name(), value: s.clone() });
                }
                visitor.visit_enum(Variant { tag: s, is_union: false, parent: self })
            }
            // A QAPI flat union: the variant is named by the `type` member of the same object.
            (Value::Object(object), true) => {
                let tag_input = self.member(UNION_TAG);
                let tag = tag_input.string()?;
                if !variants.contains(&tag) {
                    return Err(QapiError::BadEnumValue {
                        name: tag_input.bare_name(),
                        value: tag.to_owned(),
                    });
                }
                debug_assert!(object.contains_key(UNION_TAG));
                visitor.visit_enum(Variant { tag, is_union: true, parent: self })
            }
            (_, false) => Err(self.invalid_type("string")),
            (_, true) => Err(self.invalid_type("object")),
        }
    }

    fn deserialize_identifier<V: Visitor<'a>>(self, visitor: V) -> Result<V::Value, QapiError> {
        self.deserialize_str(visitor)
    }

    fn deserialize_ignored_any<V: Visitor<'a>>(self, visitor: V) -> Result<V::Value, QapiError> {
        visitor.visit_unit()
    }
}

impl Input<'_> {
    /// QEMU's `visit_check_struct`: after all members were read, any other key is an error.
    fn check_unexpected(&self, fields: &[&str]) -> Result<(), QapiError> {
        let Some(Value::Object(object)) = self.value else { return Ok(()) };
        match object.keys().find(|k| !fields.contains(&k.as_str()) && !self.consumed.contains(&k.as_str())) {
            Some(extra) => Err(QapiError::Unexpected(self.child_path(extra))),
            None => Ok(()),
        }
    }
}

/// Struct members in schema order, absent ones included.
struct Members<'p, 'a> {
    fields: &'static [&'static str],
    next: usize,
    parent: &'p Input<'a>,
}

impl<'a> MapAccess<'a> for Members<'_, 'a> {
    type Error = QapiError;

    fn next_key_seed<K: DeserializeSeed<'a>>(&mut self, seed: K) -> Result<Option<K::Value>, QapiError> {
        let Some(field) = self.fields.get(self.next) else { return Ok(None) };
        seed.deserialize(field.into_deserializer()).map(Some)
    }

    fn next_value_seed<S: DeserializeSeed<'a>>(&mut self, seed: S) -> Result<S::Value, QapiError> {
        let field = self.fields.get(self.next).copied().unwrap_or_default();
        self.next += 1;
        seed.deserialize(self.parent.member(field))
    }
}

/// A keyval string standing for `{"str": …}`.
struct FatString<'p, 'a> {
    text: Option<&'a Value>,
    parent: &'p Input<'a>,
}

impl<'a> MapAccess<'a> for FatString<'_, 'a> {
    type Error = QapiError;

    fn next_key_seed<K: DeserializeSeed<'a>>(&mut self, seed: K) -> Result<Option<K::Value>, QapiError> {
        if self.text.is_none() {
            return Ok(None);
        }
        seed.deserialize("str".into_deserializer()).map(Some)
    }

    fn next_value_seed<S: DeserializeSeed<'a>>(&mut self, seed: S) -> Result<S::Value, QapiError> {
        let path = self.parent.child_path("str");
        seed.deserialize(Input { value: self.text.take(), path, mode: self.parent.mode, consumed: &[] })
    }
}

/// A free-form object (`any`-typed maps), in input order.
struct FreeMap<'p, 'a> {
    entries: serde_json::map::Iter<'a>,
    pending: Option<(&'a String, &'a Value)>,
    parent: &'p Input<'a>,
}

impl<'a> MapAccess<'a> for FreeMap<'_, 'a> {
    type Error = QapiError;

    fn next_key_seed<K: DeserializeSeed<'a>>(&mut self, seed: K) -> Result<Option<K::Value>, QapiError> {
        self.pending = self.entries.next();
        match self.pending {
            Some((key, _)) => seed.deserialize(key.as_str().into_deserializer()).map(Some),
            None => Ok(None),
        }
    }

    fn next_value_seed<S: DeserializeSeed<'a>>(&mut self, seed: S) -> Result<S::Value, QapiError> {
        let (key, value) = self.pending.take().ok_or_else(|| QapiError::Custom("value without key".into()))?;
        seed.deserialize(Input {
            value: Some(value),
            path: self.parent.child_path(key),
            mode: self.parent.mode,
            consumed: &[],
        })
    }
}

struct Elements<'p, 'a> {
    items: &'a [Value],
    next: usize,
    parent: &'p Input<'a>,
}

impl<'a> SeqAccess<'a> for Elements<'_, 'a> {
    type Error = QapiError;

    fn next_element_seed<T: DeserializeSeed<'a>>(&mut self, seed: T) -> Result<Option<T::Value>, QapiError> {
        let Some(item) = self.items.get(self.next) else { return Ok(None) };
        let path = format!("{}[{}]", self.parent.path_or_null(), self.next);
        self.next += 1;
        seed.deserialize(Input { value: Some(item), path, mode: self.parent.mode, consumed: &[] }).map(Some)
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.items.len() - self.next)
    }
}

/// An enum value or a flat union's variant. For a union the variant's members are the rest of the
/// same object.
struct Variant<'a> {
    tag: &'a str,
    is_union: bool,
    parent: Input<'a>,
}

const TAG_CONSUMED: &[&str] = &[UNION_TAG];

impl<'a> EnumAccess<'a> for Variant<'a> {
    type Error = QapiError;
    type Variant = Self;

    fn variant_seed<S: DeserializeSeed<'a>>(self, seed: S) -> Result<(S::Value, Self), QapiError> {
        let tag = seed.deserialize(self.tag.into_deserializer())?;
        Ok((tag, self))
    }
}

impl<'a> VariantAccess<'a> for Variant<'a> {
    type Error = QapiError;

    fn unit_variant(self) -> Result<(), QapiError> {
        Ok(())
    }

    fn newtype_variant_seed<S: DeserializeSeed<'a>>(self, seed: S) -> Result<S::Value, QapiError> {
        if !self.is_union {
            return Err(self.parent.invalid_type("object"));
        }
        // The union's base members (and its tag) were read by the caller; the variant reads the rest.
        let consumed = if self.parent.consumed.is_empty() { TAG_CONSUMED } else { self.parent.consumed };
        seed.deserialize(Input { consumed, ..self.parent })
    }

    fn tuple_variant<V: Visitor<'a>>(self, _len: usize, _visitor: V) -> Result<V::Value, QapiError> {
        Err(self.parent.invalid_type("object"))
    }

    fn struct_variant<V: Visitor<'a>>(
        self,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, QapiError> {
        if !self.is_union {
            return Err(self.parent.invalid_type("object"));
        }
        let consumed = if self.parent.consumed.is_empty() { TAG_CONSUMED } else { self.parent.consumed };
        de::Deserializer::deserialize_struct(Input { consumed, ..self.parent }, "", fields, visitor)
    }
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;
    use serde_json::json;

    use super::*;
    use crate::qapi::{QapiString, Size, from_json};

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(rename_all = "kebab-case")]
    struct Inner {
        host: String,
        port: String,
        to: Option<u16>,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(rename_all = "kebab-case")]
    enum Mood {
        Happy,
        Sad,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(rename_all = "kebab-case", rename = "QapiFlatUnion")]
    enum Address {
        Inet(Inner),
        Unix(QapiString),
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(rename_all = "kebab-case")]
    struct Outer {
        hubid: i32,
        flag: Option<bool>,
        mood: Option<Mood>,
        list: Option<Vec<QapiString>>,
        addr: Option<Address>,
        size: Option<Size>,
    }

    fn json_err(v: serde_json::Value) -> String {
        from_json::<Outer>(&v).unwrap_err().to_string()
    }

    fn keyval(v: serde_json::Value) -> Result<Outer, QapiError> {
        Outer::deserialize(Input::root(&v, Mode::Keyval))
    }

    #[test]
    fn members_in_schema_order() {
        // `hubid` is visited first, so it is reported even though `flag` is also wrong.
        assert_eq!(json_err(json!({"flag": 1})), "Parameter 'hubid' is missing");
        assert_eq!(json_err(json!({"hubid": 0, "flag": 1})), "Invalid parameter type for 'flag', expected: boolean");
        // Unexpected keys only after every member is fine.
        assert_eq!(json_err(json!({"bogus": 1, "flag": 1, "hubid": 0})), "Invalid parameter type for 'flag', expected: boolean");
        assert_eq!(json_err(json!({"bogus": 1, "hubid": 0})), "Parameter 'bogus' is unexpected");
    }

    #[test]
    fn integers() {
        assert_eq!(json_err(json!({"hubid": "x"})), "Invalid parameter type for 'hubid', expected: integer");
        assert_eq!(json_err(json!({"hubid": 1.5})), "Invalid parameter type for 'hubid', expected: integer");
        assert_eq!(json_err(json!({"hubid": 2_147_483_648_i64})), "Parameter 'hubid' expects int32_t");
        assert_eq!(from_json::<Outer>(&json!({"hubid": -1})).unwrap().hubid, -1);
        assert_eq!(json_err(json!({"hubid": u64::MAX})), "Invalid parameter type for 'hubid', expected: integer");
        // Unsigned members: a non-integer is a bad *value*, a negative one wraps modulo 2^64.
        let addr = |to: serde_json::Value| json!({"hubid": 0, "addr": {"type": "inet", "host": "h", "port": "1", "to": to}});
        assert_eq!(json_err(addr(json!("x"))), "Parameter 'addr.to' expects uint64");
        assert_eq!(json_err(addr(json!(1.5))), "Parameter 'addr.to' expects uint64");
        assert_eq!(json_err(addr(json!(-1))), "Parameter 'to' expects uint16_t");
        assert_eq!(from_json::<Outer>(&json!({"hubid": 0, "size": -1})).unwrap().size, Some(Size(u64::MAX)));
    }

    #[test]
    fn enums_and_lists() {
        assert_eq!(json_err(json!({"hubid": 0, "mood": "meh"})), "Parameter 'mood' does not accept value 'meh'");
        assert_eq!(json_err(json!({"hubid": 0, "list": "a"})), "Invalid parameter type for 'list', expected: array");
        assert_eq!(json_err(json!({"hubid": 0, "list": ["a"]})), "Invalid parameter type for 'list[0]', expected: object");
        assert_eq!(json_err(json!({"hubid": 0, "list": [{"str": "a", "x": 1}]})), "Parameter 'list[0].x' is unexpected");
        let ok = from_json::<Outer>(&json!({"hubid": 0, "mood": "sad", "list": [{"str": "a"}]})).unwrap();
        assert_eq!(ok.mood, Some(Mood::Sad));
        assert_eq!(ok.list, Some(vec![QapiString { str: "a".into() }]));
    }

    #[test]
    fn flat_unions() {
        assert_eq!(json_err(json!({"hubid": 0, "addr": {}})), "Parameter 'addr.type' is missing");
        // Bad enum values and out-of-range integers name the member alone (`qapi-visit-core.c`).
        assert_eq!(json_err(json!({"hubid": 0, "addr": {"type": "x"}})), "Parameter 'type' does not accept value 'x'");
        assert_eq!(json_err(json!({"hubid": 0, "addr": {"type": "inet", "host": "h"}})), "Parameter 'addr.port' is missing");
        assert_eq!(
            json_err(json!({"hubid": 0, "addr": {"type": "inet", "host": "h", "port": "1", "x": 1}})),
            "Parameter 'addr.x' is unexpected"
        );
        assert_eq!(json_err(json!({"hubid": 0, "addr": {"type": "inet", "host": "h", "port": "1", "to": 70000}})), "Parameter 'to' expects uint16_t");
        // A union must be an object, an enum a string, whatever the value.
        assert_eq!(json_err(json!({"hubid": 0, "addr": "inet"})), "Invalid parameter type for 'addr', expected: object");
        assert_eq!(json_err(json!({"hubid": 0, "addr": 1})), "Invalid parameter type for 'addr', expected: object");
        assert_eq!(json_err(json!({"hubid": 0, "mood": {"type": "sad"}})), "Invalid parameter type for 'mood', expected: string");
        assert_eq!(json_err(json!({"hubid": 0, "mood": 1})), "Invalid parameter type for 'mood', expected: string");
        let ok = from_json::<Outer>(&json!({"hubid": 0, "addr": {"type": "unix", "str": "p"}})).unwrap();
        assert_eq!(ok.addr, Some(Address::Unix(QapiString { str: "p".into() })));
    }

    #[test]
    fn keyval_scalars() {
        let ok = keyval(json!({"hubid": "0x10", "flag": "on", "list": ["a", "b"], "size": "2k"})).unwrap();
        assert_eq!(ok.hubid, 16);
        assert_eq!(ok.flag, Some(true));
        assert_eq!(ok.list.map(|l| l.len()), Some(2));
        assert_eq!(ok.size, Some(Size(2048)));
        let one = keyval(json!({"hubid": "-3", "list": "a"})).unwrap();
        assert_eq!((one.hubid, one.list.map(|l| l.len())), (-3, Some(1)));
        assert_eq!(keyval(json!({"hubid": "x"})).unwrap_err().to_string(), "Parameter 'hubid' expects integer");
        assert_eq!(keyval(json!({"hubid": "1", "flag": "maybe"})).unwrap_err().to_string(), "Parameter 'flag' expects 'on' or 'off'");
        assert_eq!(keyval(json!({"hubid": "99999999999"})).unwrap_err().to_string(), "Parameter 'hubid' expects int32_t");
        // Beyond 64 bits `qemu_strtoi64` itself fails.
        assert_eq!(keyval(json!({"hubid": "99999999999999999999"})).unwrap_err().to_string(), "Parameter 'hubid' expects integer");
        assert_eq!(keyval(json!({"hubid": "0", "size": "1x"})).unwrap_err().to_string(), "Parameter 'size' expects size");
        assert_eq!(keyval_integer("-1", true), Some(i128::from(u64::MAX)));
        assert_eq!(keyval_integer("-1", false), Some(-1));
        assert_eq!(keyval_integer("18446744073709551616", true), None);
    }

    #[test]
    fn c_integers() {
        assert_eq!(parse_c_integer("42"), Some(42));
        assert_eq!(parse_c_integer("-0x1f"), Some(-31));
        assert_eq!(parse_c_integer("010"), Some(8));
        assert_eq!(parse_c_integer(""), None);
        assert_eq!(parse_c_integer("--1"), None);
        assert_eq!(parse_c_integer("1x"), None);
        assert_eq!(parse_c_integer("0x"), None);
        assert_eq!(parse_c_integer("0x-1"), None);
        assert_eq!(parse_c_integer("0+7"), None);
        assert_eq!(parse_c_integer("08"), None);
    }
}
