//! QMP framing. Input is a stream of JSON values (QEMU does not require newlines); output is one
//! JSON object per line, ASCII only, with QEMU's `": "`/`", "` spacing and CRLF line ends.

use bytes::{Buf, BytesMut};
use serde::Serialize;
use serde_json::{Value, ser::Formatter};

/// What the reader found in the input stream.
#[derive(Debug, Clone, PartialEq)]
pub enum Inbound {
    /// A complete JSON value (not necessarily an object).
    Value(Value),
    /// Input that is not JSON; answered with an error, then reading goes on.
    SyntaxError(String),
}

/// Splits a byte stream into JSON values, with a bound on the size of one value.
#[derive(Debug)]
pub struct Decoder {
    max_message_bytes: usize,
    /// After an error: the rest of the broken value is being skipped.
    skipping: Option<Skip>,
}

/// Where the skipper is inside the broken value, carried across reads.
#[derive(Debug, Default, Clone, Copy)]
struct Skip {
    depth: usize,
    in_string: bool,
    escaped: bool,
    /// A bare token (or string) outside any brackets is being skipped.
    bare: bool,
}

impl Skip {
    /// Consumes bytes of the broken value; returns how many, and whether it is over. Like QEMU's
    /// JSON streamer, a value ends where its brackets balance; a bare token ends at the next
    /// delimiter.
    fn advance(&mut self, bytes: &[u8]) -> (usize, bool) {
        for (i, &byte) in bytes.iter().enumerate() {
            if self.in_string {
                match (self.escaped, byte) {
                    (true, _) => self.escaped = false,
                    (false, b'\\') => self.escaped = true,
                    (false, b'"') => self.in_string = false,
                    _ => {}
                }
                continue;
            }
            let outside = self.depth == 0;
            match byte {
                b'{' | b'[' if outside && self.bare => return (i, true),
                b'{' | b'[' => self.depth += 1,
                b'}' | b']' if self.depth <= 1 => return (i + 1, true),
                b'}' | b']' => self.depth -= 1,
                b' ' | b'\t' | b'\r' | b'\n' if outside && self.bare => return (i, true),
                b' ' | b'\t' | b'\r' | b'\n' => {}
                b'"' => {
                    self.in_string = true;
                    self.bare |= outside;
                }
                _ => self.bare |= outside,
            }
        }
        (bytes.len(), false)
    }
}

impl Decoder {
    #[must_use]
    pub const fn new(max_message_bytes: usize) -> Self {
        Self { max_message_bytes, skipping: None }
    }

    /// Takes the next complete value out of `buf`, if there is one.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Option<Inbound> {
        loop {
            if let Some(skip) = self.skipping.as_mut() {
                let (consumed, done) = skip.advance(buf);
                buf.advance(consumed);
                if !done {
                    return None;
                }
                self.skipping = None;
            }
            let start = buf.iter().position(|b| !b.is_ascii_whitespace()).unwrap_or(buf.len());
            buf.advance(start);
            if buf.is_empty() {
                return None;
            }
            let mut values = serde_json::Deserializer::from_slice(buf).into_iter::<Value>();
            match values.next() {
                Some(Ok(value)) => {
                    let consumed = values.byte_offset();
                    buf.advance(consumed);
                    return Some(Inbound::Value(value));
                }
                Some(Err(error)) if error.is_eof() => {
                    if buf.len() > self.max_message_bytes {
                        self.skipping = Some(Skip::default());
                        return Some(Inbound::SyntaxError(format!(
                            "JSON token size limit exceeded (a message may hold at most {} bytes)",
                            self.max_message_bytes
                        )));
                    }
                    return None;
                }
                Some(Err(error)) => {
                    self.skipping = Some(Skip::default());
                    return Some(Inbound::SyntaxError(format!("JSON parse error, {error}")));
                }
                None => continue,
            }
        }
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
        let mut buf = BytesMut::from(&br#"{"a": [nope, {"#[..]);
        assert!(matches!(decoder.decode(&mut buf), Some(Inbound::SyntaxError(_))));
        assert_eq!(decoder.decode(&mut buf), None);
        buf.extend_from_slice(br#"}]} garbage{"ok": 2}"#);
        let rest: Vec<_> = std::iter::from_fn(|| decoder.decode(&mut buf)).collect();
        assert!(matches!(&rest[0], Inbound::SyntaxError(_)), "{rest:?}");
        assert_eq!(rest[1], Inbound::Value(json!({"ok": 2})));
    }

    #[test]
    fn oversized_message_is_refused() {
        let mut decoder = Decoder::new(16);
        let mut buf = BytesMut::from(&br#"{"execute": "aaaaaaaaaaaaaaaaaaaaaaaa"#[..]);
        assert!(matches!(decoder.decode(&mut buf), Some(Inbound::SyntaxError(e)) if e.contains("size limit")));
        buf.extend_from_slice(b"\"}\n{\"ok\": 1}\n");
        assert_eq!(decoder.decode(&mut buf), Some(Inbound::Value(json!({"ok": 1}))));
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
