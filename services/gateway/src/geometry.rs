//! The model's geometry as the stages describe it, and the checks that a set of stage replicas fits
//! together. Every size rule of the gateway comes from here; nothing about the model is assumed.
//!
//! The denoiser is the anchor: text-encoder and VAE replicas are checked against the transformer's
//! geometry (text hidden size = joint_attention_dim, VAE z_dim = latent channels), and replicas of one
//! stage must serve the same component (equal digests). Stages of different snapshots that fit are
//! accepted (a shared text encoder or VAE); only a differing snapshot digest is logged.

use qwen_image_proto::v1::{StageDescription, StageKind};

use crate::error::StageName;

/// diffusers `QwenImagePipeline.default_sample_size`: the default output side is this many latent cells.
pub const DEFAULT_SAMPLE_SIZE: u32 = 128;

/// What the gateway needs to know about the model to validate and shape requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Latent channels C (transformer out_channels = VAE z_dim).
    pub latent_channels: usize,
    /// Pixels per latent cell along each side (the VAE's scale factor: 8, or 4 for 3-level VAEs).
    pub vae_scale_factor: u32,
    /// Side of the latent patches the transformer packs into one token (2).
    pub patch_size: u32,
    /// Most image pixels per request summed over its images (the smaller of the denoiser's and the VAE's
    /// `--max-pixels`, `StageLimits.max_pixels`); 0 = not bounded by the stages.
    pub max_pixels: u64,
}

impl Geometry {
    /// Width and height must be multiples of this (VAE factor x patch packing).
    pub fn size_multiple(&self) -> u32 {
        self.vae_scale_factor * self.patch_size
    }

    /// The default output side: `default_sample_size * vae_scale_factor` (1024 for Qwen-Image).
    pub fn default_side_px(&self) -> u32 {
        DEFAULT_SAMPLE_SIZE * self.vae_scale_factor
    }

    /// Latent grid (h, w) of a `width` x `height` picture.
    pub fn latent_hw(&self, width: u32, height: u32) -> (usize, usize) {
        (
            (height / self.vae_scale_factor) as usize,
            (width / self.vae_scale_factor) as usize,
        )
    }

    /// `v` rounded down to the size multiple.
    pub fn floor_to_multiple(&self, v: u32) -> u32 {
        (v / self.size_multiple()) * self.size_multiple()
    }
}

/// Why a replica cannot be used with the others: the field and a sentence naming both sides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    /// The field that differs (a metrics label: `kind`, `hidden_size`, `z_dim`, `digest`, ...).
    pub field: &'static str,
    pub message: String,
}

fn kind_of(stage: StageName) -> StageKind {
    match stage {
        StageName::TextEncoder => StageKind::TextEncoder,
        StageName::Denoiser => StageKind::Denoiser,
        StageName::Vae => StageKind::Vae,
    }
}

/// Checks that `d` (a replica configured as `stage` at `uri`) is that kind of stage and describes its
/// component.
pub fn check_kind(stage: StageName, uri: &str, d: &StageDescription) -> Result<(), Mismatch> {
    let want = kind_of(stage);
    let ok = d.kind == want as i32
        && match stage {
            StageName::TextEncoder => d.text_encoder.is_some(),
            StageName::Denoiser => d.transformer.is_some(),
            StageName::Vae => d.vae.is_some(),
        };
    if ok {
        return Ok(());
    }
    let is = StageKind::try_from(d.kind)
        .map(|k| k.as_str_name())
        .unwrap_or("an unknown kind");
    Err(Mismatch {
        field: "kind",
        message: format!(
            "the {stage} replica {uri} describes itself as {is}; point --{stage} at a {stage} stage"
        ),
    })
}

/// The component digest a replica of `stage` serves.
fn digest(stage: StageName, d: &StageDescription) -> String {
    match stage {
        StageName::TextEncoder => d.text_encoder.as_ref().map(|t| t.digest.clone()),
        StageName::Denoiser => d.transformer.as_ref().map(|t| {
            // ControlNets are part of what a denoiser replica serves.
            let nets: Vec<String> = d
                .controlnets
                .iter()
                .map(|c| format!("{}={}", c.id, c.digest))
                .collect();
            format!("{} [{}]", t.digest, nets.join(", "))
        }),
        StageName::Vae => d.vae.as_ref().map(|v| v.digest.clone()),
    }
    .unwrap_or_default()
}

