//! controlnet-aux 0.0.10 `open_pose/body.py` `Body.__call__`: multi-scale inference, map averaging, Gaussian
//! smoothing, peak finding, PAF scoring and limb assembly into people (`candidate`, `subset`), then
//! `format_body_result` → COCO-18 keypoints per person. Every constant below cites its line in body.py.

use candle_core::{Device, Result, Tensor, bail};

use super::cv_resize::{Interp, resize_f32, resize_u8};
use super::gaussian::gaussian_filter;
use super::net::{BodyPoseNet, HEAT_CHANNELS, PAF_CHANNELS};

/// body.py:45 `scale_search = [0.5]` (the 4-scale list on line 44 is commented out in 0.0.10).
pub const SCALE_SEARCH: [f64; 1] = [0.5];
/// body.py:46 `boxsize = 368`.
pub const BOXSIZE: f64 = 368.0;
/// body.py:47 `stride = 8`.
pub const STRIDE: usize = 8;
/// body.py:48 `padValue = 128`.
pub const PAD_VALUE: u8 = 128;
/// body.py:49 `thre1 = 0.1` (peak threshold on the smoothed heat map).
pub const THRE1: f64 = 0.1;
/// body.py:50 `thre2 = 0.05` (PAF score threshold at each sample).
pub const THRE2: f64 = 0.05;
/// body.py:91 `gaussian_filter(map_ori, sigma=3)`.
pub const SIGMA: f64 = 3.0;
/// body.py:123 `mid_num = 10` (PAF samples along a candidate limb).
pub const MID_NUM: usize = 10;
/// body.py:113-115 `limbSeq` (1-based COCO-18 parts).
pub const LIMB_SEQ: [[usize; 2]; 19] = [
    [2, 3],
    [2, 6],
    [3, 4],
    [4, 5],
    [6, 7],
    [7, 8],
    [2, 9],
    [9, 10],
    [10, 11],
    [2, 12],
    [12, 13],
    [13, 14],
    [2, 1],
    [1, 15],
    [15, 17],
    [1, 16],
    [16, 18],
    [3, 17],
    [6, 18],
];
/// body.py:117-119 `mapIdx` (PAF channel = value - 19).
pub const MAP_IDX: [[usize; 2]; 19] = [
    [31, 32],
    [39, 40],
    [33, 34],
    [35, 36],
    [41, 42],
    [43, 44],
    [19, 20],
    [21, 22],
    [23, 24],
    [25, 26],
    [27, 28],
    [29, 30],
    [47, 48],
    [49, 50],
    [53, 54],
    [51, 52],
    [55, 56],
    [37, 38],
    [45, 46],
];

/// One scale's network input: the picture resized (`smart_resize_k`) and padded right/down to a multiple of the
/// stride with `padValue` (`util.padRightDownCorner`).
#[derive(Debug, Clone)]
pub struct Prepared {
    /// `[hp, wp, 3]` interleaved, channel order as given (body.py receives BGR).
    pub padded: Vec<u8>,
    pub hp: usize,
    pub wp: usize,
    /// Size before padding.
    pub hs: usize,
    pub ws: usize,
}

/// `cv2.resize` as `util.smart_resize` chooses it: `INTER_AREA` when `(Ht + Wt) / (Ho + Wo) < 1`, else LANCZOS4.
fn smart_interp(ho: usize, wo: usize, ht: f64, wt: f64) -> Interp {
    if (ht + wt) / ((ho + wo) as f64) < 1.0 {
        Interp::Area
    } else {
        Interp::Lanczos4
    }
}

/// Resize + pad for one scale multiplier (`body.py:57-58`).
pub fn prepare(pixels: &[u8], h: usize, w: usize, multiplier: f64) -> Result<Prepared> {
    // util.smart_resize_k: Ht, Wt = Ho * fy, Wo * fx; cv2.resize(x, (int(Wt), int(Ht)))
    let (ht, wt) = (h as f64 * multiplier, w as f64 * multiplier);
    let (hs, ws) = (ht as usize, wt as usize);
    if hs == 0 || ws == 0 {
        bail!("openpose: the picture ({w}x{h}) is too narrow to detect in");
    }
    let resized = resize_u8(pixels, (h, w, 3), (hs, ws), smart_interp(h, w, ht, wt));
    let pad_down = if hs % STRIDE == 0 {
        0
    } else {
        STRIDE - hs % STRIDE
    };
    let pad_right = if ws % STRIDE == 0 {
        0
    } else {
        STRIDE - ws % STRIDE
    };
    let (hp, wp) = (hs + pad_down, ws + pad_right);
    let mut padded = vec![PAD_VALUE; hp * wp * 3];
    for y in 0..hs {
        padded[y * wp * 3..(y * wp + ws) * 3]
            .copy_from_slice(&resized[y * ws * 3..(y + 1) * ws * 3]);
    }
    Ok(Prepared {
        padded,
        hp,
        wp,
        hs,
        ws,
    })
}

