//! Several models behind one gateway: the first model (`--text-encoder`, `--denoiser`, `--vae`,
//! `--model-name`) and every `--extra-model`, each a [`Stages`] over pools. Pools with the same endpoint
//! list are one pool: an `--extra-model NAME=DENOISER_URLS` uses the first model's text-encoder and VAE
//! pools (the Edit models use the base model's text encoder and VAE). A request picks its model by
//! `GenerationSettings.model` (empty = the first); an unknown name is NOT_FOUND listing the served ones.
//!
//! Every model's replicas are reviewed as one gateway would review them ([`Stages::verdicts`]); a shared
//! replica is accepted only when it fits every model using it (a refusal names the model).

use std::sync::Arc;

use qwen_image_proto::v1::{ListModelsResponse, ServedModel, StageDescription};
use tonic::Status;

use crate::config::GatewayConfig;
use crate::error::{GatewayError, StageName};
use crate::stages::Stages;
use crate::stages::describe::{self, Verdict};
use crate::stages::pool::{Described, Pool, Replica};

/// `_class_name` of the pipeline whose models take `Edit` requests (diffusers
/// `pipelines/qwenimage/pipeline_qwenimage_edit_plus.py`).
pub const EDIT_PIPELINE_CLASS: &str = "QwenImageEditPlusPipeline";

/// One served model.
#[derive(Debug)]
pub struct Model {
    /// The configured name (`--model-name` for the first model, the `--extra-model` name); `None` = the
    /// first model without `--model-name` (named by its denoiser's model id).
    pub name: Option<String>,
    pub stages: Arc<Stages>,
    pub shared_text_encoder: bool,
    pub shared_vae: bool,
}

impl Model {
    /// What the accepted denoiser replica describes (`None` before one has).
    fn denoiser_description(&self) -> Option<Arc<StageDescription>> {
        self.stages
            .denoiser
            .replicas()
            .iter()
            .find_map(|r| match r.described() {
                Described::Accepted(d) => Some(d),
                _ => None,
            })
    }

    fn text_encoder_vision(&self) -> Option<bool> {
        self.stages
            .text_encoder
            .replicas()
            .iter()
            .find_map(|r| match r.described() {
                Described::Accepted(d) => d.text_encoder.as_ref().map(|t| t.vision),
                _ => None,
            })
    }

    /// The name requests use: the configured one, else the denoiser's model id, else `default`.
    pub fn display_name(&self) -> String {
        match &self.name {
            Some(n) => n.clone(),
            None => self
                .denoiser_description()
                .map(|d| d.model_id.clone())
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "default".to_string()),
        }
    }

    /// Whether this model's denoiser serves an instruction-editing ([`EDIT_PIPELINE_CLASS`]) snapshot;
    /// `None` before it described itself.
    pub fn is_edit(&self) -> Option<bool> {
        self.denoiser_description().map(|d| {
            d.transformer
                .as_ref()
                .is_some_and(|t| t.pipeline_class == EDIT_PIPELINE_CLASS)
        })
    }

    /// Whether requests can name it yet: it has a configured name or its denoiser described its model id.
    pub fn named(&self) -> bool {
        self.name.is_some() || self.denoiser_description().is_some()
    }

    /// Checks that this model takes `Edit` requests: its denoiser serves a [`EDIT_PIPELINE_CLASS`]
    /// snapshot (INVALID_ARGUMENT naming the model otherwise: the request names the wrong model) and its text
    /// encoder has vision (FAILED_PRECONDITION otherwise: a configuration problem). UNAVAILABLE before the
    /// stages described themselves.
    pub fn check_edit(&self) -> Result<(), GatewayError> {
        let name = self.display_name();
        let Some(d) = self.denoiser_description() else {
            return Err(GatewayError::Unavailable(format!(
                "the denoiser of model `{name}` has not described its model yet; retry in a few seconds"
            )));
        };
        let class = d
            .transformer
            .as_ref()
            .map(|t| t.pipeline_class.as_str())
            .unwrap_or_default();
        if class != EDIT_PIPELINE_CLASS {
            let class = if class.is_empty() {
                "no pipeline class"
            } else {
                class
            };
            return Err(GatewayError::InvalidArgument(format!(
                "model `{name}` is not an instruction-editing model (its denoiser serves {class}, Edit needs \
                 {EDIT_PIPELINE_CLASS}: Qwen-Image-Edit-2509 / -2511); name an Edit model in settings.model \
                 (ListModels), or use Img2Img / Inpaint for this model"
            )));
        }
        if self.text_encoder_vision() != Some(true) {
            return Err(GatewayError::FailedPrecondition(format!(
                "the text encoder of model `{name}` cannot encode prompts with pictures (no processor or vision \
                 weights); start it with the Edit snapshot"
            )));
        }
        Ok(())
    }

    /// Its `ListModels` entry.
    pub fn info(&self) -> ServedModel {
        let d = self.denoiser_description();
        let t = d.as_ref().and_then(|d| d.transformer.clone());
        let pipeline_class = t.map(|t| t.pipeline_class).unwrap_or_default();
        ServedModel {
            name: self.display_name(),
            model_id: d.map(|d| d.model_id.clone()).unwrap_or_default(),
            instruction_edit: pipeline_class == EDIT_PIPELINE_CLASS
                && self.text_encoder_vision() == Some(true),
            pipeline_class,
            ready: self.stages.pools().iter().all(|p| p.any_usable()),
            shared_text_encoder: self.shared_text_encoder,
            shared_vae: self.shared_vae,
        }
    }
}

