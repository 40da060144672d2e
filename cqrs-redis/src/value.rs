//! Reading raw Redis replies (RESP2 arrays or RESP3 maps).

use redis::Value;

pub(crate) fn bytes(v: &Value) -> Option<&[u8]> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

pub(crate) fn text(v: &Value) -> Option<String> {
    bytes(v).map(|b| String::from_utf8_lossy(b).into_owned())
}

pub(crate) fn int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(i) => Some(*i),
        other => text(other)?.parse().ok(),
    }
}

pub(crate) fn array(v: &Value) -> &[Value] {
    match v {
        Value::Array(items) | Value::Set(items) => items,
        _ => &[],
    }
}

/// Key-value pairs from a flat array or a map.
pub(crate) fn pairs(v: &Value) -> Vec<(&Value, &Value)> {
    match v {
        Value::Map(m) => m.iter().map(|(k, v)| (k, v)).collect(),
        Value::Array(items) => items.chunks_exact(2).map(|c| (&c[0], &c[1])).collect(),
        _ => Vec::new(),
    }
}

/// The value of `field` in a map-like reply.
pub(crate) fn get<'v>(v: &'v Value, field: &str) -> Option<&'v Value> {
    pairs(v)
        .into_iter()
        .find(|(k, _)| bytes(k) == Some(field.as_bytes()))
        .map(|(_, v)| v)
}

/// One stream entry, taken out of a reply: `[id, [field, value, ...]]`; `None` fields for a
/// deleted entry.
pub(crate) struct Entry {
    pub id: String,
    /// The fields as the server sent them (a flat array, or a map over RESP3): read with
    /// [`fields`], which moves the values out.
    pub fields: Option<Value>,
}

fn into_bytes(v: Value) -> Option<Vec<u8>> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.into_bytes()),
        _ => None,
    }
}

/// The bytes of `v`, moved out (`v` is left empty).
fn take_bytes(v: &mut Value) -> Option<Vec<u8>> {
    match v {
        Value::BulkString(b) => Some(std::mem::take(b)),
        Value::SimpleString(s) => Some(std::mem::take(s).into_bytes()),
        _ => None,
    }
}

/// An entry's fields, `(name, value)`, the values moved out of the reply: those whose name and
/// value are bytes. A name is not checked as text here: the decoder recognises reserved names
/// by their bytes and says which header name is not text (a malformed message, dead-lettered,
/// not a header dropped). Read where they lie, not gathered into a list first (that cost an
/// allocation and ~400 instructions an entry, callgrind).
pub(crate) fn fields(v: &mut Value) -> impl Iterator<Item = (&[u8], Vec<u8>)> {
    let (flat, map): (&mut [Value], &mut [(Value, Value)]) = match v {
        Value::Array(items) => (items, &mut []),
        Value::Map(pairs) => (&mut [], pairs),
        _ => (&mut [], &mut []),
    };
    flat.chunks_exact_mut(2)
        .filter_map(|pair| match pair {
            [k, v] => Some((&*k, v)),
            _ => None,
        })
        .chain(map.iter_mut().map(|(k, v)| (&*k, v)))
        .filter_map(|(k, v)| Some((bytes(k)?, take_bytes(v)?)))
}

fn into_array(v: Value) -> Vec<Value> {
    match v {
        Value::Array(items) | Value::Set(items) => items,
        _ => Vec::new(),
    }
}

/// The entries of an `XCLAIM` / `XRANGE` reply.
pub(crate) fn entries(v: Value) -> Vec<Entry> {
    into_array(v)
        .into_iter()
        .filter_map(|e| {
            let mut parts = into_array(e).into_iter();
            let id = String::from_utf8(into_bytes(parts.next()?)?).ok()?;
            let fields = match parts.next() {
                Some(Value::Nil) | None => None,
                Some(f) => Some(f),
            };
            Some(Entry { id, fields })
        })
        .collect()
}

/// XREADGROUP's reply: per stream, its entries.
pub(crate) fn streams(v: Value) -> Vec<(String, Vec<Entry>)> {
    let per_stream: Vec<(Value, Value)> = match v {
        Value::Map(m) => m,
        Value::Array(items) => items
            .into_iter()
            .filter_map(|s| {
                let mut parts = into_array(s).into_iter();
                Some((parts.next()?, parts.next()?))
            })
            .collect(),
        _ => Vec::new(),
    };
    per_stream
        .into_iter()
        .filter_map(|(name, es)| Some((String::from_utf8(into_bytes(name)?).ok()?, entries(es))))
        .collect()
}