impl Prepared {
    /// body.py:59 `np.float32(padded) / 256 - 0.5`, as `[1, 3, hp, wp]`.
    pub fn to_tensor(&self, device: &Device) -> Result<Tensor> {
        let data: Vec<f32> = self
            .padded
            .iter()
            .map(|&v| v as f32 / 256.0 - 0.5)
            .collect();
        Tensor::from_vec(data, (1, self.hp, self.wp, 3), device)?
            .permute((0, 3, 1, 2))?
            .contiguous()
    }
}

/// Full-size maps, `[h, w, c]` row-major float64 (`heatmap_avg`, `paf_avg`).
#[derive(Debug, Clone)]
pub struct Maps {
    pub h: usize,
    pub w: usize,
    pub heat: Vec<f64>,
    pub paf: Vec<f64>,
}

/// body.py:72-75 / 78-81: one channel of the network output (`[h8, w8]`) → x8 (LANCZOS4), crop the padding,
/// resize to the picture's size.
fn upsample_channel(
    ch: &[f32],
    (h8, w8): (usize, usize),
    p: &Prepared,
    (h, w): (usize, usize),
) -> Vec<f32> {
    let up = resize_f32(ch, (h8, w8), (h8 * STRIDE, w8 * STRIDE), Interp::Lanczos4);
    let mut crop = Vec::with_capacity(p.hs * p.ws);
    for y in 0..p.hs {
        crop.extend_from_slice(&up[y * w8 * STRIDE..y * w8 * STRIDE + p.ws]);
    }
    let interp = smart_interp(p.hs, p.ws, h as f64, w as f64);
    resize_f32(&crop, (p.hs, p.ws), (h, w), interp)
}

/// Adds one scale's network outputs (`paf [1,38,h8,w8]`, `heat [1,19,h8,w8]`) to the averages as body.py:83-84
/// does: `heatmap_avg += heatmap_avg + heatmap / n` (sic: doubles the running sum; with the single scale of 0.0.10
/// that is `heatmap`) and `paf_avg += paf / n`.
pub fn accumulate(
    maps: &mut Maps,
    p: &Prepared,
    paf: &Tensor,
    heat: &Tensor,
    n_scales: usize,
) -> Result<()> {
    let (h, w) = (maps.h, maps.w);
    for (t, channels, is_heat) in [(heat, HEAT_CHANNELS, true), (paf, PAF_CHANNELS, false)] {
        let (_, c, h8, w8) = t.dims4()?;
        if c != channels || h8 * STRIDE != p.hp || w8 * STRIDE != p.wp {
            bail!(
                "openpose: network output {:?} does not fit the {}x{} input",
                t.dims(),
                p.wp,
                p.hp
            );
        }
        let data = t
            .flatten_all()?
            .to_dtype(candle_core::DType::F32)?
            .to_vec1::<f32>()?;
        let avg = if is_heat {
            &mut maps.heat
        } else {
            &mut maps.paf
        };
        for ch in 0..c {
            let m = upsample_channel(&data[ch * h8 * w8..(ch + 1) * h8 * w8], (h8, w8), p, (h, w));
            for (i, v) in m.iter().enumerate() {
                let v = (v / n_scales as f32) as f64;
                let a = &mut avg[i * c + ch];
                *a = if is_heat { *a + *a + v } else { *a + v };
            }
        }
    }
    Ok(())
}

/// `(x, y, score, id)` of a peak; x and y are integers (pixels of the picture).
pub type Peak = [f64; 4];

/// body.py:89-110: per part, peaks of the smoothed map that are >= their 4 neighbours (0 outside) and > thre1,
/// in row-major order; score from the unsmoothed map; ids counted across parts.
pub fn find_peaks(maps: &Maps) -> Vec<Vec<Peak>> {
    let (h, w) = (maps.h, maps.w);
    let mut all = Vec::with_capacity(18);
    let mut counter = 0usize;
    for part in 0..18 {
        let ori: Vec<f64> = (0..h * w)
            .map(|i| maps.heat[i * HEAT_CHANNELS + part])
            .collect();
        let s = gaussian_filter(&ori, h, w, SIGMA);
        let at = |y: isize, x: isize| -> f64 {
            if y < 0 || x < 0 || y >= h as isize || x >= w as isize {
                0.0
            } else {
                s[y as usize * w + x as usize]
            }
        };
        let mut peaks = Vec::new();
        for y in 0..h as isize {
            for x in 0..w as isize {
                let v = at(y, x);
                if v >= at(y - 1, x)
                    && v >= at(y + 1, x)
                    && v >= at(y, x - 1)
                    && v >= at(y, x + 1)
                    && v > THRE1
                {
                    peaks.push([
                        x as f64,
                        y as f64,
                        ori[y as usize * w + x as usize],
                        counter as f64,
                    ]);
                    counter += 1;
                }
            }
        }
        all.push(peaks);
    }
    all
}

