//! The stage clients: typed calls to the three stages (message-size limits, forwarded deadlines), each
//! waiting for a replica slot ([`slots`]) and failing over to another replica ([`failover`]); what the
//! stages describe (their model, checked to fit together: [`describe`]); and the gateway's own bounded
//! request queue ([`admission`]).

pub mod admission;
pub(crate) mod describe;
pub mod discovery;
pub mod failover;
pub mod pool;
pub mod resume;
pub mod slots;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use qwen_image_common::grpc::InjectTraceContext;
use qwen_image_common::limits::MAX_MESSAGE_BYTES;
use qwen_image_proto::v1::denoiser_client::DenoiserClient;
use qwen_image_proto::v1::text_encoder_client::TextEncoderClient;
use qwen_image_proto::v1::vae_client::VaeClient;
use qwen_image_proto::v1::{
    DecodeRequest, DecodeResponse, DenoiseEvent, DenoiseRequest, EncodeImageRequest,
    EncodeImageResponse, EncodeRequest, EncodeResponse, Image, OverlongPromptPolicy,
};
use tonic::{Request, Status, Streaming};

use crate::config::GatewayConfig;
use crate::error::{GatewayError, StageName};
pub use failover::Patience;
use pool::Pool;
pub use slots::QueueObserver;

/// The replicas of every stage.
#[derive(Debug)]
pub struct Stages {
    /// The pools; the text-encoder and VAE pools may be shared with another served model
    /// ([`crate::models`]).
    pub text_encoder: Arc<Pool>,
    pub denoiser: Arc<Pool>,
    pub vae: Arc<Pool>,
    /// Counts the reviews of the replicas' descriptions (a request that arrives before the stages have
    /// described themselves waits for the next one).
    reviewed: tokio::sync::watch::Sender<u64>,
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
        Ok(Self::from_pools(
            Arc::new(Pool::new(
                StageName::TextEncoder,
                &config.text_encoder,
                config.stage_tls.as_ref(),
            )?),
            Arc::new(Pool::new(
                StageName::Denoiser,
                &config.denoiser,
                config.stage_tls.as_ref(),
            )?),
            Arc::new(Pool::new(
                StageName::Vae,
                &config.vae,
                config.stage_tls.as_ref(),
            )?),
        ))
    }

    /// One model's stages over existing pools.
    pub fn from_pools(text_encoder: Arc<Pool>, denoiser: Arc<Pool>, vae: Arc<Pool>) -> Self {
        Self {
            text_encoder,
            denoiser,
            vae,
            reviewed: tokio::sync::watch::Sender::new(0),
        }
    }

    pub fn pools(&self) -> [&Pool; 3] {
        [&*self.text_encoder, &*self.denoiser, &*self.vae]
    }

    /// Resolves every stage's DNS names again ([`discovery`]); true when some stage's replicas changed.
    pub async fn rediscover(&self, resolver: &dyn discovery::Resolve) -> bool {
        let (a, b, c) = tokio::join!(
            self.text_encoder.rediscover(resolver),
            self.denoiser.rediscover(resolver),
            self.vae.rediscover(resolver)
        );
        a || b || c
    }

    pub fn pool(&self, stage: StageName) -> &Pool {
        match stage {
            StageName::TextEncoder => &*self.text_encoder,
            StageName::Denoiser => &*self.denoiser,
            StageName::Vae => &*self.vae,
        }
    }

    /// Encodes one prompt. Overlong prompts are truncated to diffusers' 512 tokens, as QwenImagePipeline does.
    pub async fn encode(
        &self,
        prompt: &str,
        deadline: Instant,
        patience: Patience<'_>,
    ) -> Result<EncodeResponse, GatewayError> {
        self.encode_with_pictures(prompt, &[], deadline, patience)
            .await
    }

    /// Encodes one prompt with pictures (instruction editing: the Edit template, nothing truncated); no
    /// pictures = [`Stages::encode`].
    pub async fn encode_with_pictures(
        &self,
        prompt: &str,
        pictures: &[Image],
        deadline: Instant,
        patience: Patience<'_>,
    ) -> Result<EncodeResponse, GatewayError> {
        let msg = EncodeRequest {
            prompts: vec![prompt.to_string()],
            max_sequence_length: 0,
            overlong_policy: OverlongPromptPolicy::Truncate as i32,
            images: pictures.to_vec(),
        };
        let (resp, _lease) = self
            .text_encoder
            .call("Encode", deadline, patience, |ch| {
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

    /// Runs the denoising loop: `consume` reads the stream to the end and returns its result (it forwards
    /// progress to the caller, through the attempt's [`resume::Attempt::observe`]). A replica that dies or
    /// whose stream breaks is replaced by another and the loop resumes from the last checkpoint latents
    /// `resume` kept (or runs again from the start: same request, same result), so `consume` may see some
    /// steps again.
    pub async fn denoise<'r, T, F, Fut>(
        &self,
        msg: DenoiseRequest,
        resume: &'r resume::Resume,
        deadline: Instant,
        patience: Patience<'_>,
        consume: F,
    ) -> Result<T, GatewayError>
    where
        F: Fn(Streaming<DenoiseEvent>, resume::Attempt<'r>) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        let consume = &consume;
        let (result, _lease) = self
            .denoiser
            .call("Denoise", deadline, patience, |ch| {
                let (msg, attempt) = resume.attempt(&msg);
                let req = with_deadline(msg, deadline);
                async move {
                    let req = req.map_err(|_| {
                        Status::deadline_exceeded("deadline passed before the call")
                    })?;
                    let mut client = DenoiserClient::with_interceptor(ch, InjectTraceContext)
                        .max_decoding_message_size(MAX_MESSAGE_BYTES)
                        .max_encoding_message_size(MAX_MESSAGE_BYTES);
                    let stream = client.denoise(req).await?.into_inner();
                    consume(stream, attempt).await
                }
            })
            .await?;
        Ok(result)
    }

    pub async fn decode(
        &self,
        msg: DecodeRequest,
        deadline: Instant,
        patience: Patience<'_>,
    ) -> Result<DecodeResponse, GatewayError> {
        let (resp, _lease) = self
            .vae
            .call("Decode", deadline, patience, |ch| {
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
        patience: Patience<'_>,
    ) -> Result<EncodeImageResponse, GatewayError> {
        let (resp, _lease) = self
            .vae
            .call("Encode", deadline, patience, |ch| {
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
