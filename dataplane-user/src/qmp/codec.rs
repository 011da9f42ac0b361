//! QMP framing. Input is a stream of JSON values (QEMU does not require newlines); output is one
//! JSON object per line, ASCII only, with QEMU's `": "`/`", "` spacing and CRLF line ends.
//!
//! Input is scanned once, incrementally, as QEMU's JSON lexer and streamer do: the scanner keeps
//! its place (string, escape, nesting) across reads, so a request sent a byte at a time costs no
//! more than one sent at once. A complete value is parsed once, and checked for duplicate keys.

use std::fmt;

use bytes::{Buf, BytesMut};
use serde::{
    Serialize,
    de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor},
};
use serde_json::{Map, Value, ser::Formatter};

/// QEMU's `MAX_TOKEN_SIZE` (qobject/json-streamer.c): the most bytes one value may hold.
pub const MAX_MESSAGE_BYTES_LIMIT: usize = 64 << 20;
/// QEMU's `MAX_TOKEN_COUNT`.
const MAX_TOKEN_COUNT: usize = 2 << 20;
/// QEMU's `MAX_NESTING`.
const MAX_NESTING: usize = 1024;

const SIZE_LIMIT: &str = "JSON token size limit exceeded";
const COUNT_LIMIT: &str = "JSON token count limit exceeded";
const NESTING_LIMIT: &str = "JSON nesting depth limit exceeded";
const DUPLICATE_KEY: &str = "duplicate key";

/// What the reader found in the input stream.
#[derive(Debug, Clone, PartialEq)]
pub enum Inbound {
    /// A complete JSON value (not necessarily an object).
    Value(Value),
    /// Input that is not JSON; answered with an error, then reading goes on.
    SyntaxError(String),
}

/// Splits a byte stream into JSON values, with QEMU's bounds on one value.
#[derive(Debug)]
pub struct Decoder {
    max_message_bytes: usize,
    scan: Scan,
    /// Bytes at the front of the buffer that belong to the current value and have been scanned.
    scanned: usize,
    /// The current value broke a limit: its bytes are dropped until it ends.
    discarding: bool,
    /// Bytes examined so far, by the scanner and the parser (tests check the work stays linear).
    work: u64,
}

/// Where the scanner is inside the current value, carried across reads.
#[derive(Debug, Default, Clone, Copy)]
struct Scan {
    depth: usize,
    in_string: bool,
    escaped: bool,
    /// Inside a keyword or number.
    in_word: bool,
    /// The value is a bare token (string, keyword, number) outside any brackets.
    bare: bool,
    tokens: usize,
}

/// What one byte did to the current value.
enum Step {
    More,
    /// The value ends before this byte (a bare token ended at a delimiter).
    EndsBefore,
    /// The value ends with this byte.
    EndsWith,
    /// A byte that no JSON token can hold: QEMU's lexer resets on it.
    Stray(u8),
    Limit(&'static str),
}

impl Scan {
    fn step(&mut self, byte: u8) -> Step {
        if self.in_string {
            match (self.escaped, byte) {
                (_, 0x00..=0x1f | 0xfe | 0xff) => return Step::Stray(byte),
                (true, _) => self.escaped = false,
                (false, b'\\') => self.escaped = true,
                (false, b'"') => {
                    self.in_string = false;
                    if self.depth == 0 {
                        return Step::EndsWith;
                    }
                }
                _ => {}
            }
            return Step::More;
        }
        let was_in_word = std::mem::take(&mut self.in_word);
        match byte {
            b' ' | b'\t' | b'\r' | b'\n' => {
                if self.bare {
                    return Step::EndsBefore;
                }
            }
            b'{' | b'[' => {
                if self.bare {
                    return Step::EndsBefore;
                }
                self.depth += 1;
                self.tokens += 1;
                if self.depth > MAX_NESTING {
                    return Step::Limit(NESTING_LIMIT);
                }
            }
            b'}' | b']' => {
                if self.bare {
                    return Step::EndsBefore;
                }
                self.tokens += 1;
                // A closer with nothing open is a value of its own, as in QEMU's streamer.
                if self.depth <= 1 {
                    return Step::EndsWith;
                }
                self.depth -= 1;
            }
            b',' | b':' => {
                if self.bare {
                    return Step::EndsBefore;
                }
                self.tokens += 1;
                if self.depth == 0 {
                    return Step::EndsWith;
                }
            }
            b'"' => {
                if self.bare {
                    return Step::EndsBefore;
                }
                self.in_string = true;
                self.tokens += 1;
                self.bare = self.depth == 0;
            }
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'+' | b'-' | b'.' => {
                self.in_word = true;
                if !was_in_word {
                    self.tokens += 1;
                }
                self.bare |= self.depth == 0;
            }
            other => return Step::Stray(other),
        }
        if self.tokens > MAX_TOKEN_COUNT {
            return Step::Limit(COUNT_LIMIT);
        }
        Step::More
    }
}

impl Decoder {
    #[must_use]
    pub fn new(max_message_bytes: usize) -> Self {
        Self { max_message_bytes, scan: Scan::default(), scanned: 0, discarding: false, work: 0 }
    }

