//! The `qwen_image.v1.TextEncoder` gRPC handler: validate, admit, await the worker's reply.

use std::time::Instant;

use qwen_image_common::deadline;
use qwen_image_common::queue::Admission;
use qwen_image_common::stage::Readiness;
use qwen_image_proto::v1::text_encoder_server::TextEncoder;
use qwen_image_proto::v1::{EncodeRequest, EncodeResponse};
use tokio::sync::oneshot;
use tonic::{Request, Response, Status};

use crate::error::TextEncoderError;
use crate::job::EncodeJob;
use crate::validate::validate;

pub struct TextEncoderService {
    pub(crate) admission: Admission<EncodeJob>,
    pub(crate) readiness: Readiness,
}

#[tonic::async_trait]
impl TextEncoder for TextEncoderService {
    #[tracing::instrument(name = "Encode", skip_all)]
    async fn encode(
        &self,
        request: Request<EncodeRequest>,
    ) -> Result<Response<EncodeResponse>, Status> {
        if !self.readiness.is_ready() {
            return Err(TextEncoderError::NotReady.into());
        }
        let deadline = deadline::from_metadata(request.metadata(), Instant::now());
        if deadline.is_some_and(|d| d <= Instant::now()) {
            return Err(TextEncoderError::DeadlineExceeded.into());
        }
        let inputs =
            validate(request.get_ref()).inspect_err(|e| tracing::info!(error = %e, "rejected"))?;
        tracing::info!(
            prompts = inputs.prompts.len(),
            max_sequence_length = inputs.max_sequence_length,
            "admitting"
        );
        let (reply, rx) = oneshot::channel();
        self.admission
            .try_submit(
                EncodeJob {
                    inputs,
                    reply,
                    deadline,
                },
                tracing::Span::current(),
            )
            .map_err(TextEncoderError::from)?;
        // Dropping this future (the caller cancelled) closes `rx`; the worker skips the job if not started.
        let answer = match deadline {
            Some(d) => tokio::time::timeout_at(d.into(), rx)
                .await
                .map_err(|_| TextEncoderError::DeadlineExceeded)?,
            None => rx.await,
        };
        match answer {
            Ok(Ok(response)) => Ok(Response::new(response)),
            Ok(Err(e)) => Err(e.into()),
            Err(_) => Err(TextEncoderError::NotReady.into()),
        }
    }
}