/// Checks a replica against the first accepted replica of its stage (`first`, at `first_uri`): one stage
/// serves one component.
pub fn check_same_component(
    stage: StageName,
    uri: &str,
    d: &StageDescription,
    first_uri: &str,
    first: &StageDescription,
) -> Result<(), Mismatch> {
    let (mine, theirs) = (digest(stage, d), digest(stage, first));
    if mine == theirs {
        return Ok(());
    }
    Err(Mismatch {
        field: "digest",
        message: format!(
            "{stage} replica {uri} serves another {} (digest {}, weights {}) than replica {first_uri} (digest {}, \
             weights {}); start every {stage} replica from the same files",
            component(stage),
            short(&mine),
            format_or_unknown(d),
            short(&theirs),
            format_or_unknown(first)
        ),
    })
}

/// The replica's weight format (`StageDescription.weights_format`), `unknown` from older stages.
fn format_or_unknown(d: &StageDescription) -> &str {
    if d.weights_format.is_empty() {
        "unknown"
    } else {
        &d.weights_format
    }
}

fn component(stage: StageName) -> &'static str {
    match stage {
        StageName::TextEncoder => "text encoder",
        StageName::Denoiser => "transformer or ControlNet set",
        StageName::Vae => "VAE",
    }
}

fn short(digest: &str) -> &str {
    digest.get(..12).unwrap_or(digest)
}

/// Checks a text-encoder or VAE replica against the denoiser's transformer (`anchor`, at `anchor_uri`).
pub fn check_against_denoiser(
    stage: StageName,
    uri: &str,
    d: &StageDescription,
    anchor_uri: &str,
    anchor: &StageDescription,
) -> Result<(), Mismatch> {
    let Some(t) = &anchor.transformer else {
        return Ok(());
    };
    match stage {
        StageName::TextEncoder => {
            let te = d.text_encoder.as_ref();
            let hidden = te.map_or(0, |te| te.hidden_size);
            if hidden != t.joint_attention_dim {
                return Err(Mismatch {
                    field: "hidden_size",
                    message: format!(
                        "text-encoder hidden size {hidden} ({uri}), denoiser expects {} (joint_attention_dim of \
                         {anchor_uri}); start both from the same model",
                        t.joint_attention_dim
                    ),
                });
            }
            let max = te.map_or(0, |te| te.max_sequence_length);
            if max > t.max_prompt_tokens {
                return Err(Mismatch {
                    field: "max_sequence_length",
                    message: format!(
                        "text-encoder max_sequence_length {max} ({uri}), denoiser accepts at most {} prompt \
                         tokens ({anchor_uri})",
                        t.max_prompt_tokens
                    ),
                });
            }
        }
        StageName::Vae => {
            let z = d.vae.as_ref().map_or(0, |v| v.z_dim);
            if z != t.latent_channels {
                return Err(Mismatch {
                    field: "z_dim",
                    message: format!(
                        "vae latent channels {z} ({uri}), denoiser expects {} ({anchor_uri}); start both from the \
                         same model",
                        t.latent_channels
                    ),
                });
            }
        }
        StageName::Denoiser => {}
    }
    if d.snapshot_digest != anchor.snapshot_digest {
        tracing::info!(
            %stage, uri, anchor_uri, model = %d.model_id, denoiser_model = %anchor.model_id,
            "stages come from different snapshots but their geometry fits"
        );
    }
    Ok(())
}

/// The geometry of an accepted denoiser (`anchor`) and VAE.
pub fn geometry(anchor: &StageDescription, vae: &StageDescription) -> Option<Geometry> {
    let t = anchor.transformer.as_ref()?;
    let v = vae.vae.as_ref()?;
    if t.patch_size == 0 || v.scale_factor == 0 || t.latent_channels == 0 {
        return None;
    }
    Some(Geometry {
        latent_channels: t.latent_channels as usize,
        vae_scale_factor: v.scale_factor,
        patch_size: t.patch_size,
        max_pixels: smallest_max_pixels([anchor, vae]),
    })
}