/// One accepted limb: `[idA, idB, score, i, j]` (body.py:163).
type Connection = [f64; 5];

/// `np.linspace(a, b, num)`: `i * step + a`, the last value exactly `b`.
fn linspace(a: f64, b: f64, num: usize) -> Vec<f64> {
    let step = (b - a) / (num - 1) as f64;
    (0..num)
        .map(|i| if i == num - 1 { b } else { i as f64 * step + a })
        .collect()
}

/// body.py:125-170: scores every candidate pair of each limb along the PAF and keeps the best disjoint ones.
/// `None` = a limb with no candidates at one end (`special_k`).
fn connect(maps: &Maps, peaks: &[Vec<Peak>]) -> Vec<Option<Vec<Connection>>> {
    let (h, w) = (maps.h, maps.w);
    let paf_at = |y: f64, x: f64, ch: usize| -> f64 {
        // int(round(v)) with numpy's round-half-to-even
        let (yi, xi) = (y.round_ties_even() as usize, x.round_ties_even() as usize);
        maps.paf[(yi.min(h - 1) * w + xi.min(w - 1)) * PAF_CHANNELS + ch]
    };
    let mut all = Vec::with_capacity(MAP_IDX.len());
    for k in 0..MAP_IDX.len() {
        let (cx, cy) = (MAP_IDX[k][0] - 19, MAP_IDX[k][1] - 19);
        let cand_a = &peaks[LIMB_SEQ[k][0] - 1];
        let cand_b = &peaks[LIMB_SEQ[k][1] - 1];
        let (na, nb) = (cand_a.len(), cand_b.len());
        if na == 0 || nb == 0 {
            all.push(None);
            continue;
        }
        let mut candidates: Vec<(usize, usize, f64)> = Vec::new();
        for (i, a) in cand_a.iter().enumerate() {
            for (j, b) in cand_b.iter().enumerate() {
                let (vx, vy) = (b[0] - a[0], b[1] - a[1]);
                let norm = (vx * vx + vy * vy).sqrt().max(0.001);
                let (vx, vy) = (vx / norm, vy / norm);
                let xs = linspace(a[0], b[0], MID_NUM);
                let ys = linspace(a[1], b[1], MID_NUM);
                let mids: Vec<f64> = (0..MID_NUM)
                    .map(|s| paf_at(ys[s], xs[s], cx) * vx + paf_at(ys[s], xs[s], cy) * vy)
                    .collect();
                let mut sum = 0f64;
                for m in &mids {
                    sum += m;
                }
                // body.py:150-151 distance prior: min(0.5 * H / norm - 1, 0)
                let score = sum / MID_NUM as f64 + (0.5 * h as f64 / norm - 1.0).min(0.0);
                let above = mids.iter().filter(|&&m| m > THRE2).count();
                // body.py:152 criterion1: more than 80 % of the samples above thre2; criterion2: score > 0
                if above as f64 > 0.8 * MID_NUM as f64 && score > 0.0 {
                    candidates.push((i, j, score));
                }
            }
        }
        // sorted(..., key=score, reverse=True) is stable
        candidates.sort_by(|x, y| y.2.partial_cmp(&x.2).unwrap_or(std::cmp::Ordering::Equal));
        let mut conn: Vec<Connection> = Vec::new();
        for (i, j, s) in candidates {
            if !conn.iter().any(|c| c[3] == i as f64) && !conn.iter().any(|c| c[4] == j as f64) {
                conn.push([cand_a[i][3], cand_b[j][3], s, i as f64, j as f64]);
                if conn.len() >= na.min(nb) {
                    break;
                }
            }
        }
        all.push(Some(conn));
    }
    all
}

/// The result of `Body.__call__`: `candidate` rows `(x, y, score, id)` and `subset` rows (0-17: candidate index
/// or -1, 18: total score, 19: number of parts).
#[derive(Debug, Clone, PartialEq)]
pub struct BodyEstimate {
    pub candidate: Vec<Peak>,
    pub subset: Vec<[f64; 20]>,
}

