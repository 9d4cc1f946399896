use std::collections::HashMap;
use std::path::PathBuf;

use crate::weights::VarBuilder;

use super::*;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn load(snapshot: &str) -> Result<AutoencoderKLQwenImage> {
    let snap = Snapshot::open(fixtures().join(snapshot))?;
    AutoencoderKLQwenImage::load(&snap, DType::F32, &Device::Cpu)
}

fn refs(dir: &str) -> Result<HashMap<String, Tensor>> {
    candle_core::safetensors::load(
        fixtures().join(dir).join("tensors.safetensors"),
        &Device::Cpu,
    )
}

/// max |a - b| / max |b|
fn rel_err(a: &Tensor, b: &Tensor) -> Result<f64> {
    assert_eq!(a.dims(), b.dims());
    let a = a.to_dtype(DType::F64)?.flatten_all()?;
    let b = b.to_dtype(DType::F64)?.flatten_all()?;
    let diff = (&a - &b)?.abs()?.max(0)?.to_scalar::<f64>()?;
    let scale = b.abs()?.max(0)?.to_scalar::<f64>()?.max(1e-12);
    Ok(diff / scale)
}

/// Encode, sample, normalise, decode and 8-bit output against a diffusers `vae` mode dump.
fn check_vae_dump(snapshot: &str, dump: &str) -> Result<()> {
    let vae = load(snapshot)?;
    let r = refs(dump)?;
    let post = vae.encode(&r["vae.input"])?;
    assert!(
        rel_err(&post.mean, &r["vae.posterior_mean"])? < 1e-4,
        "posterior mean"
    );
    assert!(
        rel_err(&post.logvar, &r["vae.posterior_logvar"])? < 1e-4,
        "posterior logvar"
    );
    let sample = post.sample(&r["vae.sample_eps"])?;
    assert!(
        rel_err(&sample, &r["vae.posterior_sample"])? < 1e-4,
        "posterior sample"
    );
    let norm = vae.normalize(post.mode())?;
    assert!(
        rel_err(&norm, &r["vae.latents_normalized"])? < 1e-4,
        "normalised latents"
    );
    let decoded = vae.decode(&r["vae.posterior_mean"])?;
    assert!(
        rel_err(&decoded.unsqueeze(2)?, &r["vae.decoded"])? < 1e-4,
        "decoded"
    );
    let ours = to_rgb8(&decoded)?.concat();
    let theirs = r["roundtrip_uint8"].flatten_all()?.to_vec1::<u8>()?;
    assert_eq!(ours.len(), theirs.len());
    let worst = ours
        .iter()
        .zip(&theirs)
        .map(|(a, b)| a.abs_diff(*b))
        .max()
        .unwrap_or(0);
    assert!(worst <= 1, "8-bit image differs by {worst} levels");
    Ok(())
}

#[test]
fn parity_tiny_64x64() -> Result<()> {
    check_vae_dump("tiny/snapshot", "tiny/refs/vae_64")
}

#[test]
fn parity_tiny_96x128_non_square() -> Result<()> {
    check_vae_dump("tiny/snapshot", "tiny/refs/vae_96x128")
}

/// 3-level VAE (spatial factor 4), z_dim 8, two res blocks, temperal_downsample [true, false], 40x72 image.
#[test]
fn parity_random_preset_three_levels_z8() -> Result<()> {
    let vae = load("random_vae/snapshot")?;
    assert_eq!(vae.config().scale_factor(), 4);
    assert_eq!(vae.config().z_dim, 8);
    check_vae_dump("random_vae/snapshot", "random_vae/refs/vae_40x72")
}

/// The t2i decode path: unpack → denormalize is bit-exact with the pipeline, decode matches.
#[test]
fn parity_t2i_decode_batch() -> Result<()> {
    let vae = load("tiny/snapshot")?;
    let r = refs("tiny/refs/t2i_batch_64x96")?;
    let z = vae.denormalize(&crate::latents::unpack(&r["latents_final_packed"], 8, 12)?)?;
    let zr = &r["vae.decode.0.in"];
    let a = z.flatten_all()?.to_vec1::<f32>()?;
    let b = zr.flatten_all()?.to_vec1::<f32>()?;
    assert!(
        a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
        "denormalize is not bit-exact"
    );
    let img = vae.decode(zr)?;
    assert!(rel_err(&img.unsqueeze(2)?, &r["vae.decode.0.out"])? < 1e-4);
    Ok(())
}

