//! The `qwen_image.v1.LoraAdmin` handler: load, unload and list the denoiser's LoRA adapters at run time. The
//! factors are read and dropped on the model worker (between two requests, in admission order); the catalog
//! the Denoise handler checks requests against follows once the worker is done. A load evicts the least
//! recently used adapters beyond `--lora-budget-mb`.

use qwen_image_common::stage::{StageError, StageHandle};
use qwen_image_model::snapshot::first_line;
use qwen_image_proto::v1::lora_admin_server::LoraAdmin;
use qwen_image_proto::v1::{
    ListLorasRequest, ListLorasResponse, LoadLoraRequest, LoadLoraResponse, UnloadLoraRequest,
    UnloadLoraResponse,
};
use tonic::{Request, Response, Status};

use crate::adapters::{LoraCatalog, LoraSpec, describe, load_one};
use crate::model::LoadedModel;

/// Longest adapter name.
const MAX_NAME: usize = 128;

pub struct LoraAdminService {
    pub(crate) stage: StageHandle<LoadedModel>,
    pub(crate) catalog: LoraCatalog,
    pub(crate) dtype_bytes: usize,
    pub(crate) budget: u64,
}

fn check_name(name: &str) -> Result<(), StageError> {
    if name.is_empty()
        || name.len() > MAX_NAME
        || name
            .chars()
            .any(|c| c.is_control() || matches!(c, '=' | ',' | ':'))
    {
        return Err(StageError::InvalidArgument(format!(
            "name `{}`: send 1..={MAX_NAME} characters without control characters, `=`, `,` or `:`",
            name.escape_debug()
        )));
    }
    Ok(())
}

#[tonic::async_trait]
impl LoraAdmin for LoraAdminService {
    #[tracing::instrument(name = "LoadLora", skip_all)]
    async fn load_lora(
        &self,
        request: Request<LoadLoraRequest>,
    ) -> Result<Response<LoadLoraResponse>, Status> {
        let deadline = self.stage.begin(&request)?;
        let LoadLoraRequest { name, path } = request.into_inner();
        self.stage.checked(check_name(&name))?;
        if path.is_empty() {
            self.stage
                .checked(Err::<(), _>(StageError::InvalidArgument(
                    "path is empty; send the adapter's safetensors file on the denoiser's machine"
                        .into(),
                )))?;
        }
        if self.catalog.contains(&name) {
            return Err(StageError::FailedPrecondition(format!(
                "a LoRA adapter `{name}` is loaded already; unload it first or choose another name"
            ))
            .into());
        }
        let spec = LoraSpec {
            name: name.clone(),
            file: path.into(),
        };
        let entry = self
            .stage
            .checked(describe(&spec, self.dtype_bytes).map_err(StageError::InvalidArgument))?;
        let evict = self.stage.checked(
            self.catalog
                .victims(entry.description.bytes, self.budget)
                .map_err(StageError::InvalidArgument),
        )?;
        let victims = evict.clone();
        self.stage
            .unary("LoadLora", deadline, move |m, _ctx| {
                let adapter = load_one(&spec, &m.transformer)
                    .map_err(|e| StageError::InvalidArgument(first_line(&e)))?;
                for v in &victims {
                    m.loras.remove(v);
                }
                m.loras.insert(spec.name, adapter);
                Ok(())
            })
            .await?;
        self.catalog.remove(&evict);
        let description = entry.description.clone();
        self.catalog.insert(entry);
        tracing::info!(%name, evicted = ?evict, "LoRA adapter loaded at run time");
        Ok(Response::new(LoadLoraResponse {
            lora: Some(description),
            evicted: evict,
        }))
    }

    #[tracing::instrument(name = "UnloadLora", skip_all)]
    async fn unload_lora(
        &self,
        request: Request<UnloadLoraRequest>,
    ) -> Result<Response<UnloadLoraResponse>, Status> {
        let deadline = self.stage.begin(&request)?;
        let name = request.into_inner().name;
        if !self.catalog.contains(&name) {
            return Err(StageError::NotFound(format!(
                "no LoRA adapter `{name}` is loaded; loaded: {}",
                self.catalog.names()
            ))
            .into());
        }
        // out of the catalog first: no new request is admitted with it
        self.catalog.remove(std::slice::from_ref(&name));
        let n = name.clone();
        self.stage
            .unary("UnloadLora", deadline, move |m, _ctx| {
                m.loras.remove(&n);
                Ok(())
            })
            .await?;
        tracing::info!(%name, "LoRA adapter unloaded");
        Ok(Response::new(UnloadLoraResponse {}))
    }

    async fn list_loras(
        &self,
        _request: Request<ListLorasRequest>,
    ) -> Result<Response<ListLorasResponse>, Status> {
        Ok(Response::new(ListLorasResponse {
            loras: self.catalog.list(),
            budget_bytes: self.budget,
        }))
    }
}
