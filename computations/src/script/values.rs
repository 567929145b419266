//! Values between records, state and scripts: a record's value as a
//! script sees it, what a script emits as bytes, and the stored form of a
//! key's state.

use bytes::Bytes;
use rhai::Dynamic;

/// First byte of a stored state: its encoding. 1: JSON; 2 (with
/// `state_ttl`): the event time the key was last touched (i64,
/// little-endian), then JSON; 3: an integer (i64, little-endian), the
/// commonest state, without JSON.
pub(crate) const STATE_JSON: u8 = 1;
pub(crate) const STATE_TOUCHED_JSON: u8 = 2;
pub(crate) const STATE_INT: u8 = 3;

/// A value as text: a string as is, anything else as JSON.
pub(crate) fn text(v: &Dynamic) -> Result<String, String> {
    if let Some(s) = v.clone().try_cast::<rhai::ImmutableString>() {
        return Ok(s.to_string());
    }
    serde_json::to_string(v).map_err(|e| format!("cannot write {} as JSON: {e}", v.type_name()))
}

pub(crate) fn bytes_of(v: &Dynamic) -> Result<Bytes, String> {
    text(v).map(Bytes::from)
}

/// A record's value as the script sees it: parsed JSON, or a string.
pub(crate) fn value_in(v: &[u8]) -> Dynamic {
    // The common case first: a plain integer (what `count` emits).
    if !v.is_empty() && v.len() <= 18 && v.iter().all(u8::is_ascii_digit) {
        if let Some(n) = std::str::from_utf8(v)
            .ok()
            .and_then(|t| t.parse::<i64>().ok())
        {
            return Dynamic::from(n);
        }
    }
    match serde_json::from_slice::<serde_json::Value>(v) {
        Ok(json) => rhai::serde::to_dynamic(json).unwrap_or(Dynamic::UNIT),
        Err(_) => Dynamic::from(String::from_utf8_lossy(v).into_owned()),
    }
}

/// A stored state and, with `state_ttl`, when its key was last touched.
pub(crate) fn decode_state(b: &[u8]) -> Result<(Dynamic, Option<i64>), String> {
    let (touched, json) = match b.split_first() {
        Some((&STATE_INT, n)) => {
            let n = i64::from_le_bytes(n.try_into().map_err(|_| "stored state: integer")?);
            return Ok((Dynamic::from(n), None));
        }
        Some((&STATE_JSON, json)) => (None, json),
        Some((&STATE_TOUCHED_JSON, rest)) if rest.len() >= 8 => {
            let (t, json) = rest.split_at(8);
            let t = i64::from_le_bytes(t.try_into().map_err(|_| "stored state: touch time")?);
            (Some(t), json)
        }
        _ => return Err("stored state has an unknown encoding".into()),
    };
    let v: serde_json::Value =
        serde_json::from_slice(json).map_err(|e| format!("stored state: {e}"))?;
    let v = rhai::serde::to_dynamic(v).map_err(|e| format!("stored state: {e}"))?;
    Ok((v, touched))
}

pub(crate) fn encode_state(v: &Dynamic, touched: Option<i64>) -> Result<Vec<u8>, String> {
    if let (None, Ok(n)) = (touched, v.as_int()) {
        let mut out = vec![STATE_INT];
        out.extend_from_slice(&n.to_le_bytes());
        return Ok(out);
    }
    let mut out = match touched {
        None => vec![STATE_JSON],
        Some(t) => {
            let mut out = vec![STATE_TOUCHED_JSON];
            out.extend_from_slice(&t.to_le_bytes());
            out
        }
    };
    serde_json::to_writer(&mut out, v).map_err(|e| format!("cannot store the state: {e}"))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_survives_its_stored_form() {
        for json in [
            r#"{"a":[1,2.5,"x",null],"b":{"c":true}}"#,
            "7",
            "-7",
            r#""s""#,
        ] {
            let v =
                rhai::serde::to_dynamic(serde_json::from_str::<serde_json::Value>(json).unwrap())
                    .unwrap();
            for touched in [None, Some(-5)] {
                let (back, t) = decode_state(&encode_state(&v, touched).unwrap()).unwrap();
                assert_eq!(serde_json::to_string(&back).unwrap(), json.replace(' ', ""));
                assert_eq!(t, touched);
            }
        }
        assert!(decode_state(b"\x09{}").is_err());
        // A touched state cut short of its time is an error, not a panic.
        assert!(decode_state(&[STATE_TOUCHED_JSON, 1, 2, 3]).is_err());
    }

    #[test]
    fn values_arrive_as_json_or_text() {
        assert_eq!(value_in(b"12").as_int(), Ok(12));
        // Digits are a number even where JSON would refuse them.
        assert_eq!(value_in(b"007").as_int(), Ok(7));
        assert_eq!(
            value_in(b"hello world").into_string().unwrap(),
            "hello world"
        );
        assert!(value_in(br#"{"k":1}"#).is_map());
        assert_eq!(text(&Dynamic::from("a")).unwrap(), "a");
        assert_eq!(text(&Dynamic::from(3_i64)).unwrap(), "3");
    }
}
