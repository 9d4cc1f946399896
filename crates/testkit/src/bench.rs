//! What the whole-stack benchmarks (`tools/bench_t2i`, `tools/bench_batch`, `tools/bench_telemetry`)
//! share: the text-to-image request they send (prompt, negative prompt " ", true CFG 4, a seed), timed
//! from the call to its result, and the statistics they print.

use std::time::{Duration, Instant};

use qwen_image_proto::v1::image_generator_client::ImageGeneratorClient;
use qwen_image_proto::v1::{GenerationSettings, TextToImageRequest, generate_event};
use tonic::transport::Channel;

/// The negative prompt every benchmark request sends (as diffusers' examples do).
pub const NEGATIVE_PROMPT: &str = " ";
/// The true-CFG scale of every benchmark request (diffusers' `QwenImagePipeline` example uses 4.0).
pub const TRUE_CFG_SCALE: f32 = 4.0;

/// Prompts of similar length; benchmarks index them by request so that the text encoder's
/// prompt-embedding cache does not serve every request.
pub const PROMPTS: &[&str] = &[
    "A cat holding a sign that says hello world",
    "a red square above a blue circle",
    "a stick figure waving, green background",
    "two yellow triangles next to a purple star",
    "a small house under a large orange sun",
    "a person standing with arms raised, white background",
    "three black dots in a row",
    "a blue circle left of a red square",
];

/// The size and step count of a benchmark's requests.
#[derive(Debug, Clone, Copy)]
pub struct Geometry {
    pub width: u32,
    pub height: u32,
    pub steps: u32,
}

/// A text-to-image request: `prompt`, [`NEGATIVE_PROMPT`], [`TRUE_CFG_SCALE`], `seed`.
pub fn t2i_request(g: Geometry, prompt: &str, seed: u64) -> TextToImageRequest {
    TextToImageRequest {
        settings: Some(GenerationSettings {
            prompt: prompt.into(),
            negative_prompt: Some(NEGATIVE_PROMPT.into()),
            width_px: g.width,
            height_px: g.height,
            steps: g.steps,
            true_cfg_scale: Some(TRUE_CFG_SCALE),
            seed: Some(seed),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A gateway client (connects on first use) that takes results up to 128 MiB.
pub fn gateway_client(url: &str) -> ImageGeneratorClient<Channel> {
    ImageGeneratorClient::new(crate::service::channel(url)).max_decoding_message_size(128 << 20)
}

/// Sends `req` and waits for its result: the wall time from the call to the result, and the first PNG.
pub async fn timed_t2i(
    client: &mut ImageGeneratorClient<Channel>,
    req: TextToImageRequest,
) -> Result<(Duration, Vec<u8>), String> {
    let started = Instant::now();
    let mut stream = client
        .text_to_image(req)
        .await
        .map_err(|s| format!("TextToImage: {s}"))?
        .into_inner();
    while let Some(ev) = stream
        .message()
        .await
        .map_err(|s| format!("TextToImage stream: {s}"))?
    {
        if let Some(generate_event::Event::Result(r)) = ev.event {
            let elapsed = started.elapsed();
            let png = r.png.first().ok_or("a result without a PNG")?;
            return Ok((elapsed, png.to_vec()));
        }
    }
    Err("the TextToImage stream ended without a result".into())
}

/// A PNG's pixels as RGB8 (`width`, `height`, `[h, w, 3]` bytes); other colour types are refused.
pub fn png_rgb8(png_bytes: &[u8]) -> Result<(u32, u32, Vec<u8>), String> {
    let mut reader = png::Decoder::new(std::io::Cursor::new(png_bytes))
        .read_info()
        .map_err(|e| format!("not a PNG: {e}"))?;
    let mut buf = vec![0; reader.output_buffer_size().ok_or("PNG too large")?];
    let info = reader
        .next_frame(&mut buf)
        .map_err(|e| format!("bad PNG data: {e}"))?;
    if info.color_type != png::ColorType::Rgb || info.bit_depth != png::BitDepth::Eight {
        return Err(format!(
            "expected an 8-bit RGB PNG, got {:?} {:?}",
            info.color_type, info.bit_depth
        ));
    }
    buf.truncate(info.buffer_size());
    Ok((info.width, info.height, buf))
}

/// The largest per-channel difference (in levels) between two PNGs of the same size.
pub fn max_level_difference(a: &[u8], b: &[u8]) -> Result<u8, String> {
    let (a, b) = (png_rgb8(a)?, png_rgb8(b)?);
    if (a.0, a.1) != (b.0, b.1) {
        return Err(format!("sizes differ: {}x{} vs {}x{}", a.0, a.1, b.0, b.1));
    }
    Ok(a.2
        .iter()
        .zip(&b.2)
        .map(|(x, y)| x.abs_diff(*y))
        .max()
        .unwrap_or(0))
}

/// The median (the upper one of an even count); NaN for no values.
pub fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// The `q`-quantile (nearest rank) of `v`; zero for no values.
pub fn quantile(v: &[Duration], q: f64) -> Duration {
    let mut v = v.to_vec();
    v.sort();
    if v.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

/// The 1, 5 and 15 minute load averages (`/proc/loadavg`), for the report; "?" where unknown.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "?".into())
}

/// CPU time (user + system, all threads) a process has used so far, from `/proc/PID/stat`; `None` when the
/// process is gone or the file unreadable.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    parse_stat_cpu_seconds(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// `utime + stime` of a `/proc/PID/stat` line in seconds. Fields 14 and 15 count clock ticks of
/// `sysconf(_SC_CLK_TCK)`, which Linux fixes at 100 (`USER_HZ`) for user space on every architecture we
/// build for. The command name (field 2) may hold spaces and parentheses, so fields are counted after the
/// last `)`.
fn parse_stat_cpu_seconds(stat: &str) -> Option<f64> {
    const USER_HZ: f64 = 100.0;
    let rest = &stat[stat.rfind(')')? + 1..];
    // after the name: field 3 (state) is the first, so utime (14) and stime (15) are the 12th and 13th
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime + stime) as f64 / USER_HZ)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_quantiles() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert!(median(&[]).is_nan());
        let ms = |n| Duration::from_millis(n);
        let v: Vec<Duration> = (1..=100).map(ms).collect();
        assert_eq!(quantile(&v, 0.5), ms(50));
        assert_eq!(quantile(&v, 0.99), ms(99));
        assert_eq!(quantile(&v[..1], 0.99), ms(1));
    }

    #[test]
    fn stat_cpu_time_is_read_after_the_command_name() {
        let line =
            "4242 (qwen (odd) name) S 1 4242 4242 0 -1 4194560 9 0 0 0 250 75 0 0 20 0 3 0 1 2 3";
        assert_eq!(parse_stat_cpu_seconds(line), Some(3.25));
        assert_eq!(parse_stat_cpu_seconds("4242 (cut) S 1 2"), None);
        let own = cpu_seconds(std::process::id()).expect("this process's own stat");
        assert!(own >= 0.0);
    }
}
