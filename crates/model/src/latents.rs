//! Latent layout helpers: 2x2 patch packing (`QwenImagePipeline._pack_latents` / `_unpack_latents`) and the
//! true-CFG combination with diffusers' norm rescale.

use candle_core::{D, Result, Tensor};

/// Packs `[B, C, h, w]`, `[B, 1, C, h, w]` (the pipeline's noise layout) or `[B, C, 1, h, w]` (the VAE's) into
/// `[B, (h/2)(w/2), 4C]`: `packed[b, y·(w/2)+x, c·4 + dy·2 + dx] = lat[b, c, 2y+dy, 2x+dx]`.
pub fn pack(lat: &Tensor) -> Result<Tensor> {
    let lat = match lat.rank() {
        4 => lat.clone(),
        5 => {
            // the pipeline's noise layout [B, 1, C, h, w] or the VAE's [B, C, 1, h, w]
            let (b, d1, d2, h, w) = lat.dims5()?;
            match (d1, d2) {
                (1, c) | (c, 1) => lat.reshape((b, c, h, w))?,
                _ => candle_core::bail!(
                    "pack expects one frame, got shape [{b}, {d1}, {d2}, {h}, {w}]"
                ),
            }
        }
        r => candle_core::bail!("pack expects a rank 4 or 5 latent tensor, got rank {r}"),
    };
    let (b, c, h, w) = lat.dims4()?;
    if h % 2 != 0 || w % 2 != 0 {
        candle_core::bail!("latent height and width must be even to pack 2x2 patches, got {h}x{w}");
    }
    lat.reshape((b, c, h / 2, 2, w / 2, 2))? // [B, C, h/2, 2, w/2, 2]
        .permute((0, 2, 4, 1, 3, 5))? // [B, h/2, w/2, C, 2, 2]
        .reshape((b, (h / 2) * (w / 2), c * 4))
}

/// Inverse of [`pack`]: `[B, (h/2)(w/2), 4C]` → `[B, C, 1, h, w]` (the VAE's 5-D layout).
pub fn unpack(packed: &Tensor, h: usize, w: usize) -> Result<Tensor> {
    let (b, s, c4) = packed.dims3()?;
    if h % 2 != 0 || w % 2 != 0 || s != (h / 2) * (w / 2) || c4 % 4 != 0 {
        candle_core::bail!("cannot unpack [{b}, {s}, {c4}] to a {h}x{w} latent grid");
    }
    let c = c4 / 4;
    packed
        .reshape((b, h / 2, w / 2, c, 2, 2))? // [B, h/2, w/2, C, 2, 2]
        .permute((0, 3, 1, 4, 2, 5))? // [B, C, h/2, 2, w/2, 2]
        .reshape((b, c, 1, h, w))
}

/// True CFG as `QwenImagePipeline.__call__` does it: `comb = u + s·(c - u)`, then
/// `comb · ‖c‖ / ‖comb‖` with L2 norms over the last (packed channel) dimension, per token.
pub fn true_cfg(cond: &Tensor, uncond: &Tensor, scale: f64) -> Result<Tensor> {
    let comb = (uncond + ((cond - uncond)? * scale)?)?;
    let cond_norm = cond.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?;
    let comb_norm = comb.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?;
    comb.broadcast_mul(&cond_norm.broadcast_div(&comb_norm)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn pack_places_channels_as_reference() -> Result<()> {
        // lat[b, c, 2y+dy, 2x+dx] = 1000 c + 100 (2y+dy) + (2x+dx)
        let (b, c, h, w) = (2, 3, 4, 6);
        let mut v = Vec::new();
        for bi in 0..b {
            for ci in 0..c {
                for yi in 0..h {
                    for xi in 0..w {
                        v.push((bi * 10000 + ci * 1000 + yi * 100 + xi) as f32);
                    }
                }
            }
        }
        let lat = Tensor::from_vec(v, (b, c, h, w), &Device::Cpu)?;
        let p = pack(&lat)?;
        assert_eq!(p.dims(), &[2, 6, 12]);
        let pv = p.to_vec3::<f32>()?;
        // token y=1, x=2 -> index 1*3+2 = 5; channel c=2, dy=1, dx=0 -> 2*4+2 = 10
        assert_eq!(pv[1][5][10], (10000 + 2 * 1000 + 3 * 100 + 4) as f32);
        let back = unpack(&p, h, w)?;
        assert_eq!(back.dims(), &[2, 3, 1, 4, 6]);
        let diff = (back.reshape((b, c, h, w))? - &lat)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert_eq!(diff, 0.0);
        Ok(())
    }

    #[test]
    fn pack_unpack_round_trip_random() -> Result<()> {
        for (b, c, h, w) in [(1, 16, 2, 2), (3, 4, 8, 12), (2, 17, 10, 6)] {
            let lat = Tensor::randn(0f32, 1f32, (b, 1, c, h, w), &Device::Cpu)?;
            let p = pack(&lat)?;
            assert_eq!(p.dims(), &[b, (h / 2) * (w / 2), 4 * c]);
            let back = unpack(&p, h, w)?;
            let d = (back.permute((0, 2, 1, 3, 4))? - &lat)?
                .abs()?
                .max_all()?
                .to_scalar::<f32>()?;
            assert_eq!(d, 0.0);
            assert_eq!(
                (pack(&back)? - &p)?.abs()?.max_all()?.to_scalar::<f32>()?,
                0.0
            );
        }
        assert!(pack(&Tensor::zeros((1, 4, 3, 4), DType::F32, &Device::Cpu)?).is_err());
        assert!(unpack(&Tensor::zeros((1, 5, 16), DType::F32, &Device::Cpu)?, 4, 4).is_err());
        Ok(())
    }

    #[test]
    fn true_cfg_keeps_the_cond_norm() -> Result<()> {
        let c = Tensor::new(&[[[3f32, 4.0]]], &Device::Cpu)?;
        let u = Tensor::new(&[[[1f32, 0.0]]], &Device::Cpu)?;
        let v = true_cfg(&c, &u, 4.0)?.to_vec3::<f32>()?;
        // comb = (1,0) + 4·(2,4) = (9,16); |c| = 5; |comb| = sqrt(337)
        let k = 5.0 / 337f32.sqrt();
        assert!((v[0][0][0] - 9.0 * k).abs() < 1e-6 && (v[0][0][1] - 16.0 * k).abs() < 1e-6);
        Ok(())
    }
}
