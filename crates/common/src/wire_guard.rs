//! What every server does about requests that are malformed on the wire, before and after its handlers
//! (called by the telemetry layer, [`crate::grpc::ServerTelemetryLayer`]):
//!
//! - a request whose headers exceed [`MAX_REQUEST_HEADER_BYTES`] gets INVALID_ARGUMENT at once (the
//!   HTTP/2 limit, [`crate::transport::MAX_HEADER_LIST_BYTES`], is set far above it so that such a request
//!   reaches this check instead of making the server send GOAWAY, which fails every call on the connection);
//! - a request message tonic cannot decode (invalid UTF-8 in a string, garbage bytes, a wrong wire type, a
//!   bad compression flag) gets INVALID_ARGUMENT instead of tonic's INTERNAL;
//! - a status message longer than [`MAX_STATUS_MESSAGE_BYTES`] is cut (a client string echoed in an error
//!   must not overflow the caller's header limits);
//! - the metrics' `rpc` label is the method name only for methods the server's protos define, otherwise
//!   [`UNKNOWN_RPC`] (a caller must not grow the metrics registry with made-up paths).

use std::collections::HashSet;
use std::sync::LazyLock;

use http::{HeaderMap, HeaderValue};
use prost::Message;
use tonic::body::Body;

/// Largest request header block (names + values + 32 bytes per entry, as HTTP/2 counts it) a server
/// serves; larger ones get INVALID_ARGUMENT.
pub const MAX_REQUEST_HEADER_BYTES: usize = 16 * 1024;
/// Longest `grpc-message` a server sends (bytes, before percent-encoding); longer ones are cut.
pub const MAX_STATUS_MESSAGE_BYTES: usize = 1024;
/// The `rpc` metrics label of a path that names no known method.
pub const UNKNOWN_RPC: &str = "unknown";

/// How tonic words the errors of decoding a request: the client's fault, not ours.
const DECODE_ERROR_PREFIXES: &[&str] = &[
    "failed to decode Protobuf message",
    "protocol error: received message with",
    "Error decompressing",
    "Unexpected EOF decoding stream",
];

/// `package.Service/Method` of every method of the qwen_image.v1, health and reflection protos.
static KNOWN_METHODS: LazyLock<HashSet<String>> = LazyLock::new(|| {
    let sets: [&[u8]; 4] = [
        qwen_image_proto::v1::FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
    ];
    let mut known = HashSet::new();
    for bytes in sets {
        let Ok(set) = prost_types::FileDescriptorSet::decode(bytes) else {
            continue;
        };
        for file in set.file {
            let package = file.package.unwrap_or_default();
            for service in file.service {
                let service_name = service.name.unwrap_or_default();
                for method in service.method {
                    known.insert(format!(
                        "{package}.{service_name}/{}",
                        method.name.unwrap_or_default()
                    ));
                }
            }
        }
    }
    known
});

/// The `rpc` metrics label of `grpc_service`/`method`: the method, or [`UNKNOWN_RPC`].
pub fn rpc_label(grpc_service: &str, method: &str) -> String {
    if KNOWN_METHODS.contains(&format!("{grpc_service}/{method}")) {
        method.to_string()
    } else {
        UNKNOWN_RPC.to_string()
    }
}

/// INVALID_ARGUMENT for a request whose headers are larger than [`MAX_REQUEST_HEADER_BYTES`], naming the
/// largest header.
pub fn oversized_headers(headers: &HeaderMap) -> Option<tonic::Status> {
    let size: usize = headers
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 32)
        .sum();
    if size <= MAX_REQUEST_HEADER_BYTES {
        return None;
    }
    let (name, largest) = headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.len()))
        .max_by_key(|(_, n)| *n)
        .unwrap_or(("?", 0));
    Some(tonic::Status::invalid_argument(format!(
        "the request's headers are {size} bytes, more than {MAX_REQUEST_HEADER_BYTES}; the largest is \
         `{}` ({largest} bytes): send shorter metadata (x-request-id: at most {} printable characters)",
        clip(name, 64),
        crate::grpc::MAX_REQUEST_ID_LEN
    )))
}

/// The trailers-only response of `status`.
pub fn status_response(status: tonic::Status) -> http::Response<Body> {
    status.into_http()
}

