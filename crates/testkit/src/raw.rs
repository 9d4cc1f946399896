//! Raw gRPC calls: arbitrary bytes as the request message of any method (what a broken or hostile peer
//! sends), the answer's bytes back. For tests of how servers treat undecodable messages.

use bytes::{Buf, BufMut};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

/// A codec that passes message bytes through unchanged.
#[derive(Debug, Clone, Copy, Default)]
pub struct RawCodec;

impl Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining()).to_vec()))
    }
}

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }

    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

async fn ready(channel: Channel) -> Result<tonic::client::Grpc<Channel>, Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(format!("not ready: {e}")))?;
    Ok(grpc)
}

/// Calls `path` (`/package.Service/Method`) with `message` as the raw request bytes (unary).
pub async fn unary(
    channel: Channel,
    path: &'static str,
    request: Request<Vec<u8>>,
) -> Result<Response<Vec<u8>>, Status> {
    ready(channel)
        .await?
        .unary(
            request,
            tonic::codegen::http::uri::PathAndQuery::from_static(path),
            RawCodec,
        )
        .await
}

/// Calls a server-streaming `path` with raw request bytes and reads the stream to its end.
pub async fn server_streaming(
    channel: Channel,
    path: &'static str,
    request: Request<Vec<u8>>,
) -> Result<Vec<Vec<u8>>, Status> {
    let mut stream = ready(channel)
        .await?
        .server_streaming(
            request,
            tonic::codegen::http::uri::PathAndQuery::from_static(path),
            RawCodec,
        )
        .await?
        .into_inner();
    let mut out = Vec::new();
    while let Some(m) = stream.message().await? {
        out.push(m);
    }
    Ok(out)
}
