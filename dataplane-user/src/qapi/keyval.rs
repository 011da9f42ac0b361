//! QEMU's keyval syntax, as `qemu-system -netdev` takes it: `tap,id=t0,script=no`.
//!
//! * `key=value` pairs separated by `,`; a `,,` inside a value is a literal comma;
//! * the first element may omit its key, which then is the implied key (`type` for `-netdev`);
//! * dotted keys nest (`addr.type=inet,addr.port=80`), numeric segments index lists (`x.0.str=a`);
//! * a key given more than once collects a list (`hostfwd=…,hostfwd=…`), as QEMU's option visitor does;
//! * every value stays a string; [`super::Mode::Keyval`] converts on demand.

use serde_json::{Map, Value};

/// A keyval syntax error; `Display` follows QEMU's wording where QEMU has one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyvalError {
    #[error("Expected '=' after parameter '{0}'")]
    MissingEquals(String),
    #[error("Invalid parameter '{0}'")]
    InvalidKey(String),
    #[error("Parameter '{0}' used inconsistently")]
    Inconsistent(String),
    #[error("Parameter '{0}': list indexes must be 0, 1, 2… without gaps")]
    SparseList(String),
}

/// Parses `input`; a first element without `=` is the value of `implied_key`.
pub fn parse(input: &str, implied_key: Option<&str>) -> Result<Value, KeyvalError> {
    let mut root = Map::new();
    for (index, element) in split_elements(input).into_iter().enumerate() {
        let (key, value) = match element.split_once('=') {
            Some((key, value)) => (key.to_owned(), value.to_owned()),
            None => match implied_key {
                Some(implied) if index == 0 => (implied.to_owned(), element),
                _ if element.is_empty() => return Err(KeyvalError::InvalidKey(element)),
                _ => return Err(KeyvalError::MissingEquals(element)),
            },
        };
        // A value cannot contain an unescaped `=`-free key part with commas, so only keys need checks.
        if key.is_empty() || key.split('.').any(|segment| segment.is_empty() || !valid_segment(segment)) {
            return Err(KeyvalError::InvalidKey(key));
        }
        insert(&mut root, &key, value)?;
    }
    listify(Value::Object(root), "")
}

fn valid_segment(segment: &str) -> bool {
    segment.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))
}

/// Splits on `,` while turning `,,` into a literal comma.
fn split_elements(input: &str) -> Vec<String> {
    let mut elements = Vec::new();
    let mut current = String::new();
    let mut chars = input.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                current.push(',');
            } else {
                elements.push(std::mem::take(&mut current));
            }
        } else {
            current.push(c);
        }
    }
    if !current.is_empty() || !elements.is_empty() || !input.is_empty() {
        elements.push(current);
    }
    // A trailing comma (`a=1,`) leaves an empty last element that QEMU ignores.
    if elements.last().is_some_and(String::is_empty) && elements.len() > 1 {
        elements.pop();
    }
    elements
}

fn insert(root: &mut Map<String, Value>, key: &str, value: String) -> Result<(), KeyvalError> {
    let mut node = root;
    let segments: Vec<&str> = key.split('.').collect();
    let (last, parents) = segments.split_last().ok_or_else(|| KeyvalError::InvalidKey(key.to_owned()))?;
    for (depth, segment) in parents.iter().enumerate() {
        let entry = node.entry((*segment).to_owned()).or_insert_with(|| Value::Object(Map::new()));
        node = match entry {
            Value::Object(child) => child,
            _ => return Err(KeyvalError::Inconsistent(segments[..=depth].join("."))),
        };
    }
    match node.get_mut(*last) {
        None => {
            node.insert((*last).to_owned(), Value::String(value));
        }
        Some(Value::String(first)) => {
            let first = std::mem::take(first);
            node.insert((*last).to_owned(), Value::Array(vec![Value::String(first), Value::String(value)]));
        }
        Some(Value::Array(items)) => items.push(Value::String(value)),
        Some(_) => return Err(KeyvalError::Inconsistent(key.to_owned())),
    }
    Ok(())
}

