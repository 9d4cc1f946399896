//! The `qwen_image.v1.TextEncoder` gRPC handler: validate, admit, answer.

use qwen_image_common::stage::StageHandle;
use qwen_image_model::interrupt::{self, Interrupt};
use qwen_image_proto::v1::text_encoder_server::TextEncoder;
use qwen_image_proto::v1::{EncodeRequest, EncodeResponse};
use tonic::{Request, Response, Status};

use crate::model::LoadedModel;
use crate::validate::validate;

pub struct TextEncoderService {
    pub(crate) stage: StageHandle<LoadedModel>,
}

#[tonic::async_trait]
impl TextEncoder for TextEncoderService {
    #[tracing::instrument(name = "Encode", skip_all)]
    async fn encode(
        &self,
        request: Request<EncodeRequest>,
    ) -> Result<Response<EncodeResponse>, Status> {
        let deadline = self.stage.begin(&request)?;
        let inputs = self.stage.checked(validate(request.get_ref()))?;
        tracing::info!(
            prompts = inputs.prompts.len(),
            pictures = inputs.images.len(),
            max_sequence_length = inputs.max_sequence_length,
            "admitting"
        );
        let out = self
            .stage
            .unary("Encode", deadline, move |m, ctx| {
                let interrupt = Interrupt::new(ctx.cancel_flag(), ctx.deadline);
                interrupt::scoped(interrupt, || crate::job::encode(m, &inputs))
            })
            .await?;
        Ok(Response::new(out))
    }
}
