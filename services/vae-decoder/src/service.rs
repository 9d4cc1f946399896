//! The `qwen_image.v1.Vae` gRPC handlers: validate, admit, answer.

use qwen_image_common::stage::StageHandle;
use qwen_image_proto::v1::vae_server::Vae;
use qwen_image_proto::v1::{
    DecodeRequest, DecodeResponse, EncodeImageRequest, EncodeImageResponse,
};
use tonic::{Request, Response, Status};

use crate::model::LoadedModel;
use crate::validate::{VaeShape, validate_decode, validate_encode};

pub struct VaeService {
    pub(crate) stage: StageHandle<LoadedModel>,
    pub(crate) shape: VaeShape,
}

#[tonic::async_trait]
impl Vae for VaeService {
    #[tracing::instrument(name = "Decode", skip_all)]
    async fn decode(
        &self,
        request: Request<DecodeRequest>,
    ) -> Result<Response<DecodeResponse>, Status> {
        let deadline = self.stage.begin(&request)?;
        let inputs = self
            .stage
            .checked(validate_decode(request.get_ref(), self.shape))?;
        let out = self
            .stage
            .unary("Decode", deadline, move |m, _| {
                crate::job::decode(m, &inputs)
            })
            .await?;
        Ok(Response::new(out))
    }

    #[tracing::instrument(name = "Encode", skip_all)]
    async fn encode(
        &self,
        request: Request<EncodeImageRequest>,
    ) -> Result<Response<EncodeImageResponse>, Status> {
        let deadline = self.stage.begin(&request)?;
        let inputs = self
            .stage
            .checked(validate_encode(request.get_ref(), self.shape))?;
        let out = self
            .stage
            .unary("Encode", deadline, move |m, _| {
                crate::job::encode(m, &inputs)
            })
            .await?;
        Ok(Response::new(out))
    }
}
