//! The text encoder's memory under the largest prompts it accepts: `clients` concurrent `Encode` calls sent
//! straight to one replica (as a peer inside the cluster could), each with 64 prompts of 64 KiB (the
//! validator's limits), truncated to 512 tokens.

use std::time::{Duration, Instant};

use qwen_image_proto::v1::text_encoder_client::TextEncoderClient;
use qwen_image_proto::v1::{EncodeRequest, OverlongPromptPolicy};
use tonic::Request;
use tonic::transport::Channel;

use crate::load::Outcome;

/// Prompts per request and bytes per prompt: the text encoder's limits (`validate::MAX_PROMPTS`,
/// `MAX_PROMPT_BYTES`).
const PROMPTS: usize = 64;
const PROMPT_BYTES: usize = 64 << 10;
const DEADLINE: Duration = Duration::from_secs(900);

fn request(seed: u64) -> EncodeRequest {
    let word = format!("a red stick figure {seed} running ");
    let prompt: String = word.repeat(PROMPT_BYTES / word.len());
    EncodeRequest {
        prompts: vec![prompt; PROMPTS],
        max_sequence_length: 0,
        overlong_policy: OverlongPromptPolicy::Truncate as i32,
        ..Default::default()
    }
}

/// `clients` concurrent calls, one each.
pub async fn encode_storm(url: String, clients: usize) -> anyhow::Result<Vec<Outcome>> {
    let ch = Channel::from_shared(url)?.connect().await?;
    let client = TextEncoderClient::new(ch)
        .max_encoding_message_size(64 << 20)
        .max_decoding_message_size(256 << 20);
    let mut tasks = tokio::task::JoinSet::new();
    for seed in 0..clients as u64 {
        let mut c = client.clone();
        tasks.spawn(async move {
            let started = Instant::now();
            let mut r = Request::new(request(seed));
            r.set_timeout(DEADLINE);
            let result = c
                .encode(r)
                .await
                .map(|_| Vec::new())
                .map_err(|s| (s.code(), s.message().to_string()));
            Outcome {
                seed,
                latency: started.elapsed(),
                result,
            }
        });
    }
    let mut out = Vec::new();
    while let Some(j) = tasks.join_next().await {
        out.push(j?);
    }
    Ok(out)
}
