//! The caller's deadline from the `grpc-timeout` header (tonic has no public parser; rust-stack.md §3.5).
//! Streaming handlers must enforce it themselves: tonic's server timeout does not bound a stream body.

use std::time::{Duration, Instant};

use tonic::metadata::MetadataMap;

/// Parses a `grpc-timeout` value: up to 8 ASCII digits then a unit H, M, S, m, u or n (gRPC HTTP/2 spec).
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    let split = value.len().checked_sub(1)?;
    let (num, unit) = (value.get(..split)?, value.get(split..)?);
    if num.is_empty() || num.len() > 8 || !num.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = num.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The instant the caller gives up, if it sent a (well-formed) `grpc-timeout`.
pub fn from_metadata(md: &MetadataMap, now: Instant) -> Option<Instant> {
    let d = parse_grpc_timeout(md.get("grpc-timeout")?.to_str().ok()?)?;
    now.checked_add(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_unit() {
        assert_eq!(parse_grpc_timeout("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_grpc_timeout("3M"), Some(Duration::from_secs(180)));
        assert_eq!(parse_grpc_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse_grpc_timeout("200m"), Some(Duration::from_millis(200)));
        assert_eq!(
            parse_grpc_timeout("200000u"),
            Some(Duration::from_millis(200))
        );
        assert_eq!(parse_grpc_timeout("7n"), Some(Duration::from_nanos(7)));
    }

    #[test]
    fn rejects_malformed() {
        for v in ["", "S", "10", "10x", "-1S", "123456789S", "1.5S", "é"] {
            assert_eq!(parse_grpc_timeout(v), None, "{v}");
        }
    }

    #[test]
    fn reads_metadata() {
        let mut md = MetadataMap::new();
        let now = Instant::now();
        assert_eq!(from_metadata(&md, now), None);
        md.insert("grpc-timeout", "1S".parse().expect("ascii"));
        assert_eq!(from_metadata(&md, now), Some(now + Duration::from_secs(1)));
    }
}