/// Every served model, and each pool once.
#[derive(Debug)]
pub struct Models {
    pub models: Vec<Model>,
    /// Each pool once (health checks, SERVING).
    pools: Vec<Arc<Pool>>,
}

impl Models {
    pub fn new(config: &GatewayConfig) -> Result<Self, GatewayError> {
        let mut pools: Vec<(Vec<String>, StageName, Arc<Pool>)> = Vec::new();
        let mut pool =
            |stage: StageName, urls: &[String]| -> Result<(Arc<Pool>, bool), GatewayError> {
                if let Some((_, _, p)) = pools.iter().find(|(u, s, _)| *s == stage && u == urls) {
                    return Ok((p.clone(), true));
                }
                let p = Arc::new(Pool::new(stage, urls, config.stage_tls.as_ref())?);
                pools.push((urls.to_vec(), stage, p.clone()));
                Ok((p, false))
            };
        let mut specs = vec![(
            config.model_name.clone(),
            config.denoiser.clone(),
            config.text_encoder.clone(),
            config.vae.clone(),
        )];
        for m in &config.extra_models {
            specs.push((
                Some(m.name.clone()),
                m.denoiser.clone(),
                m.text_encoder
                    .clone()
                    .unwrap_or_else(|| config.text_encoder.clone()),
                m.vae.clone().unwrap_or_else(|| config.vae.clone()),
            ));
        }
        let mut models = Vec::with_capacity(specs.len());
        for (name, dn, te, vae) in specs {
            if let Some(n) = &name
                && models
                    .iter()
                    .any(|m: &Model| m.name.as_deref() == Some(n.as_str()))
            {
                return Err(GatewayError::Internal(format!(
                    "two served models are named `{n}`; give each --extra-model its own name"
                )));
            }
            let (te, shared_te) = pool(StageName::TextEncoder, &te)?;
            let (dn, _) = pool(StageName::Denoiser, &dn)?;
            let (vae, shared_vae) = pool(StageName::Vae, &vae)?;
            models.push(Model {
                name,
                stages: Arc::new(Stages::from_pools(te, dn, vae)),
                shared_text_encoder: shared_te,
                shared_vae,
            });
        }
        // The first model learns that its pools are shared only once a later model reuses them.
        let uses = |p: &Arc<Pool>| {
            models
                .iter()
                .flat_map(|m| m.stages.pools())
                .filter(|q| std::ptr::eq(*q, &**p))
                .count()
        };
        let shared: Vec<(bool, bool)> = models
            .iter()
            .map(|m| (uses(&m.stages.text_encoder) > 1, uses(&m.stages.vae) > 1))
            .collect();
        for (m, (te, vae)) in models.iter_mut().zip(shared) {
            m.shared_text_encoder = te;
            m.shared_vae = vae;
        }
        Ok(Self {
            models,
            pools: pools.into_iter().map(|(_, _, p)| p).collect(),
        })
    }

    /// Each pool once.
    pub fn pools(&self) -> &[Arc<Pool>] {
        &self.pools
    }

