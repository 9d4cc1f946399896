//! Resident weight bytes of the released 20B transformer and the 7B text encoder in each format, from their
//! parameter counts (the same storage rules as the loader: linear weights in the file's format, everything else
//! in the stage dtype; k-quant rows that are not a multiple of 256 fall back to Q5_0 as `prepare` writes them).

use candle_core::quantized::GgmlDType;
use qwen_image_model::text_encoder::TextConfig;
use qwen_image_model::transformer::TransformerConfig;

/// Parameters of the released transformer (shared/reference/denoiser-and-pipelines.md §1.1: "Total: 1933
/// tensors and 20,430,401,088 parameters").
pub const QWEN_IMAGE_PARAMS: u64 = 20_430_401_088;

/// `(out, in)` of every linear weight, and the count of all other parameters (biases, norm gains).
pub struct Layout {
    pub linears: Vec<(usize, usize)>,
    /// Linears that are embedding tables (looked up by row, kept in the file format like linears).
    pub embeddings: Vec<(usize, usize)>,
    pub other: u64,
}

impl Layout {
    pub fn params(&self) -> u64 {
        let m = |v: &[(usize, usize)]| v.iter().map(|(o, i)| (o * i) as u64).sum::<u64>();
        m(&self.linears) + m(&self.embeddings) + self.other
    }
}

/// The transformer's tensors for `cfg` (names in `transformer.rs`).
pub fn transformer(cfg: &TransformerConfig) -> Layout {
    let d = cfg.inner_dim();
    let j = cfg.joint_attention_dim;
    let hd = cfg.attention_head_dim;
    let mut linears = vec![
        (d, cfg.in_channels), // img_in
        (d, j),               // txt_in
        (d, 256),             // time_text_embed.timestep_embedder.linear_1
        (d, d),               // linear_2
        (2 * d, d),           // norm_out.linear
        (cfg.out_dim(), d),   // proj_out
    ];
    // txt_norm + the biases of img_in, txt_in, linear_1, linear_2, norm_out.linear (2d), proj_out
    let mut other = (j + 6 * d + cfg.out_dim()) as u64;
    for _ in 0..cfg.num_layers {
        linears.extend([(6 * d, d), (6 * d, d)]); // img_mod.1, txt_mod.1
        linears.extend(std::iter::repeat_n((d, d), 8)); // q k v, add_q add_k add_v, to_out, to_add_out
        linears.extend([(4 * d, d), (d, 4 * d), (4 * d, d), (d, 4 * d)]); // img_mlp, txt_mlp
        other += (12 * d + 8 * d + 2 * (4 * d + d) + 4 * hd) as u64; // biases + 4 q/k norms
    }
    Layout {
        linears,
        embeddings: Vec::new(),
        other,
    }
}

/// The text model's tensors for `cfg` (`lm_head` is never loaded).
pub fn text_encoder(cfg: &TextConfig) -> Layout {
    let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
    let kv = cfg.num_kv_heads() * cfg.head_dim();
    let mut linears = Vec::new();
    let mut other = h as u64; // final norm
    for _ in 0..cfg.num_hidden_layers {
        linears.extend([(h, h), (kv, h), (kv, h), (h, h), (i, h), (i, h), (h, i)]);
        other += (h + 2 * kv + 2 * h) as u64; // q/k/v biases + 2 norms
    }
    Layout {
        linears,
        embeddings: vec![(cfg.vocab_size, h)],
        other,
    }
}

/// Storage formats measured by the benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    F32,
    Bf16,
    /// fp8 e4m3fn linears; the text encoder's embedding table as ComfyUI stores it (bf16).
    Fp8,
    Ggml(GgmlDType),
}

fn ggml_bytes(ty: GgmlDType, rows: usize, cols: usize) -> u64 {
    let ty = if cols.is_multiple_of(ty.block_size()) {
        ty
    } else {
        GgmlDType::Q5_0
    };
    (rows * cols / ty.block_size() * ty.type_size()) as u64
}

/// Resident bytes of `layout` in `format` (stage dtype f32, except bf16 for [`Format::Bf16`]).
pub fn bytes(layout: &Layout, format: Format) -> u64 {
    let stage = if format == Format::Bf16 { 2 } else { 4 };
    let dense =
        |v: &[(usize, usize)], b: u64| v.iter().map(|(o, i)| (o * i) as u64 * b).sum::<u64>();
    let lin = match format {
        Format::F32 => dense(&layout.linears, 4),
        Format::Bf16 => dense(&layout.linears, 2),
        Format::Fp8 => dense(&layout.linears, 1),
        Format::Ggml(t) => layout
            .linears
            .iter()
            .map(|(o, i)| ggml_bytes(t, *o, *i))
            .sum(),
    };
    let emb = match format {
        Format::Ggml(t) => layout
            .embeddings
            .iter()
            .map(|(o, i)| ggml_bytes(t, *o, *i))
            .sum(),
        // ComfyUI's fp8 text encoders keep embed_tokens in bf16; the loader keeps it so
        Format::Fp8 => dense(&layout.embeddings, 2),
        _ => dense(&layout.embeddings, stage),
    };
    lin + emb + layout.other * stage
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn released_transformer_parameter_count() {
        assert_eq!(
            transformer(&TransformerConfig::qwen_image()).params(),
            QWEN_IMAGE_PARAMS
        );
    }

    #[test]
    fn text_encoder_parameter_count() {
        // Qwen2.5-VL-7B language model without lm_head: 7,070,619,136 (embeddings 545M + 28 layers)
        let l = text_encoder(&TextConfig::qwen25_vl_7b());
        assert_eq!(l.params(), 7_070_619_136);
    }
}
