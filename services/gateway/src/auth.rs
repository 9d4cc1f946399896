//! API keys at the gateway (`--api-keys-file`): callers send `authorization: Bearer KEY`; a missing or wrong
//! key is UNAUTHENTICATED (HTTP 401) without saying which. Keys are kept only as SHA-256 digests and
//! compared digest to digest in constant time; the key itself is never logged or traced, only its name.
//!
//! File format, one entry per line, `#` starts a comment line, blank lines are skipped:
//! - `NAME:HEX64`: a key given by its SHA-256 (64 hex digits, e.g. `printf %s "$KEY" | sha256sum`) with a
//!   name (letters, digits, `_`, `-`, `.`) for logs and metrics;
//! - anything else: the key itself (at least 16 printable ASCII characters, no spaces), named `line-N`.

use std::path::Path;

use sha2::{Digest, Sha256};
use tonic::Status;
use tonic::metadata::MetadataMap;

use qwen_image_common::metric_names as m;

/// Shortest plain key accepted in the file.
pub const MIN_KEY_LEN: usize = 16;

/// The message of every refusal (the same whether the key is missing, malformed or unknown).
const REFUSAL: &str = "missing or invalid API key: send `authorization: Bearer KEY`";

struct Entry {
    name: String,
    digest: [u8; 32],
}

/// The accepted keys (digests and names only).
pub struct ApiKeys {
    entries: Vec<Entry>,
}

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.entries.iter().map(|e| e.name.as_str()).collect();
        f.debug_struct("ApiKeys").field("names", &names).finish()
    }
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

fn parse_hex64(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

/// Equal digests, examining every byte whatever the first difference.
fn same_digest(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl ApiKeys {
    /// Reads `path` (see the module docs); errors name the file and line, never the key.
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("--api-keys-file {}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("--api-keys-file {}: {e}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        let mut entries: Vec<Entry> = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let n = i + 1;
            let entry = match line.split_once(':') {
                Some((name, hex)) if valid_name(name) && parse_hex64(hex).is_some() => Entry {
                    name: name.to_string(),
                    digest: parse_hex64(hex).unwrap_or_default(),
                },
                _ => {
                    if line.len() < MIN_KEY_LEN || !line.bytes().all(|b| b.is_ascii_graphic()) {
                        return Err(format!(
                            "line {n}: a key must be at least {MIN_KEY_LEN} printable ASCII characters without \
                             spaces, or NAME:SHA256HEX (64 hex digits)"
                        ));
                    }
                    Entry {
                        name: format!("line-{n}"),
                        digest: sha256(line.as_bytes()),
                    }
                }
            };
            if entries.iter().any(|e| e.name == entry.name) {
                return Err(format!("line {n}: the name `{}` is used twice", entry.name));
            }
            entries.push(entry);
        }
        if entries.is_empty() {
            return Err(
                "no key in the file (a gateway with an empty key file would refuse every call)"
                    .into(),
            );
        }
        Ok(Self { entries })
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The name of the key `authorization` carries (`Bearer KEY`), or None. Every entry is compared.
    pub fn name_of(&self, authorization: Option<&[u8]>) -> Option<&str> {
        let key = authorization
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(|v| {
                let (scheme, rest) = v.trim().split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
            })
            .filter(|k| !k.is_empty())?;
        let digest = sha256(key.as_bytes());
        let mut found = None;
        for e in &self.entries {
            if same_digest(&e.digest, &digest) {
                found = Some(e.name.as_str());
            }
        }
        found
    }

    /// Checks a call's `authorization` metadata: the key's name, or UNAUTHENTICATED. Counts the call per
    /// key name (or as refused).
    pub fn check(&self, metadata: &MetadataMap) -> Result<String, Status> {
        let value = metadata.get("authorization").map(|v| v.as_bytes());
        match self.name_of(value) {
            Some(name) => {
                metrics::counter!(m::GATEWAY_API_KEY_REQUESTS_TOTAL, "service" => "gateway", "key" => name.to_string())
                    .increment(1);
                Ok(name.to_string())
            }
            None => {
                metrics::counter!(m::GATEWAY_UNAUTHENTICATED_TOTAL, "service" => "gateway")
                    .increment(1);
                Err(Status::unauthenticated(REFUSAL))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "sk-test-0123456789abcdef";

    fn hex(d: [u8; 32]) -> String {
        d.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn plain_and_hashed_keys() {
        let text = format!(
            "# comment\n\n{KEY}\nci-bot:{}\n",
            hex(sha256(b"another-key-of-16+chars"))
        );
        let keys = ApiKeys::parse(&text).expect("valid file");
        assert_eq!(keys.len(), 2);
        let bearer = |k: &str| format!("Bearer {k}");
        assert_eq!(keys.name_of(Some(bearer(KEY).as_bytes())), Some("line-3"));
        assert_eq!(
            keys.name_of(Some(b"bearer   another-key-of-16+chars")),
            Some("ci-bot")
        );
        assert_eq!(keys.name_of(Some(b"Bearer wrong-key-0123456789")), None);
        assert_eq!(keys.name_of(Some(KEY.as_bytes())), None, "no scheme");
        assert_eq!(keys.name_of(Some(format!("Basic {KEY}").as_bytes())), None);
        assert_eq!(keys.name_of(Some(b"Bearer ")), None);
        assert_eq!(keys.name_of(None), None);
        // Debug shows names, never digests or keys.
        let dbg = format!("{keys:?}");
        assert!(dbg.contains("ci-bot") && !dbg.contains(KEY), "{dbg}");
    }

    #[test]
    fn bad_files_are_refused_without_echoing_the_key() {
        let e = ApiKeys::parse("short\n").expect_err("too short");
        assert!(e.contains("line 1") && !e.contains("short\n"), "{e}");
        assert!(ApiKeys::parse("# only comments\n").is_err());
        let e = ApiKeys::parse(&format!("{KEY}\n{KEY}x\nline-1:{}\n", hex([0; 32])))
            .expect_err("duplicate name");
        assert!(e.contains("line 3"), "{e}");
        assert!(ApiKeys::parse("key with spaces inside\n").is_err());
    }

    #[test]
    fn refusals_say_nothing_more() {
        let keys = ApiKeys::parse(KEY).expect("valid");
        let mut md = MetadataMap::new();
        let e = keys.check(&md).expect_err("missing");
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        md.insert(
            "authorization",
            "Bearer nope-nope-nope-nope".parse().expect("ascii"),
        );
        let e2 = keys.check(&md).expect_err("wrong");
        assert_eq!(e.message(), e2.message());
        md.insert(
            "authorization",
            format!("Bearer {KEY}").parse().expect("ascii"),
        );
        assert_eq!(keys.check(&md).expect("right"), "line-1");
    }
}