/// Rewrites the status in `h` (response headers of a trailers-only answer, or trailers): a request
/// tonic could not decode becomes INVALID_ARGUMENT (only when `before_any_message`: the request is
/// decoded before the handler sends anything), and a long message is cut.
pub fn fix_status(h: &mut HeaderMap, before_any_message: bool) {
    let Some(code) = h.get("grpc-status").and_then(|v| v.to_str().ok()) else {
        return;
    };
    let internal = code == (tonic::Code::Internal as i32).to_string();
    let message = h
        .get("grpc-message")
        .and_then(|v| v.to_str().ok())
        .map(crate::grpc::percent_decode)
        .unwrap_or_default();
    let undecodable = internal
        && before_any_message
        && DECODE_ERROR_PREFIXES.iter().any(|p| message.starts_with(p));
    let new_message = if undecodable {
        h.insert(
            "grpc-status",
            HeaderValue::from(tonic::Code::InvalidArgument as i32),
        );
        Some(format!(
            "the request message cannot be decoded ({}); send a valid message of this method's \
             qwen_image.v1 type (check the client's protos)",
            clip(&message, 300)
        ))
    } else if message.len() > MAX_STATUS_MESSAGE_BYTES {
        Some(clip(&message, MAX_STATUS_MESSAGE_BYTES))
    } else {
        None
    };
    if let Some(m) = new_message
        && let Ok(v) = HeaderValue::from_str(&percent_encode(&m))
    {
        h.insert("grpc-message", v);
    }
}

/// `s` cut to at most `max` bytes (on a char boundary) with a note of how much was cut.
pub fn clip(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} more bytes)", &s[..end], s.len() - end)
}

/// grpc-message percent-encoding (gRPC over HTTP/2: every byte outside 0x20..=0x7E, and `%`).
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: i32, msg: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("grpc-status", HeaderValue::from(code));
        h.insert(
            "grpc-message",
            HeaderValue::from_str(&percent_encode(msg)).expect("encoded"),
        );
        h
    }

    fn message(h: &HeaderMap) -> String {
        crate::grpc::percent_decode(h["grpc-message"].to_str().expect("ascii"))
    }

    #[test]
    fn decode_errors_become_invalid_argument_before_any_message_only() {
        let mut h = status(13, "failed to decode Protobuf message: invalid wire type");
        fix_status(&mut h, true);
        assert_eq!(h["grpc-status"], "3");
        assert!(message(&h).contains("invalid wire type"), "{}", message(&h));
        let mut h = status(13, "failed to decode Protobuf message: invalid wire type");
        fix_status(&mut h, false);
        assert_eq!(h["grpc-status"], "13");
        let mut h = status(13, "the denoiser stage failed");
        fix_status(&mut h, true);
        assert_eq!(h["grpc-status"], "13");
    }

    #[test]
    fn long_messages_are_cut_and_stay_valid_utf8() {
        let long = format!("unknown ControlNet `{}`", "é".repeat(20_000));
        let mut h = status(9, &long);
        fix_status(&mut h, false);
        let m = message(&h);
        assert!(m.len() < MAX_STATUS_MESSAGE_BYTES + 40, "{}", m.len());
        assert!(m.ends_with("more bytes)"), "{m}");
        assert_eq!(clip("short", 10), "short");
    }

    #[test]
    fn only_known_methods_label_metrics() {
        assert_eq!(rpc_label("qwen_image.v1.Denoiser", "Denoise"), "Denoise");
        assert_eq!(rpc_label("grpc.health.v1.Health", "Check"), "Check");
        assert_eq!(
            rpc_label(
                "grpc.reflection.v1.ServerReflection",
                "ServerReflectionInfo"
            ),
            "ServerReflectionInfo"
        );
        assert_eq!(rpc_label("qwen_image.v1.Denoiser", "Nope"), UNKNOWN_RPC);
        assert_eq!(rpc_label("x.Y", "Z"), UNKNOWN_RPC);
    }

    #[test]
    fn oversized_headers_are_refused_with_the_largest_named() {
        let mut h = HeaderMap::new();
        h.insert("x-request-id", HeaderValue::from_static("ok"));
        assert!(oversized_headers(&h).is_none());
        h.insert(
            "x-request-id",
            HeaderValue::from_str(&"a".repeat(64 * 1024)).expect("ascii"),
        );
        let s = oversized_headers(&h).expect("refused");
        assert_eq!(s.code(), tonic::Code::InvalidArgument);
        assert!(s.message().contains("x-request-id"), "{}", s.message());
    }
}
