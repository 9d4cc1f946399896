//! Server and client transport setup, in one place for every service, the gateway's stage clients and
//! the tools: the telemetry layer, reflection, channel options. (Connection security would be added here.)

use std::time::Duration;

use tonic::transport::server::TcpIncoming;
use tonic::transport::{Endpoint, Server};

use crate::grpc::ServerTelemetryLayer;

/// TCP connect timeout of a client channel.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// HTTP/2 PING period on every channel and server connection, idle or not: a peer that vanished without
/// closing its connection (host down, network cut) is noticed within interval + timeout.
pub const HTTP2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// How long a PING may go unanswered before the connection (and every call on it) is closed (UNAVAILABLE).
pub const HTTP2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// Idle time before the OS sends TCP keepalive probes on every connection.
pub const TCP_KEEPALIVE: Duration = Duration::from_secs(30);

/// HTTP/2 header list limit of every server: far above [`crate::wire_guard::MAX_REQUEST_HEADER_BYTES`], so
/// that an oversized request header (a 64 KiB `x-request-id`) reaches the telemetry layer and gets
/// INVALID_ARGUMENT instead of a GOAWAY that would fail every call on the connection.
pub const MAX_HEADER_LIST_BYTES: u32 = 1 << 20;

/// The gRPC server builder of every service: per-RPC telemetry (`service` is the metrics label) and the
/// wire checks of [`crate::wire_guard`].
pub fn server(
    service: &'static str,
) -> Server<tower::layer::util::Stack<ServerTelemetryLayer, tower::layer::util::Identity>> {
    Server::builder()
        .http2_max_header_list_size(MAX_HEADER_LIST_BYTES)
        .http2_keepalive_interval(Some(HTTP2_KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(HTTP2_KEEPALIVE_TIMEOUT))
        .layer(ServerTelemetryLayer::new(service))
}

/// The accepted connections of `listener` with TCP keepalive and no Nagle delay (the server's own
/// `tcp_keepalive` only applies to listeners it binds itself).
pub fn incoming(listener: tokio::net::TcpListener) -> TcpIncoming {
    TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(TCP_KEEPALIVE))
}

/// gRPC reflection (v1 and v1alpha) over the qwen_image.v1 protos and grpc.health.v1.
pub fn reflection() -> Result<
    (
        tonic_reflection::server::v1::ServerReflectionServer<
            impl tonic_reflection::server::v1::ServerReflection,
        >,
        tonic_reflection::server::v1alpha::ServerReflectionServer<
            impl tonic_reflection::server::v1alpha::ServerReflection,
        >,
    ),
    String,
> {
    let builder = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(qwen_image_proto::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let v1 = builder().build_v1().map_err(|e| e.to_string())?;
    let v1alpha = builder().build_v1alpha().map_err(|e| e.to_string())?;
    Ok((v1, v1alpha))
}

/// A client endpoint for `uri` (`http://host:port`) with the project's channel options.
pub fn endpoint(uri: &str) -> Result<Endpoint, String> {
    Ok(Endpoint::from_shared(uri.to_string())
        .map_err(|e| format!("`{uri}` is not a valid URL: {e}"))?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .tcp_keepalive(Some(TCP_KEEPALIVE))
        .http2_keep_alive_interval(HTTP2_KEEPALIVE_INTERVAL)
        .keep_alive_timeout(HTTP2_KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true)
        .http2_adaptive_window(true))
}