    /// Bytes examined so far: each input byte is scanned once and parsed at most once.
    #[must_use]
    pub const fn work(&self) -> u64 {
        self.work
    }

    /// Takes the next complete value (or error) out of `buf`, if there is one.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Option<Inbound> {
        loop {
            if self.scanned == 0 && !self.discarding {
                let start = buf.iter().position(|b| !b.is_ascii_whitespace()).unwrap_or(buf.len());
                self.work += start as u64;
                buf.advance(start);
            }
            if buf.len() == self.scanned {
                return None;
            }
            let from = self.scanned;
            let found = buf[from..].iter().enumerate().find_map(|(offset, &byte)| match self.scan.step(byte) {
                Step::More => None,
                Step::EndsBefore => Some((from + offset, Step::EndsBefore)),
                other => Some((from + offset + 1, other)),
            });
            let Some((end, step)) = found else {
                self.work += (buf.len() - from) as u64;
                self.scanned = buf.len();
                if self.discarding {
                    buf.clear();
                    self.scanned = 0;
                } else if buf.len() > self.max_message_bytes {
                    return Some(self.start_discarding(buf, SIZE_LIMIT));
                }
                return None;
            };
            self.work += (end - from) as u64;
            match step {
                Step::Limit(limit) => {
                    if self.discarding {
                        buf.advance(end);
                        self.scanned = 0;
                        continue;
                    }
                    self.scanned = end;
                    return Some(self.start_discarding(buf, limit));
                }
                Step::Stray(byte) => {
                    // QEMU's lexer drops everything up to a stray byte and starts afresh.
                    buf.advance(end);
                    self.finish_value();
                    if std::mem::take(&mut self.discarding) {
                        continue;
                    }
                    return Some(Inbound::SyntaxError(format!("JSON parse error, stray '{}'", char::from(byte))));
                }
                Step::More | Step::EndsBefore | Step::EndsWith => {
                    let value = buf.split_to(end);
                    self.finish_value();
                    if std::mem::take(&mut self.discarding) {
                        continue;
                    }
                    if end > self.max_message_bytes {
                        return Some(Inbound::SyntaxError(SIZE_LIMIT.to_owned()));
                    }
                    self.work += end as u64;
                    return Some(parse(&value));
                }
            }
        }
    }

    fn finish_value(&mut self) {
        self.scan = Scan::default();
        self.scanned = 0;
    }

    /// Reports a broken limit and drops what there is of the value; the scanner keeps its place
    /// to find the value's end, and drops the rest as it comes.
    fn start_discarding(&mut self, buf: &mut BytesMut, error: &str) -> Inbound {
        buf.advance(self.scanned);
        self.scanned = 0;
        self.discarding = true;
        Inbound::SyntaxError(error.to_owned())
    }
}