/// The smallest `StageLimits.max_pixels` (`--max-pixels`) of `replicas`, ignoring those that set none;
/// 0 when none does. A request may go to any accepted denoiser and VAE replica (and fail over to any
/// other), so it must fit every one of them.
pub fn smallest_max_pixels<'a>(replicas: impl IntoIterator<Item = &'a StageDescription>) -> u64 {
    replicas
        .into_iter()
        .map(|d| d.limits.as_ref().map_or(0, |l| l.max_pixels))
        .filter(|&p| p > 0)
        .min()
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use qwen_image_proto::v1::{TextEncoderDescription, TransformerDescription, VaeDescription};

    fn denoiser(dim: u32, c: u32) -> StageDescription {
        StageDescription {
            kind: StageKind::Denoiser as i32,
            transformer: Some(TransformerDescription {
                digest: "t".into(),
                latent_channels: c,
                in_channels: 4 * c,
                patch_size: 2,
                joint_attention_dim: dim,
                max_prompt_tokens: 1024,
                max_steps: 1000,
                zero_cond_t: false,
                pipeline_class: String::new(),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn the_smallest_replica_budget_bounds_requests() {
        let limit = |p: u64| StageDescription {
            limits: Some(qwen_image_proto::v1::StageLimits {
                max_pixels: p,
                ..Default::default()
            }),
            ..Default::default()
        };
        let (a, b, none) = (limit(4096), limit(1024), StageDescription::default());
        assert_eq!(smallest_max_pixels([&a, &none, &b]), 1024);
        assert_eq!(smallest_max_pixels([&none, &limit(0)]), 0, "unbounded");
    }

    #[test]
    fn checks_fit_and_names_both_sides() {
        let dn = denoiser(64, 4);
        let te = StageDescription {
            kind: StageKind::TextEncoder as i32,
            text_encoder: Some(TextEncoderDescription {
                digest: "a".into(),
                hidden_size: 32,
                max_sequence_length: 1024,
                default_max_sequence_length: 512,
                vision: false,
            }),
            ..Default::default()
        };
        let e = check_against_denoiser(StageName::TextEncoder, "te:1", &te, "dn:1", &dn)
            .expect_err("mismatch");
        assert_eq!(e.field, "hidden_size");
        assert!(
            e.message
                .starts_with("text-encoder hidden size 32 (te:1), denoiser expects 64"),
            "{}",
            e.message
        );
        assert!(check_kind(StageName::TextEncoder, "te:1", &te).is_ok());
        let e = check_kind(StageName::Vae, "te:1", &te).expect_err("wrong kind");
        assert!(
            e.message.contains("STAGE_KIND_TEXT_ENCODER"),
            "{}",
            e.message
        );
        let vae = StageDescription {
            kind: StageKind::Vae as i32,
            vae: Some(VaeDescription {
                digest: "v".into(),
                z_dim: 4,
                scale_factor: 4,
            }),
            ..Default::default()
        };
        assert!(check_against_denoiser(StageName::Vae, "v:1", &vae, "dn:1", &dn).is_ok());
        let g = geometry(&dn, &vae).expect("geometry");
        assert_eq!((g.size_multiple(), g.default_side_px()), (8, 512));
        assert_eq!(g.latent_hw(80, 48), (12, 20));
        let other = denoiser(64, 16);
        let e = check_against_denoiser(StageName::Vae, "v:1", &vae, "dn:2", &other).expect_err("z");
        assert_eq!(e.field, "z_dim");
        let mut again = denoiser(64, 4);
        again.transformer.as_mut().expect("t").digest = "u".into();
        let e = check_same_component(StageName::Denoiser, "dn:2", &again, "dn:1", &dn)
            .expect_err("digest");
        assert_eq!(e.field, "digest");
    }
}
