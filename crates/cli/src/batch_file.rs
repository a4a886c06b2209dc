//! The batch file `xmirror batch --file` reads: one JSON object per line,
//! `{"put": ["KEY", "VALUE"]}` or `{"delete": "KEY"}`, a key or value either a string or
//! `{"base64": "..."}` (how `scan --json` prints bytes that are not UTF-8).

use base64::Engine as _;
use serde::Deserialize;
use xmirror_client::Write;

/// Why a batch file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum BatchFileError {
    /// A line is not one of the two forms.
    #[error("line {line}: expected {{\"put\": [KEY, VALUE]}} or {{\"delete\": KEY}}")]
    Line {
        /// The line number, from 1.
        line: usize,
        /// What the JSON parser said.
        #[source]
        source: serde_json::Error,
    },
    /// A `{"base64": ...}` is not base64.
    #[error("line {line}: bad base64")]
    Base64 {
        /// The line number, from 1.
        line: usize,
        /// What the decoder said.
        #[source]
        source: base64::DecodeError,
    },
    /// The file holds no write.
    #[error("the file holds no write: a batch needs at least one")]
    Empty,
}

/// A key or a value: text, or bytes in base64.
#[derive(Deserialize)]
#[serde(untagged)]
enum Bytes {
    Text(String),
    Base64 { base64: String },
}

#[derive(Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
enum Line {
    Put((Bytes, Bytes)),
    Delete(Bytes),
}

impl Bytes {
    fn decode(self, line: usize) -> Result<Vec<u8>, BatchFileError> {
        match self {
            Bytes::Text(text) => Ok(text.into_bytes()),
            Bytes::Base64 { base64 } => base64::engine::general_purpose::STANDARD
                .decode(base64)
                .map_err(|source| BatchFileError::Base64 { line, source }),
        }
    }
}

/// The writes of a batch file, in order; blank lines are skipped.
pub fn parse(text: &str) -> Result<Vec<Write>, BatchFileError> {
    let mut writes = Vec::new();
    for (index, text) in text.lines().enumerate() {
        let line = index + 1;
        if text.trim().is_empty() {
            continue;
        }
        let parsed: Line =
            serde_json::from_str(text).map_err(|source| BatchFileError::Line { line, source })?;
        writes.push(match parsed {
            Line::Put((key, value)) => Write::put(key.decode(line)?, value.decode(line)?),
            Line::Delete(key) => Write::delete(key.decode(line)?),
        });
    }
    if writes.is_empty() {
        return Err(BatchFileError::Empty);
    }
    Ok(writes)
}

/// `bytes` in standard base64, as `scan --json` prints bytes that are not UTF-8.
pub fn base64_encode(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_forms_text_and_base64_in_order() {
        let writes = parse(
            "{\"put\": [\"a\", \"1\"]}\n\n{\"delete\": \"b\"}\n{\"put\": [{\"base64\": \"/w==\"}, {\"base64\": \"AAE=\"}]}\n",
        )
        .unwrap();
        assert_eq!(
            writes,
            vec![
                Write::put("a", "1"),
                Write::delete("b"),
                Write::put(vec![0xff], vec![0, 1])
            ]
        );
        assert_eq!(base64_encode(&[0xff]), "/w==");
    }

    #[test]
    fn a_bad_line_is_named() {
        let error = parse("{\"put\": [\"a\", \"1\"]}\n{\"upsert\": \"b\"}\n").unwrap_err();
        assert!(
            matches!(error, BatchFileError::Line { line: 2, .. }),
            "{error}"
        );
        let error = parse("{\"delete\": {\"base64\": \"!!\"}}").unwrap_err();
        assert!(
            matches!(error, BatchFileError::Base64 { line: 1, .. }),
            "{error}"
        );
        assert!(matches!(parse("\n \n"), Err(BatchFileError::Empty)));
    }
}