#[test]
fn chunked_attention_equals_unchunked() -> Result<()> {
    let dev = Device::Cpu;
    let c = 16;
    let mut w = HashMap::new();
    w.insert(
        "norm.gamma".to_string(),
        Tensor::rand(0.5f32, 1.5, (c, 1, 1), &dev)?,
    );
    w.insert(
        "to_qkv.weight".to_string(),
        Tensor::randn(0f32, 0.5, (3 * c, c, 1, 1), &dev)?,
    );
    w.insert(
        "to_qkv.bias".to_string(),
        Tensor::randn(0f32, 0.1, 3 * c, &dev)?,
    );
    w.insert(
        "proj.weight".to_string(),
        Tensor::randn(0f32, 0.5, (c, c, 1, 1), &dev)?,
    );
    w.insert("proj.bias".to_string(), Tensor::randn(0f32, 0.1, c, &dev)?);
    let attn = AttentionBlock::new(c, VarBuilder::from_tensors(w, DType::F32, &dev))?;
    let x = Tensor::randn(0f32, 1.0, (9, 7, c), &dev)?; // 63 tokens
    let full = attn.forward_chunked(&x, Some(63))?;
    for rows in [1, 5, 16, 62] {
        let chunked = attn.forward_chunked(&x, Some(rows))?;
        assert!(
            rel_err(&chunked, &full)? < 1e-6,
            "chunk of {rows} rows differs"
        );
    }
    Ok(())
}

/// The fused CPU kernel and the candle-op fallback compute the same conv for every prologue.
#[test]
fn fused_conv_matches_tensor_ops() -> Result<()> {
    let dev = Device::Cpu;
    let (ci, co) = (6, 5);
    let conv = Conv3x3::from_weights(
        &Tensor::randn(0f32, 0.3, (co, ci, 3, 3), &dev)?,
        &Tensor::randn(0f32, 0.1, co, &dev)?,
    )?;
    let mut w = HashMap::new();
    w.insert(
        "gamma".to_string(),
        Tensor::rand(0.5f32, 1.5, (ci, 1, 1, 1), &dev)?,
    );
    let norm = RmsNorm::new(ci, false, VarBuilder::from_tensors(w, DType::F32, &dev))?;
    let x = Tensor::randn(0f32, 1.0, (11, 7, ci), &dev)?;
    for prologue in [
        Prologue::None,
        Prologue::NormSilu(&norm),
        Prologue::Upsample2x,
    ] {
        let fused = conv.forward_cpu_f32(&x, prologue, None)?;
        let ops = conv.forward_tensor_ops(&x, prologue)?;
        assert!(rel_err(&fused, &ops)? < 1e-5);
        let res = Tensor::randn(0f32, 1.0, ops.dims(), &dev)?;
        let fused = conv.forward_cpu_f32(&x, prologue, Some(&res))?;
        assert!(rel_err(&fused, &(&ops + &res)?)? < 1e-5);
    }
    Ok(())
}

/// Tiled decode matches diffusers' `enable_tiling(64, 64, 48, 48)` output (3 x 4 tiles on 96x160), and plain
/// `decode` does not tile (it matches diffusers' untiled decode, which differs from the tiled one).
#[test]
fn tiled_decode_matches_diffusers_and_is_off_by_default() -> Result<()> {
    let vae = load("tiny/snapshot")?;
    let r = candle_core::safetensors::load(
        fixtures().join("vae_tiled/tiny_96x160.safetensors"),
        &Device::Cpu,
    )?;
    let z = &r["z"];
    let tile = TileConfig {
        sample_min_height: 64,
        sample_min_width: 64,
        sample_stride_height: 48,
        sample_stride_width: 48,
    };
    let tiled = vae.decode_tiled(z, tile)?.unsqueeze(2)?;
    assert!(
        rel_err(&tiled, &r["tiled"])? < 1e-4,
        "tiled decode vs diffusers: {}",
        rel_err(&tiled, &r["tiled"])?
    );
    let untiled = vae.decode(z)?.unsqueeze(2)?;
    assert!(
        rel_err(&untiled, &r["untiled"])? < 1e-4,
        "untiled decode vs diffusers"
    );
    let mean_abs = (&tiled - &untiled)?.abs()?.mean_all()?.to_scalar::<f32>()?;
    assert!(mean_abs > 1e-3, "decode must not tile by default");
    // a latent that fits one default tile falls back to the untiled decode
    let small = z.narrow(3, 0, 8)?.narrow(4, 0, 8)?;
    let a = vae.decode_tiled(&small, TileConfig::default())?;
    assert_eq!(rel_err(&a, &vae.decode(&small)?)?, 0.0);
    Ok(())
}