    /// The model a request names: empty = the first; a configured name; or a denoiser's model id.
    /// NOT_FOUND listing the served names otherwise.
    pub fn select(&self, name: &str) -> Result<&Model, Status> {
        if name.is_empty() {
            return self
                .models
                .first()
                .ok_or_else(|| Status::unavailable("the gateway serves no model"));
        }
        self.models
            .iter()
            .find(|m| m.name.as_deref() == Some(name))
            .or_else(|| self.models.iter().find(|m| m.display_name() == name))
            .ok_or_else(|| {
                let served: Vec<String> = self.models.iter().map(Model::display_name).collect();
                Status::not_found(format!(
                    "model `{}` is not served here; served: [{}] (set settings.model to one of them, or leave it \
                     empty for `{}`)",
                    qwen_image_common::wire_guard::clip(name, 200),
                    served.join(", "),
                    served.first().cloned().unwrap_or_default()
                ))
            })
    }

    /// Reads the descriptions of `replicas` and reviews every model.
    pub async fn describe(&self, replicas: Vec<(StageName, Arc<Replica>)>) {
        if replicas.is_empty() {
            return;
        }
        describe::read_all(&replicas).await;
        self.review();
    }

    /// Reviews every model's replicas; a replica shared by several models keeps the first refusal (the
    /// message then names the model whose denoiser it does not fit).
    pub fn review(&self) {
        let many = self.models.len() > 1;
        let mut merged: Vec<Verdict> = Vec::new();
        for m in &self.models {
            for mut v in m.stages.verdicts() {
                if many && let Err(mismatch) = &mut v.verdict {
                    mismatch.message =
                        format!("model `{}`: {}", m.display_name(), mismatch.message);
                }
                match merged
                    .iter_mut()
                    .find(|w| Arc::ptr_eq(&w.replica, &v.replica))
                {
                    Some(w) => {
                        if w.verdict.is_ok() && v.verdict.is_err() {
                            *w = v;
                        }
                    }
                    None => merged.push(v),
                }
            }
        }
        describe::apply(merged);
        for m in &self.models {
            m.stages.reviewed();
        }
    }

    /// True when every pool has a usable replica.
    pub fn all_usable(&self) -> bool {
        self.pools.iter().all(|p| p.any_usable())
    }

    /// `ListModels`.
    pub fn list(&self) -> ListModelsResponse {
        ListModelsResponse {
            models: self.models.iter().map(Model::info).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ModelSpec;

    #[tokio::test]
    async fn pools_are_shared_by_endpoints_and_unknown_models_are_not_found() {
        let mut config = GatewayConfig::new("http://te:1", "http://dn:1", "http://vae:1");
        config.model_name = Some("base".into());
        config.extra_models = vec![
            "edit=http://dn-edit:1".parse::<ModelSpec>().expect("spec"),
            "other=http://dn-o:1;vae=http://vae-o:1"
                .parse::<ModelSpec>()
                .expect("spec"),
        ];
        let models = Models::new(&config).expect("models");
        // te shared by all three, vae by base and edit; three denoiser pools
        assert_eq!(models.pools().len(), 6);
        let [base, edit, other] = [&models.models[0], &models.models[1], &models.models[2]];
        assert!(Arc::ptr_eq(
            &base.stages.text_encoder,
            &other.stages.text_encoder
        ));
        assert!(Arc::ptr_eq(&base.stages.vae, &edit.stages.vae));
        assert!(!Arc::ptr_eq(&base.stages.vae, &other.stages.vae));
        assert!(base.shared_text_encoder && base.shared_vae);
        assert!(other.shared_text_encoder && !other.shared_vae);
        assert_eq!(models.select("").expect("default").display_name(), "base");
        assert_eq!(models.select("edit").expect("named").display_name(), "edit");
        let e = models.select("edit-2512").expect_err("unknown");
        assert_eq!(e.code(), tonic::Code::NotFound);
        assert!(e.message().contains("served: [base, edit, other]"), "{e:?}");
        // before any Describe: not an Edit model yet, and says so as UNAVAILABLE
        assert!(matches!(
            edit.check_edit(),
            Err(GatewayError::Unavailable(_))
        ));
        let listed = models.list().models;
        assert_eq!(listed.len(), 3);
        assert!(listed.iter().all(|m| !m.ready && !m.instruction_edit));
        config
            .extra_models
            .push("base=http://x:1".parse().expect("spec"));
        assert!(Models::new(&config).is_err(), "duplicate names");
    }
}