/// `(ms, seq)` of a stream id. Read per entry handled (three times a message once, with
/// `split_once` and `str::parse`: ~1,250 instructions, callgrind), so digit by digit.
pub(crate) fn parse_id(id: &str) -> Option<(u64, u64)> {
    let id = id.as_bytes();
    let dash = id.iter().position(|&c| c == b'-')?;
    Some((number(&id[..dash])?, number(&id[dash + 1..])?))
}

/// A decimal number of at least one digit that fits a `u64`.
fn number(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |n, &c| {
        let d = c.wrapping_sub(b'0');
        if d > 9 {
            return None;
        }
        n.checked_mul(10)?.checked_add(u64::from(d))
    })
}

/// How many entries deleted from a stream's head (`MAXLEN` trimming: `entries-added` less the
/// length, from `XINFO STREAM`) a group never read, from its read counter (`entries-read` of
/// `XINFO GROUPS`, Redis 7 and later; none yet when it was handed nothing). `None` when Redis
/// does not keep the counter for the group. `cqrs trim` deletes only what every group read, so
/// on this backend's topics only `MAXLEN` trimming with a group behind makes this more than 0.
pub(crate) fn deleted_unread(
    entries_added: i64,
    length: i64,
    entries_read: Option<i64>,
    last_delivered: &str,
) -> Option<u64> {
    let read = entries_read.or_else(|| (last_delivered == "0-0").then_some(0))?;
    let deleted = entries_added.saturating_sub(length);
    Some(deleted.saturating_sub(read).max(0) as u64)
}

#[cfg(test)]
mod tests {
    use super::{fields, parse_id, Value};

    fn bulk(b: &[u8]) -> Value {
        Value::BulkString(b.to_vec())
    }

    #[test]
    fn an_entrys_fields_are_read_from_a_flat_array_or_a_map_their_values_moved_out() {
        let mut flat = Value::Array(vec![
            bulk(b"name"),
            bulk(b"a.B"),
            bulk(b"\xff"),
            bulk(b"a key that is not text"),
            bulk(b"n"),
            Value::Int(3),
            Value::SimpleString("payload".into()),
            bulk(b"{}"),
            bulk(b"odd one out"),
        ]);
        let read: Vec<(Vec<u8>, Vec<u8>)> =
            fields(&mut flat).map(|(k, v)| (k.to_owned(), v)).collect();
        // A name that is not text is read too (the decoder says so); a value that is not bytes
        // and a name without a value are not.
        assert_eq!(
            read,
            [
                (b"name".to_vec(), b"a.B".to_vec()),
                (b"\xff".to_vec(), b"a key that is not text".to_vec()),
                (b"payload".to_vec(), b"{}".to_vec())
            ]
        );
        // Moved out: the reply keeps empty values.
        let Value::Array(items) = &flat else {
            panic!("{flat:?}")
        };
        assert_eq!(items[1], bulk(b""));
        let mut map = Value::Map(vec![
            (bulk(b"name"), bulk(b"a.B")),
            (bulk(b"v"), Value::Nil),
            (bulk(b"payload"), bulk(b"{}")),
        ]);
        let read: Vec<(&[u8], Vec<u8>)> = fields(&mut map).collect();
        assert_eq!(
            read,
            [
                (&b"name"[..], b"a.B".to_vec()),
                (&b"payload"[..], b"{}".to_vec())
            ]
        );
        assert_eq!(fields(&mut Value::Nil).count(), 0);
    }

    #[test]
    fn a_stream_id_is_two_decimal_numbers_around_a_dash() {
        assert_eq!(parse_id("1700000000000-0"), Some((1_700_000_000_000, 0)));
        assert_eq!(parse_id("0-18446744073709551615"), Some((0, u64::MAX)));
        for bad in [
            "",
            "-",
            "1-",
            "-1",
            "1",
            "1-2-3",
            "a-1",
            "1-b",
            "+1-2",
            "1- 2",
            "0-18446744073709551616",
            "18446744073709551616-0",
        ] {
            assert_eq!(parse_id(bad), None, "{bad:?}");
        }
    }
}
