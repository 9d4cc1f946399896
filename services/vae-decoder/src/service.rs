//! The `qwen_image.v1.Vae` gRPC handlers: validate, admit, await the worker's reply.

use std::time::Instant;

use qwen_image_common::deadline;
use qwen_image_common::queue::Admission;
use qwen_image_common::stage::Readiness;
use qwen_image_proto::v1::vae_server::Vae;
use qwen_image_proto::v1::{
    DecodeRequest, DecodeResponse, EncodeImageRequest, EncodeImageResponse,
};
use tokio::sync::oneshot;
use tonic::{Request, Response, Status};

use crate::error::VaeError;
use crate::job::VaeJob;
use crate::validate::{VaeShape, validate_decode, validate_encode};

pub struct VaeService {
    pub(crate) admission: Admission<VaeJob>,
    pub(crate) shape: VaeShape,
    pub(crate) readiness: Readiness,
}

impl VaeService {
    /// Admits the job built by `make` and waits for its reply (bounded by the caller's deadline).
    /// Dropping this future (the caller cancelled) closes the reply channel; the worker then skips the
    /// job if it has not started.
    async fn submit<T>(
        &self,
        deadline: Option<Instant>,
        make: impl FnOnce(oneshot::Sender<Result<T, VaeError>>) -> VaeJob,
    ) -> Result<T, VaeError> {
        let (reply, rx) = oneshot::channel();
        self.admission
            .try_submit(make(reply), tracing::Span::current())?;
        let answer = match deadline {
            Some(d) => tokio::time::timeout_at(d.into(), rx)
                .await
                .map_err(|_| VaeError::DeadlineExceeded)?,
            None => rx.await,
        };
        answer.map_err(|_| VaeError::NotReady)?
    }
}

#[tonic::async_trait]
impl Vae for VaeService {
    #[tracing::instrument(name = "Decode", skip_all)]
    async fn decode(
        &self,
        request: Request<DecodeRequest>,
    ) -> Result<Response<DecodeResponse>, Status> {
        if !self.readiness.is_ready() {
            return Err(VaeError::NotReady.into());
        }
        let deadline = deadline::from_metadata(request.metadata(), Instant::now());
        if deadline.is_some_and(|d| d <= Instant::now()) {
            return Err(VaeError::DeadlineExceeded.into());
        }
        let inputs = validate_decode(request.get_ref(), self.shape)
            .inspect_err(|e| tracing::info!(error = %e, "rejected"))?;
        let out = self
            .submit(deadline, |reply| VaeJob::Decode {
                inputs,
                reply,
                deadline,
            })
            .await?;
        Ok(Response::new(out))
    }

    #[tracing::instrument(name = "Encode", skip_all)]
    async fn encode(
        &self,
        request: Request<EncodeImageRequest>,
    ) -> Result<Response<EncodeImageResponse>, Status> {
        if !self.readiness.is_ready() {
            return Err(VaeError::NotReady.into());
        }
        let deadline = deadline::from_metadata(request.metadata(), Instant::now());
        if deadline.is_some_and(|d| d <= Instant::now()) {
            return Err(VaeError::DeadlineExceeded.into());
        }
        let inputs = validate_encode(request.get_ref(), self.shape)
            .inspect_err(|e| tracing::info!(error = %e, "rejected"))?;
        let out = self
            .submit(deadline, |reply| VaeJob::Encode {
                inputs,
                reply,
                deadline,
            })
            .await?;
        Ok(Response::new(out))
    }
}
