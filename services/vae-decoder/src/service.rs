//! The `qwen_image.v1.Vae` gRPC handlers: validate, admit, answer.

use qwen_image_common::stage::StageHandle;
use qwen_image_model::interrupt::{self, Interrupt};
use qwen_image_proto::v1::vae_server::Vae;
use qwen_image_proto::v1::{
    DecodeRequest, DecodeResponse, EncodeImageRequest, EncodeImageResponse,
};
use tonic::{Request, Response, Status};

use crate::model::LoadedModel;
use crate::validate::{VaeShape, validate_decode, validate_encode};

/// `n` images of `w` x `h` pixels.
fn pixels(n: usize, w: usize, h: usize) -> u64 {
    (n as u64).saturating_mul(w as u64).saturating_mul(h as u64)
}

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
        let s = &inputs.latents.shape; // [B, C, h, w]
        let f = self.shape.scale_factor;
        let (b, h, w) = (s[0], s[2] * f, s[3] * f);
        self.stage.check_pixels(
            pixels(b, w, h),
            &format!("decoding {b} image(s) of {w}x{h}"),
        )?;
        let out = self
            .stage
            .unary("Decode", deadline, move |m, ctx| {
                let interrupt = Interrupt::new(ctx.cancel_flag(), ctx.deadline);
                interrupt::scoped(interrupt, || crate::job::decode(m, &inputs))
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
        let (n, w, h) = (inputs.images.len(), inputs.width_px, inputs.height_px);
        self.stage.check_pixels(
            pixels(n, w, h),
            &format!("encoding {n} image(s) of {w}x{h}"),
        )?;
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
