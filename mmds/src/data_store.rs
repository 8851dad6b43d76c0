//! The MMDS data store: one JSON document, bounded in size, read by JSON pointer.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::token::{TokenAuthority, TokenError};

/// Firecracker's default limit, the API's request body limit.
pub const DEFAULT_SIZE_LIMIT: usize = 51_200;

/// How the guest may read the store.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum MmdsVersion {
    /// GET works with or without a session token.
    #[default]
    V1,
    /// Every GET needs a session token from `PUT /latest/api/token`.
    V2,
}

impl std::fmt::Display for MmdsVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::V1 => "V1",
            Self::V2 => "V2",
        })
    }
}

/// How a value is rendered for the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputFormat {
    /// The value as JSON text.
    Json,
    /// EC2 IMDS's plain text: an object lists its keys one a line (objects end in `/`), a
    /// string is itself; other values cannot be shown this way.
    Imds,
}

/// Why the store refused a request. The texts are Firecracker's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("The MMDS patch request doesn't fit.")]
    TooLarge,
    #[error("The MMDS resource does not exist.")]
    NotFound,
    #[error("The MMDS data store is not initialized.")]
    NotInitialized,
    #[error("Cannot retrieve value. The value has an unsupported type.")]
    UnsupportedValueType,
}

/// The metadata service's state: the document, its limit, the version and the session tokens.
#[derive(Debug)]
pub struct Mmds {
    data: Value,
    initialized: bool,
    limit: usize,
    version: MmdsVersion,
    imds_compat: bool,
    tokens: TokenAuthority,
}

impl Default for Mmds {
    fn default() -> Self {
        Self::new(DEFAULT_SIZE_LIMIT)
    }
}

impl Mmds {
    /// An empty store holding at most `limit` bytes of serialised JSON.
    pub fn new(limit: usize) -> Self {
        Self {
            data: Value::Null,
            initialized: false,
            limit,
            version: MmdsVersion::default(),
            imds_compat: false,
            tokens: TokenAuthority::new(),
        }
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    pub fn version(&self) -> MmdsVersion {
        self.version
    }

    pub fn set_version(&mut self, version: MmdsVersion) {
        self.version = version;
    }

    pub fn imds_compat(&self) -> bool {
        self.imds_compat
    }

    pub fn set_imds_compat(&mut self, on: bool) {
        self.imds_compat = on;
    }

    /// Binds tokens to this microVM: a token another VM issued does not validate here.
    pub fn set_instance_id(&mut self, id: &str) {
        self.tokens.set_instance_id(id);
    }

    fn fits(&self, value: &Value) -> Result<(), StoreError> {
        // Serialised size, as the API received it compacted; counted without building a copy.
        let mut counter = ByteCounter(0);
        serde_json::to_writer(&mut counter, value).map_err(|_| StoreError::TooLarge)?;
        if counter.0 > self.limit {
            return Err(StoreError::TooLarge);
        }
        Ok(())
    }

    /// `PUT /mmds`: replaces the document.
    pub fn put(&mut self, data: Value) -> Result<(), StoreError> {
        self.fits(&data)?;
        self.data = data;
        self.initialized = true;
        Ok(())
    }

    /// `PATCH /mmds`: an RFC 7396 merge patch; nothing changes if the result does not fit.
    pub fn patch(&mut self, patch: &Value) -> Result<(), StoreError> {
        if !self.initialized {
            return Err(StoreError::NotInitialized);
        }
        let mut next = self.data.clone();
        merge_patch(&mut next, patch);
        self.fits(&next)?;
        self.data = next;
        Ok(())
    }

    /// `GET /mmds`: the whole document (`{}` before any PUT).
    pub fn document(&self) -> Value {
        match &self.data {
            Value::Null => Value::Object(Map::new()),
            v => v.clone(),
        }
    }

    /// The value at `path` (a URI path, i.e. a JSON pointer; a trailing `/` is ignored),
    /// rendered for the guest.
    pub fn get(&self, path: &str, format: OutputFormat) -> Result<String, StoreError> {
        let pointer = path.strip_suffix('/').unwrap_or(path);
        let value = self.data.pointer(pointer).ok_or(StoreError::NotFound)?;
        let format = if self.imds_compat {
            OutputFormat::Imds
        } else {
            format
        };
        match format {
            OutputFormat::Json => Ok(value.to_string()),
            OutputFormat::Imds => imds_text(value),
        }
    }

    /// A new session token living `ttl_seconds`.
    pub fn issue_token(&mut self, ttl_seconds: u32) -> Result<String, TokenError> {
        self.tokens.issue(ttl_seconds)
    }

    pub fn token_is_valid(&self, token: &str) -> bool {
        self.tokens.is_valid(token)
    }
}

/// Counts what serde writes.
struct ByteCounter(usize);

impl std::io::Write for ByteCounter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// RFC 7396: objects merge key by key, `null` removes a key, anything else replaces.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let Value::Object(doc) = target else {
        unreachable!("made an object above")
    };
    for (key, value) in patch {
        if value.is_null() {
            doc.remove(key);
        } else {
            merge_patch(doc.entry(key.clone()).or_insert(Value::Null), value);
        }
    }
}

