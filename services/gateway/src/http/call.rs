//! The HTTP API's one way into the gateway: an in-process gRPC client over the very `ImageGenerator` service
//! the gRPC server runs, behind the same server telemetry layer. API keys, request ids, deadlines,
//! validation, flows, spans and metrics are therefore those of the gRPC API (no second implementation, no
//! network hop); the HTTP handlers only translate bodies.

use std::sync::Arc;

use axum::http::HeaderMap;
use qwen_image_common::grpc::{InjectTraceContext, ServerTelemetry, ServerTelemetryLayer};
use qwen_image_common::limits::MAX_MESSAGE_BYTES;
use qwen_image_proto::v1::image_generator_client::ImageGeneratorClient;
use qwen_image_proto::v1::image_generator_server::ImageGeneratorServer;
use qwen_image_proto::v1::{
    EditRequest, GenerateEvent, Img2ImgRequest, InpaintRequest, OutpaintRequest, PoseRequest,
    TextToImageRequest,
};
use tonic::Streaming;
use tonic::metadata::{MetadataKey, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tower::Layer;

use crate::service::{GatewayService, REQUEST_ID_KEY};

type Inner =
    InterceptedService<ServerTelemetry<ImageGeneratorServer<GatewayService>>, InjectTraceContext>;

/// A client of the in-process service (cheap to clone).
#[derive(Clone)]
pub struct Client(ImageGeneratorClient<Inner>);

/// One request of any flow, as the gRPC API takes it.
#[derive(Debug)]
pub enum Call {
    TextToImage(TextToImageRequest),
    Pose(PoseRequest),
    Img2Img(Img2ImgRequest),
    Inpaint(InpaintRequest),
    Outpaint(OutpaintRequest),
    Edit(EditRequest),
}

/// HTTP headers passed on as gRPC metadata: the API key, the caller's request id.
const FORWARDED: [&str; 2] = ["authorization", REQUEST_ID_KEY];

impl Client {
    pub fn new(service: Arc<GatewayService>) -> Self {
        let server = ImageGeneratorServer::from_arc(service)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let layered = ServerTelemetryLayer::new("gateway").layer(server);
        Self(
            ImageGeneratorClient::with_interceptor(layered, InjectTraceContext)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
    }

    /// Starts `call` with the forwarded `headers`: the event stream and the request id, or the service's
    /// status (with the request id when it has one).
    pub async fn start(
        &self,
        call: Call,
        headers: &HeaderMap,
    ) -> Result<(Streaming<GenerateEvent>, Option<String>), tonic::Status> {
        fn req<T>(msg: T, headers: &HeaderMap) -> tonic::Request<T> {
            let mut r = tonic::Request::new(msg);
            for name in FORWARDED {
                if let (Some(v), Ok(k)) =
                    (headers.get(name), MetadataKey::from_bytes(name.as_bytes()))
                    && let Ok(v) = MetadataValue::try_from(v.as_bytes())
                {
                    r.metadata_mut().insert(k, v);
                }
            }
            r
        }
        let mut c = self.0.clone();
        let response = match call {
            Call::TextToImage(m) => c.text_to_image(req(m, headers)).await?,
            Call::Pose(m) => c.pose(req(m, headers)).await?,
            Call::Img2Img(m) => c.img2_img(req(m, headers)).await?,
            Call::Inpaint(m) => c.inpaint(req(m, headers)).await?,
            Call::Outpaint(m) => c.outpaint(req(m, headers)).await?,
            Call::Edit(m) => c.edit(req(m, headers)).await?,
        };
        let id = request_id(response.metadata());
        Ok((response.into_inner(), id))
    }
}

/// The `x-request-id` of a response's (or status's) metadata.
pub fn request_id(md: &tonic::metadata::MetadataMap) -> Option<String> {
    md.get(REQUEST_ID_KEY)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}