/// Turns objects whose keys are all `0`, `1`, … into arrays.
fn listify(value: Value, path: &str) -> Result<Value, KeyvalError> {
    let Value::Object(object) = value else { return Ok(value) };
    let numeric = !object.is_empty() && object.keys().all(|k| k.bytes().all(|b| b.is_ascii_digit()));
    let child_path = |key: &str| if path.is_empty() { key.to_owned() } else { format!("{path}.{key}") };
    if numeric {
        let mut indexed: Vec<(usize, Value)> = Vec::with_capacity(object.len());
        for (key, child) in object {
            let index = key.parse().map_err(|_| KeyvalError::InvalidKey(child_path(&key)))?;
            indexed.push((index, listify(child, &child_path(&key))?));
        }
        indexed.sort_by_key(|(index, _)| *index);
        if indexed.iter().enumerate().any(|(expected, (index, _))| expected != *index) {
            return Err(KeyvalError::SparseList(path.to_owned()));
        }
        return Ok(Value::Array(indexed.into_iter().map(|(_, v)| v).collect()));
    }
    let mut out = Map::with_capacity(object.len());
    for (key, child) in object {
        let child = listify(child, &child_path(&key))?;
        out.insert(key, child);
    }
    Ok(Value::Object(out))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn implied_type_and_pairs() {
        assert_eq!(parse("hubport,id=p0,hubid=0", Some("type")).unwrap(), json!({"type": "hubport", "id": "p0", "hubid": "0"}));
        assert_eq!(parse("id=p0,type=hubport", Some("type")).unwrap(), json!({"id": "p0", "type": "hubport"}));
    }

    #[test]
    fn comma_escape() {
        assert_eq!(parse("user,id=u,guestfwd=tcp:1.2.3.4:80-cmd:a,,b", Some("type")).unwrap()["guestfwd"], json!("tcp:1.2.3.4:80-cmd:a,b"));
        assert_eq!(parse("a=x,,,b=y", None).unwrap(), json!({"a": "x,", "b": "y"}));
    }

    #[test]
    fn dotted_keys_nest() {
        assert_eq!(
            parse("stream,id=s,addr.type=inet,addr.host=127.0.0.1,addr.port=1234", Some("type")).unwrap(),
            json!({"type": "stream", "id": "s", "addr": {"type": "inet", "host": "127.0.0.1", "port": "1234"}})
        );
    }

    #[test]
    fn lists() {
        assert_eq!(parse("hostfwd=a,hostfwd=b,hostfwd=c", None).unwrap(), json!({"hostfwd": ["a", "b", "c"]}));
        assert_eq!(parse("d.1.str=b,d.0.str=a", None).unwrap(), json!({"d": [{"str": "a"}, {"str": "b"}]}));
        assert_eq!(parse("d.0=a,d.2=c", None).unwrap_err(), KeyvalError::SparseList("d".into()));
    }

    #[test]
    fn errors() {
        assert_eq!(parse("id=a,oops", Some("type")).unwrap_err(), KeyvalError::MissingEquals("oops".into()));
        assert_eq!(parse("a..b=1", None).unwrap_err(), KeyvalError::InvalidKey("a..b".into()));
        assert_eq!(parse("=1", None).unwrap_err(), KeyvalError::InvalidKey(String::new()));
        assert_eq!(parse("a=1,a.b=2", None).unwrap_err(), KeyvalError::Inconsistent("a".into()));
        assert_eq!(parse("a.b=2,a=1", None).unwrap_err(), KeyvalError::Inconsistent("a".into()));
    }

    #[test]
    fn trailing_comma_and_empty() {
        assert_eq!(parse("a=1,", None).unwrap(), json!({"a": "1"}));
        assert_eq!(parse("", None).unwrap(), json!({}));
    }
}