fn imds_text(value: &Value) -> Result<String, StoreError> {
    match value {
        Value::Object(map) => Ok(map
            .iter()
            .map(|(k, v)| {
                if v.is_object() {
                    format!("{k}/")
                } else {
                    k.clone()
                }
            })
            .collect::<Vec<_>>()
            .join("\n")),
        Value::String(s) => Ok(s.clone()),
        _ => Err(StoreError::UnsupportedValueType),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn store() -> Mmds {
        let mut m = Mmds::default();
        m.put(json!({
            "latest": {"meta-data": {"ami-id": "ami-1", "local": {"a": "b"}, "n": 3}},
            "user-data": "hello"
        }))
        .unwrap();
        m
    }

    #[test]
    fn values_render_as_json_or_imds_text() {
        let m = store();
        assert_eq!(m.get("/user-data", OutputFormat::Imds).unwrap(), "hello");
        assert_eq!(
            m.get("/user-data", OutputFormat::Json).unwrap(),
            "\"hello\""
        );
        assert_eq!(
            m.get("/latest/meta-data/", OutputFormat::Imds).unwrap(),
            "ami-id\nlocal/\nn"
        );
        assert_eq!(
            m.get("/latest/meta-data/local", OutputFormat::Json)
                .unwrap(),
            r#"{"a":"b"}"#
        );
        assert_eq!(
            m.get("/latest/meta-data/n", OutputFormat::Imds),
            Err(StoreError::UnsupportedValueType)
        );
        assert_eq!(
            m.get("/nope", OutputFormat::Json),
            Err(StoreError::NotFound)
        );
        let mut m = m;
        m.set_imds_compat(true);
        assert_eq!(m.get("/user-data", OutputFormat::Json).unwrap(), "hello");
    }

    #[test]
    fn patch_merges_removes_and_keeps_the_limit() {
        let mut m = Mmds::new(100);
        assert_eq!(m.patch(&json!({"a": 1})), Err(StoreError::NotInitialized));
        assert_eq!(m.document(), json!({}));
        m.put(json!({"a": {"b": 1, "c": 2}, "d": 3})).unwrap();
        m.patch(&json!({"a": {"b": null, "e": 5}, "d": "x"}))
            .unwrap();
        assert_eq!(m.document(), json!({"a": {"c": 2, "e": 5}, "d": "x"}));
        let big = "x".repeat(200);
        assert_eq!(m.patch(&json!({ "big": big })), Err(StoreError::TooLarge));
        assert_eq!(m.document(), json!({"a": {"c": 2, "e": 5}, "d": "x"}));
        assert_eq!(m.put(json!({ "big": big })), Err(StoreError::TooLarge));
        // The limit counts compact JSON bytes.
        let exact = json!({"k": "v".repeat(100 - 8)});
        assert_eq!(serde_json::to_vec(&exact).unwrap().len(), 100);
        m.put(exact).unwrap();
    }

    #[test]
    fn a_patch_that_is_not_an_object_replaces() {
        let mut v = json!({"a": 1});
        merge_patch(&mut v, &json!([1, 2]));
        assert_eq!(v, json!([1, 2]));
        let mut v = json!("s");
        merge_patch(&mut v, &json!({"a": {"b": 1}}));
        assert_eq!(v, json!({"a": {"b": 1}}));
    }
}
