//! The stage clients: typed calls to the three stages (message-size limits, forwarded deadlines, retry on
//! another replica), and what the stages describe (their model, checked to fit together: [`describe`]).

mod describe;
pub mod pool;

use std::time::{Duration, Instant};

use qwen_image_common::grpc::InjectTraceContext;
use qwen_image_common::limits::MAX_MESSAGE_BYTES;
use qwen_image_proto::v1::denoiser_client::DenoiserClient;
use qwen_image_proto::v1::text_encoder_client::TextEncoderClient;
use qwen_image_proto::v1::vae_client::VaeClient;
use qwen_image_proto::v1::{
    DecodeRequest, DecodeResponse, DenoiseEvent, DenoiseRequest, EncodeImageRequest,
    EncodeImageResponse, EncodeRequest, EncodeResponse, OverlongPromptPolicy,
};
use tonic::{Request, Status, Streaming};

use crate::config::GatewayConfig;
use crate::error::{GatewayError, StageName};
use pool::{Lease, Pool};

/// The replicas of every stage.
#[derive(Debug)]
pub struct Stages {
    pub text_encoder: Pool,
    pub denoiser: Pool,
    pub vae: Pool,
    /// Counts the reviews of the replicas' descriptions (a request that arrives before the stages have
    /// described themselves waits for the next one).
    reviewed: tokio::sync::watch::Sender<u64>,
}

/// A denoiser stream that has produced its first event (retries are over once progress flows).
pub struct DenoiseCall {
    pub first: DenoiseEvent,
    pub rest: Streaming<DenoiseEvent>,
    /// Keeps the replica's outstanding count while the stream lives.
    pub lease: Lease,
}

fn remaining(deadline: Instant) -> Result<Duration, GatewayError> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        Err(GatewayError::DeadlineExceeded)
    } else {
        Ok(left)
    }
}

/// A request carrying the remaining time as `grpc-timeout`.
fn with_deadline<T>(msg: T, deadline: Instant) -> Result<Request<T>, GatewayError> {
    let mut req = Request::new(msg);
    req.set_timeout(remaining(deadline)?);
    Ok(req)
}

impl Stages {
    pub fn new(config: &GatewayConfig) -> Result<Self, GatewayError> {
        Ok(Self {
            text_encoder: Pool::new(StageName::TextEncoder, &config.text_encoder)?,
            denoiser: Pool::new(StageName::Denoiser, &config.denoiser)?,
            vae: Pool::new(StageName::Vae, &config.vae)?,
            reviewed: tokio::sync::watch::Sender::new(0),
        })
    }

    pub fn pools(&self) -> [&Pool; 3] {
        [&self.text_encoder, &self.denoiser, &self.vae]
    }

    pub fn pool(&self, stage: StageName) -> &Pool {
        match stage {
            StageName::TextEncoder => &self.text_encoder,
            StageName::Denoiser => &self.denoiser,
            StageName::Vae => &self.vae,
        }
    }

    /// Encodes one prompt. Overlong prompts are truncated to diffusers' 512 tokens, as QwenImagePipeline does.
    pub async fn encode(
        &self,
        prompt: &str,
        deadline: Instant,
    ) -> Result<EncodeResponse, GatewayError> {
        let msg = EncodeRequest {
            prompts: vec![prompt.to_string()],
            max_sequence_length: 0,
            overlong_policy: OverlongPromptPolicy::Truncate as i32,
        };
        let (resp, _lease) = self
            .text_encoder
            .call("Encode", |ch| {
                let req = with_deadline(msg.clone(), deadline);
                async move {
                    let req = req.map_err(|_| {
                        Status::deadline_exceeded("deadline passed before the call")
                    })?;
                    let mut client = TextEncoderClient::with_interceptor(ch, InjectTraceContext)
                        .max_decoding_message_size(MAX_MESSAGE_BYTES)
                        .max_encoding_message_size(MAX_MESSAGE_BYTES);
                    client.encode(req).await.map(tonic::Response::into_inner)
                }
            })
            .await?;
        Ok(resp)
    }

    /// Starts the denoising loop and waits for its first event; a replica that is down or busy before that
    /// is replaced by another one.
    pub async fn denoise(
        &self,
        msg: DenoiseRequest,
        deadline: Instant,
    ) -> Result<DenoiseCall, GatewayError> {
        let ((first, rest), lease) = self
            .denoiser
            .call("Denoise", |ch| {
                let req = with_deadline(msg.clone(), deadline);
                async move {
                    let req = req.map_err(|_| {
                        Status::deadline_exceeded("deadline passed before the call")
                    })?;
                    let mut client = DenoiserClient::with_interceptor(ch, InjectTraceContext)
                        .max_decoding_message_size(MAX_MESSAGE_BYTES)
                        .max_encoding_message_size(MAX_MESSAGE_BYTES);
                    let mut stream = client.denoise(req).await?.into_inner();
                    match stream.message().await? {
                        Some(first) => Ok((first, stream)),
                        None => Err(Status::data_loss(
                            "the denoiser stream ended without any event",
                        )),
                    }
                }
            })
            .await?;
        Ok(DenoiseCall { first, rest, lease })
    }

    pub async fn decode(
        &self,
        msg: DecodeRequest,
        deadline: Instant,
    ) -> Result<DecodeResponse, GatewayError> {
        let (resp, _lease) = self
            .vae
            .call("Decode", |ch| {
                let req = with_deadline(msg.clone(), deadline);
                async move {
                    let req = req.map_err(|_| {
                        Status::deadline_exceeded("deadline passed before the call")
                    })?;
                    let mut client = VaeClient::with_interceptor(ch, InjectTraceContext)
                        .max_decoding_message_size(MAX_MESSAGE_BYTES)
                        .max_encoding_message_size(MAX_MESSAGE_BYTES);
                    client.decode(req).await.map(tonic::Response::into_inner)
                }
            })
            .await?;
        Ok(resp)
    }

    /// Encodes RGB8 images to normalised latents, sampled with the request's posterior noise.
    pub async fn encode_image(
        &self,
        msg: EncodeImageRequest,
        deadline: Instant,
    ) -> Result<EncodeImageResponse, GatewayError> {
        let (resp, _lease) = self
            .vae
            .call("Encode", |ch| {
                let req = with_deadline(msg.clone(), deadline);
                async move {
                    let req = req.map_err(|_| {
                        Status::deadline_exceeded("deadline passed before the call")
                    })?;
                    let mut client = VaeClient::with_interceptor(ch, InjectTraceContext)
                        .max_decoding_message_size(MAX_MESSAGE_BYTES)
                        .max_encoding_message_size(MAX_MESSAGE_BYTES);
                    client.encode(req).await.map(tonic::Response::into_inner)
                }
            })
            .await?;
        Ok(resp)
    }
}