/// body.py:172-223: grows people from the accepted limbs, merges disjoint ones, drops those with fewer than 4
/// parts or a mean score below 0.4.
fn assemble(peaks: &[Vec<Peak>], connections: &[Option<Vec<Connection>>]) -> BodyEstimate {
    let candidate: Vec<Peak> = peaks.iter().flatten().copied().collect();
    let mut subset: Vec<[f64; 20]> = Vec::new();
    for (k, conn) in connections.iter().enumerate() {
        let Some(conn) = conn else { continue };
        let (ia, ib) = (LIMB_SEQ[k][0] - 1, LIMB_SEQ[k][1] - 1);
        for c in conn {
            let (part_a, part_b) = (c[0], c[1]);
            let mut found = 0usize;
            let mut idx = [usize::MAX; 2];
            for (j, row) in subset.iter().enumerate() {
                if row[ia] == part_a || row[ib] == part_b {
                    // Python raises IndexError on a third match (subset_idx has two slots); keep the first two
                    if found < 2 {
                        idx[found] = j;
                    }
                    found += 1;
                }
            }
            let found = found.min(2);
            if found == 1 {
                let row = &mut subset[idx[0]];
                if row[ib] != part_b {
                    row[ib] = part_b;
                    row[19] += 1.0;
                    row[18] += candidate[part_b as usize][2] + c[2];
                }
            } else if found == 2 {
                let (j1, j2) = (idx[0], idx[1]);
                let overlap = (0..18).any(|p| subset[j1][p] >= 0.0 && subset[j2][p] >= 0.0);
                if !overlap {
                    let r2 = subset[j2];
                    let r1 = &mut subset[j1];
                    for p in 0..18 {
                        r1[p] += r2[p] + 1.0;
                    }
                    r1[18] += r2[18];
                    r1[19] += r2[19];
                    r1[18] += c[2];
                    subset.remove(j2);
                } else {
                    let row = &mut subset[j1];
                    row[ib] = part_b;
                    row[19] += 1.0;
                    row[18] += candidate[part_b as usize][2] + c[2];
                }
            } else if k < 17 {
                let mut row = [-1.0f64; 20];
                row[ia] = part_a;
                row[ib] = part_b;
                row[19] = 2.0;
                row[18] = candidate[part_a as usize][2] + candidate[part_b as usize][2] + c[2];
                subset.push(row);
            }
        }
    }
    // body.py:221: fewer than 4 parts, or mean score below 0.4
    subset.retain(|r| !(r[19] < 4.0 || r[18] / r[19] < 0.4));
    BodyEstimate { candidate, subset }
}

/// Everything after the network: peaks, limbs, people.
pub fn estimate_from_maps(maps: &Maps) -> BodyEstimate {
    let peaks = find_peaks(maps);
    let connections = connect(maps, &peaks);
    assemble(&peaks, &connections)
}

/// The scale multipliers for a picture `h` pixels high (body.py:51 `x * boxsize / oriImg.shape[0]`).
pub fn multipliers(h: usize) -> Vec<f64> {
    SCALE_SEARCH
        .iter()
        .map(|x| x * BOXSIZE / h as f64)
        .collect()
}

/// `Body.__call__(oriImg)`: `pixels` is `h x w x 3` interleaved in the channel order body.py receives (BGR:
/// `OpenposeDetector.detect_poses` flips RGB first; see [`super::detect_people`]).
pub fn body_call(
    net: &BodyPoseNet,
    pixels: &[u8],
    h: usize,
    w: usize,
    device: &Device,
) -> Result<(BodyEstimate, Maps)> {
    let maps = body_maps(pixels, h, w, |x| net.forward(&x.to_tensor(device)?))?;
    Ok((estimate_from_maps(&maps), maps))
}

/// The averaged full-size maps, with the network given as a closure (`Prepared → (paf, heat)`).
pub fn body_maps(
    pixels: &[u8],
    h: usize,
    w: usize,
    mut net: impl FnMut(&Prepared) -> Result<(Tensor, Tensor)>,
) -> Result<Maps> {
    if pixels.len() != h * w * 3 {
        bail!(
            "openpose: {} bytes is not a {w}x{h} RGB picture",
            pixels.len()
        );
    }
    let mults = multipliers(h);
    let mut maps = Maps {
        h,
        w,
        heat: vec![0.0; h * w * HEAT_CHANNELS],
        paf: vec![0.0; h * w * PAF_CHANNELS],
    };
    for &m in &mults {
        let p = prepare(pixels, h, w, m)?;
        let (paf, heat) = net(&p)?;
        accumulate(&mut maps, &p, &paf, &heat, mults.len())?;
    }
    Ok(maps)
}