/// Parses one complete value, refusing duplicate keys as QEMU's parser does.
fn parse(bytes: &[u8]) -> Inbound {
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let parsed = StrictValue.deserialize(&mut deserializer).and_then(|value| deserializer.end().map(|()| value));
    match parsed {
        Ok(value) => Inbound::Value(value),
        Err(error) if error.to_string().starts_with(DUPLICATE_KEY) => {
            Inbound::SyntaxError(format!("JSON parse error, {DUPLICATE_KEY}"))
        }
        Err(error) => Inbound::SyntaxError(format!("JSON parse error, {error}")),
    }
}

/// A JSON value whose objects may not repeat a key.
struct StrictValue;

impl<'de> DeserializeSeed<'de> for StrictValue {
    type Value = Value;

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for StrictValue {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(v.into())
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(v.into())
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element_seed(Self)? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut members = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if members.contains_key(&key) {
                return Err(de::Error::custom(DUPLICATE_KEY));
            }
            let value = map.next_value_seed(Self)?;
            members.insert(key, value);
        }
        Ok(Value::Object(members))
    }
}
/// Serialises one server message as QEMU does, including the line end.
#[must_use]
pub fn encode(message: &Value) -> Vec<u8> {
    let mut out = Vec::with_capacity(128);
    let mut serializer = serde_json::Serializer::with_formatter(&mut out, QemuFormatter);
    // Serialising a `Value` into a Vec cannot fail.
    if message.serialize(&mut serializer).is_err() {
        out.clear();
        out.extend_from_slice(b"{}");
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// `qobject/json-writer.c`: `": "` after keys, `", "` between members, control characters, DEL and
/// non-ASCII as upper-case `\uXXXX`.
struct QemuFormatter;

impl Formatter for QemuFormatter {
    fn write_char_escape<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        escape: serde_json::ser::CharEscape,
    ) -> std::io::Result<()> {
        use serde_json::ser::CharEscape;
        let short: &[u8] = match escape {
            CharEscape::Quote => b"\\\"",
            CharEscape::ReverseSolidus => b"\\\\",
            CharEscape::Solidus => b"\\/",
            CharEscape::Backspace => b"\\b",
            CharEscape::FormFeed => b"\\f",
            CharEscape::LineFeed => b"\\n",
            CharEscape::CarriageReturn => b"\\r",
            CharEscape::Tab => b"\\t",
            CharEscape::AsciiControl(byte) => return write!(writer, "\\u{byte:04X}"),
        };
        writer.write_all(short)
    }

    fn begin_array_value<W: ?Sized + std::io::Write>(&mut self, writer: &mut W, first: bool) -> std::io::Result<()> {
        if first { Ok(()) } else { writer.write_all(b", ") }
    }

    fn begin_object_key<W: ?Sized + std::io::Write>(&mut self, writer: &mut W, first: bool) -> std::io::Result<()> {
        if first { Ok(()) } else { writer.write_all(b", ") }
    }

    fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, writer: &mut W) -> std::io::Result<()> {
        writer.write_all(b": ")
    }

    fn write_string_fragment<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        fragment: &str,
    ) -> std::io::Result<()> {
        for c in fragment.chars() {
            if c.is_ascii() && c != '\x7f' {
                writer.write_all(&[c as u8])?;
            } else {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    write!(writer, "\\u{unit:04X}")?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::json;

    use super::*;

    fn decode_all(decoder: &mut Decoder, input: &[u8]) -> Vec<Inbound> {
        let mut buf = BytesMut::from(input);
        std::iter::from_fn(|| decoder.decode(&mut buf)).collect()
    }

    #[test]
    fn values_without_newlines_and_split_reads() {
        let mut decoder = Decoder::new(1024);
        assert_eq!(
            decode_all(&mut decoder, br#"{"a":1}{"b":2} [3]"#),
            vec![Inbound::Value(json!({"a": 1})), Inbound::Value(json!({"b": 2})), Inbound::Value(json!([3]))]
        );
        let mut buf = BytesMut::from(&br#"{"execute": "qmp_"#[..]);
        assert_eq!(decoder.decode(&mut buf), None);
        buf.extend_from_slice(b"capabilities\"}\n");
        assert_eq!(decoder.decode(&mut buf), Some(Inbound::Value(json!({"execute": "qmp_capabilities"}))));
    }

    #[test]
    fn syntax_error_then_recovery() {
        let mut decoder = Decoder::new(1024);
        let out = decode_all(&mut decoder, b"{\"a\": nope}\n{\"b\": 1}\n");
        assert!(matches!(&out[0], Inbound::SyntaxError(e) if e.starts_with("JSON parse error")));
        assert_eq!(out[1], Inbound::Value(json!({"b": 1})));
        // The next request may follow on the same line, or in a later read.
        let out = decode_all(&mut decoder, br#"{"execute": nope, "x": "}{"}{"id": 1}"#);
        assert_eq!(out.len(), 2);
        assert_eq!(out[1], Inbound::Value(json!({"id": 1})));
        // As QEMU's streamer, a broken value ends where its brackets balance.
        let mut buf = BytesMut::from(&br#"{"a": [nope, {"#[..]);
        assert_eq!(decoder.decode(&mut buf), None);
        buf.extend_from_slice(br#"}]} garbage{"ok": 2}"#);
        let rest: Vec<_> = std::iter::from_fn(|| decoder.decode(&mut buf)).collect();
        assert_eq!(rest.len(), 3, "{rest:?}");
        assert!(matches!(&rest[0], Inbound::SyntaxError(_)), "{rest:?}");
        assert!(matches!(&rest[1], Inbound::SyntaxError(_)), "{rest:?}");
        assert_eq!(rest[2], Inbound::Value(json!({"ok": 2})));
    }

    #[test]
    fn stray_byte_resets_like_qemus_lexer() {
        // Clients recover a confused parser by sending a control character.
        let mut decoder = Decoder::new(1024);
        let out = decode_all(&mut decoder, b"{\"execute\": [\"unfinished\x01{\"id\": 1}");
        assert_eq!(out, vec![Inbound::SyntaxError("JSON parse error, stray '\u{1}'".into()), Inbound::Value(json!({"id": 1}))]);
        let out = decode_all(&mut decoder, b"{\"a\": \xff}{\"id\": 2}");
        assert_eq!(out[0], Inbound::SyntaxError("JSON parse error, stray '\u{ff}'".into()));
        assert_eq!(out[2], Inbound::Value(json!({"id": 2})), "{out:?}");
    }

    #[test]
    fn duplicate_key_is_refused_as_qemu_does() {
        let mut decoder = Decoder::new(1024);
        let out = decode_all(
            &mut decoder,
            br#"{"execute": "a", "execute": "b"}{"id": 1, "arguments": {"x": 1, "x": 2}}{"id": 2, "arguments": {"x": {"y": 1}, "y": {"y": 2}}}"#,
        );
        assert_eq!(out[0], Inbound::SyntaxError("JSON parse error, duplicate key".into()));
        assert_eq!(out[1], Inbound::SyntaxError("JSON parse error, duplicate key".into()));
        // The same key in different objects is fine.
        assert_eq!(out[2], Inbound::Value(json!({"id": 2, "arguments": {"x": {"y": 1}, "y": {"y": 2}}})));
    }

    #[test]
    fn oversized_message_is_refused() {
        let mut decoder = Decoder::new(16);
        let mut buf = BytesMut::from(&br#"{"execute": "aaaaaaaaaaaaaaaaaaaaaaaa"#[..]);
        assert_eq!(decoder.decode(&mut buf), Some(Inbound::SyntaxError("JSON token size limit exceeded".into())));
        assert!(buf.is_empty(), "the refused bytes are dropped");
        buf.extend_from_slice(b"aaaa\", \"}\": [\"]\"]}\n{\"ok\": 1}\n");
        assert_eq!(decoder.decode(&mut buf), Some(Inbound::Value(json!({"ok": 1}))));
        // A value that arrives whole but too big is refused too.
        let out = decode_all(&mut decoder, br#"{"execute": "aaaaaaaaaaaaaaaaaaaaaaaa"}{"ok": 2}"#);
        assert_eq!(out, vec![Inbound::SyntaxError("JSON token size limit exceeded".into()), Inbound::Value(json!({"ok": 2}))]);
    }

    #[test]
    fn nesting_is_bounded_as_in_qemu() {
        let mut decoder = Decoder::new(1 << 20);
        let deep = format!("{}{}", "[".repeat(MAX_NESTING + 1), "]".repeat(MAX_NESTING + 1));
        let out = decode_all(&mut decoder, format!("{deep}{{\"ok\": 1}}").as_bytes());
        assert_eq!(out, vec![Inbound::SyntaxError("JSON nesting depth limit exceeded".into()), Inbound::Value(json!({"ok": 1}))]);
    }

    #[test]
    fn token_count_is_bounded_as_in_qemu() {
        let mut decoder = Decoder::new(MAX_MESSAGE_BYTES_LIMIT);
        let many = format!("[{}1]{{\"ok\": 1}}", "1,".repeat(MAX_TOKEN_COUNT / 2 + 1));
        let out = decode_all(&mut decoder, many.as_bytes());
        assert_eq!(out, vec![Inbound::SyntaxError("JSON token count limit exceeded".into()), Inbound::Value(json!({"ok": 1}))]);
    }

    /// A request sent a byte at a time is scanned once, not re-parsed from its start on every read
    /// (which made a slowly sent request cost the square of its size).
    #[test]
    fn byte_at_a_time_costs_linear_work() {
        let request = format!(r#"{{"execute": "query-version", "id": "{}"}}"#, "x".repeat(100_000));
        let mut decoder = Decoder::new(1 << 20);
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for &byte in request.as_bytes() {
            buf.extend_from_slice(&[byte]);
            out.extend(std::iter::from_fn(|| decoder.decode(&mut buf)));
        }
        assert_eq!(out.len(), 1);
        assert!(matches!(&out[0], Inbound::Value(v) if v["execute"] == "query-version"));
        let len = request.len() as u64;
        assert!(decoder.work() <= 2 * len, "{} bytes examined for a {len}-byte request", decoder.work());
    }

    #[test]
    fn output_is_qemu_shaped() {
        let line = encode(&json!({"return": {}, "id": [1, "é"]}));
        assert_eq!(line, b"{\"return\": {}, \"id\": [1, \"\\u00E9\"]}\r\n");
        assert_eq!(encode(&json!("\u{1F600}")), b"\"\\uD83D\\uDE00\"\r\n");
        assert_eq!(encode(&json!("\u{7f}\u{1f}\n\"")), b"\"\\u007F\\u001F\\n\\\"\"\r\n");
    }

    proptest! {
        /// Arbitrary bytes, in arbitrary chunks, never panic and never grow the buffer unboundedly.
        #[test]
        fn arbitrary_input_is_handled(chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..16)) {
            let mut decoder = Decoder::new(128);
            let mut buf = BytesMut::new();
            for chunk in chunks {
                buf.extend_from_slice(&chunk);
                while decoder.decode(&mut buf).is_some() {}
                prop_assert!(buf.len() <= 128 + 64);
            }
        }

        /// Every JSON value written by the encoder reads back the same.
        #[test]
        fn encode_decode_roundtrip(s in ".*", n in any::<i64>()) {
            let value = json!({"s": s, "n": n});
            let mut decoder = Decoder::new(1 << 20);
            let mut buf = BytesMut::from(&encode(&value)[..]);
            prop_assert_eq!(decoder.decode(&mut buf), Some(Inbound::Value(value)));
        }
    }
}