#[test]
fn bad_shapes_are_errors() -> Result<()> {
    let vae = load("tiny/snapshot")?;
    let dev = Device::Cpu;
    let t = |dims: &[usize]| Tensor::zeros(dims, DType::F32, &dev).expect("zeros");
    assert!(
        vae.decode(&t(&[1, 15, 1, 4, 4])).is_err(),
        "wrong latent channels"
    );
    assert!(vae.decode(&t(&[1, 16, 2, 4, 4])).is_err(), "two frames");
    assert!(vae.decode(&t(&[16, 4, 4])).is_err(), "rank 3");
    assert!(vae.decode(&t(&[1, 16, 0, 4])).is_err(), "empty");
    assert!(vae.encode(&t(&[1, 4, 16, 16])).is_err(), "4-channel image");
    assert!(vae.encode(&t(&[3, 16, 16])).is_err(), "rank 3 image");
    assert!(
        vae.denormalize(&t(&[1, 8, 4, 4])).is_err(),
        "wrong channels to denormalize"
    );
    assert!(
        vae.normalize(&t(&[1, 16, 2, 4, 4])).is_err(),
        "two frames to normalize"
    );
    assert!(
        to_rgb8(&t(&[1, 4, 8, 8])).is_err(),
        "4-channel image to rgb8"
    );
    assert!(
        from_rgb8(&[0u8; 10], 2, 2, &dev).is_err(),
        "wrong byte count"
    );
    let post = vae.encode(&t(&[1, 3, 16, 16]))?;
    assert!(post.sample(&t(&[1, 16, 1, 3, 2])).is_err(), "eps shape");
    assert!(
        vae.decode_tiled(
            &t(&[1, 16, 1, 4, 4]),
            TileConfig {
                sample_min_height: 4,
                ..TileConfig::default()
            }
        )
        .is_err()
    );
    Ok(())
}

#[test]
fn config_defaults_and_unknown_keys() -> Result<()> {
    let cfg: VaeConfig = serde_json::from_str::<VaeConfig>(
        r#"{"_class_name": "AutoencoderKLQwenImage", "something_new": 1}"#,
    )
    .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    assert_eq!(cfg, VaeConfig::default());
    assert_eq!(cfg.scale_factor(), 8);
    assert_eq!(cfg.latents_std[15], 1.9160);
    let cfg: VaeConfig = serde_json::from_str::<VaeConfig>(
        r#"{"dim_mult": [1, 2, 4], "temperal_downsample": [true, false]}"#,
    )
    .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    assert_eq!(cfg.scale_factor(), 4);
    let bad = VaeConfig {
        temperal_downsample: vec![true],
        ..VaeConfig::default()
    };
    assert!(bad.validate().is_err());
    Ok(())
}

#[test]
fn rgb8_round_trip_and_rounding() -> Result<()> {
    let dev = Device::Cpu;
    let bytes: Vec<u8> = (0..2 * 3 * 3).map(|i| (i * 15) as u8).collect();
    let x = from_rgb8(&bytes, 3, 2, &dev)?; // [1, 3, 2, 3]
    assert_eq!(x.dims(), &[1, 3, 2, 3]);
    assert_eq!(to_rgb8(&x)?[0], bytes);
    // x*0.5+0.5 = 0.5/255·k boundaries: numpy rounds half to even; values outside [-1, 1] clamp
    let v = Tensor::from_vec(vec![-2f32, 2.0, 0.0], (1, 3, 1, 1), &dev)?;
    assert_eq!(to_rgb8(&v)?[0], vec![0, 255, 128]);
    Ok(())
}
