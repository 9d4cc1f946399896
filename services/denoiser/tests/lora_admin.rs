//! LoRA adapters on the real denoiser (127.0.0.1:0, tiny snapshot, adapters of `tests/fixtures/lora`): requests
//! name adapters, `LoraAdmin` loads and unloads them at run time within a byte budget (LRU eviction), and
//! requests without adapters keep giving the same bytes while adapters come and go.

use std::time::Duration;

use qwen_image_common::limits::MAX_MESSAGE_BYTES;
use qwen_image_common::stage::{StageDef, StageError};
use qwen_image_denoiser::adapters::LoraSpec;
use qwen_image_denoiser::{Denoiser, SERVICE_NAME, run};
use qwen_image_proto::v1::denoise_event::Event;
use qwen_image_proto::v1::denoiser_client::DenoiserClient;
use qwen_image_proto::v1::lora_admin_client::LoraAdminClient;
use qwen_image_proto::v1::{
    DataType, DenoiseRequest, ListLorasRequest, LoadLoraRequest, LoraRef, Tensor, UnloadLoraRequest,
};
use qwen_image_testkit::service::{InProcess, wait_serving};
use tonic::Code;
use tonic::transport::Channel;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures");
/// Guard against a hung test; never used to wait for something to happen.
const GUARD: Duration = Duration::from_secs(120);

fn adapter(name: &str) -> String {
    format!("{FIXTURES}/lora/adapters/{name}.safetensors")
}

fn tensor(bytes: &[u8], name: &str) -> Tensor {
    let st = safetensors::SafeTensors::deserialize(bytes).expect("safetensors");
    let v = st.tensor(name).expect("tensor in fixture");
    Tensor {
        dtype: DataType::F32 as i32,
        shape: v.shape().iter().map(|&d| d as u64).collect(),
        data: v.data().to_vec().into(),
    }
}

fn request(loras: &[&str]) -> DenoiseRequest {
    let bytes =
        std::fs::read(format!("{FIXTURES}/tiny/refs/t2i_64/tensors.safetensors")).expect("fixture");
    DenoiseRequest {
        prompt_embeds: Some(tensor(&bytes, "prompt_embeds")),
        negative_prompt_embeds: Some(tensor(&bytes, "negative_prompt_embeds")),
        true_cfg_scale: 4.0,
        latents: Some(tensor(&bytes, "rng.0")),
        steps: 2,
        loras: loras
            .iter()
            .map(|n| LoraRef {
                name: n.to_string(),
                scale: None,
            })
            .collect(),
        ..Default::default()
    }
}

/// The final latents' bytes, or the status.
async fn denoise(channel: &Channel, loras: &[&str]) -> Result<Vec<u8>, tonic::Status> {
    let mut c = DenoiserClient::new(channel.clone())
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let run = async {
        let mut stream = c.denoise(request(loras)).await?.into_inner();
        while let Some(ev) = stream.message().await? {
            if let Some(Event::Result(r)) = ev.event {
                return Ok(r.latents.expect("latents").data.to_vec());
            }
        }
        Err(tonic::Status::internal("no result"))
    };
    tokio::time::timeout(GUARD, run).await.expect("in time")
}

async fn names(admin: &mut LoraAdminClient<Channel>) -> Vec<String> {
    admin
        .list_loras(ListLorasRequest {})
        .await
        .expect("list")
        .into_inner()
        .loras
        .into_iter()
        .map(|d| d.name)
        .collect()
}

#[tokio::test]
async fn adapters_load_unload_and_evict_at_run_time_without_touching_base_requests() {
    let mut config = Denoiser::config(format!("{FIXTURES}/tiny/snapshot"));
    config.queue_capacity = 8;
    config.own.loras = vec![LoraSpec {
        name: "peft".into(),
        file: adapter("peft").into(),
    }];
    // f32 factors: peft ~62 KB, kohya ~42 KB, lightning ~58 KB: two fit, three do not
    config.own.lora_budget_mb = 0.12;
    let service = InProcess::<StageError>::start(|l, stop| run(config, l, stop)).await;
    wait_serving(&service.url(), SERVICE_NAME, GUARD)
        .await
        .expect("SERVING in time");
    let ch = service.channel();
    let mut admin = LoraAdminClient::new(ch.clone());

    let base = denoise(&ch, &[]).await.expect("base");
    let with_peft = denoise(&ch, &["peft"]).await.expect("peft");
    assert_ne!(base, with_peft, "the adapter changes the result");
    assert_eq!(names(&mut admin).await, ["peft"]);

    // base requests run while adapters are loaded and unloaded
    let background = {
        let ch = ch.clone();
        tokio::spawn(async move {
            let mut out = Vec::new();
            for _ in 0..4 {
                out.push(denoise(&ch, &[]).await.expect("base in the background"));
            }
            out
        })
    };

    let loaded = admin
        .load_lora(LoadLoraRequest {
            name: "kohya".into(),
            path: adapter("kohya"),
        })
        .await
        .expect("load kohya")
        .into_inner();
    assert!(loaded.evicted.is_empty());
    let d = loaded.lora.expect("description");
    assert!(d.modules > 0 && d.bytes > 0 && !d.has_scheduler);
    let with_kohya = denoise(&ch, &["kohya"]).await.expect("kohya");
    assert_ne!(with_kohya, base);

    // `peft` used last: loading `lightning` evicts `kohya`, the least recently used
    assert_eq!(
        denoise(&ch, &["peft"]).await.expect("peft again"),
        with_peft
    );
    let loaded = admin
        .load_lora(LoadLoraRequest {
            name: "lightning".into(),
            path: adapter("lightning"),
        })
        .await
        .expect("load lightning")
        .into_inner();
    assert_eq!(loaded.evicted, ["kohya"]);
    assert!(loaded.lora.expect("description").has_scheduler);
    assert_eq!(names(&mut admin).await, ["peft", "lightning"]);
    let e = denoise(&ch, &["kohya"]).await.expect_err("evicted");
    assert_eq!(e.code(), Code::NotFound);
    assert!(
        e.message().contains("`peft`, `lightning`") || e.message().contains("`lightning`, `peft`"),
        "{}",
        e.message()
    );

    // unload; a second unload and a load under a taken name are refused, a bad file is INVALID_ARGUMENT
    admin
        .unload_lora(UnloadLoraRequest {
            name: "peft".into(),
        })
        .await
        .expect("unload");
    assert_eq!(
        denoise(&ch, &["peft"]).await.expect_err("gone").code(),
        Code::NotFound
    );
    let e = admin
        .unload_lora(UnloadLoraRequest {
            name: "peft".into(),
        })
        .await
        .expect_err("twice");
    assert_eq!(e.code(), Code::NotFound);
    let e = admin
        .load_lora(LoadLoraRequest {
            name: "lightning".into(),
            path: adapter("kohya"),
        })
        .await
        .expect_err("taken");
    assert_eq!(e.code(), Code::FailedPrecondition);
    let e = admin
        .load_lora(LoadLoraRequest {
            name: "snapshot".into(),
            path: format!(
                "{FIXTURES}/tiny/snapshot/transformer/diffusion_pytorch_model.safetensors"
            ),
        })
        .await
        .expect_err("not a LoRA");
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");

    for (i, b) in background
        .await
        .expect("background")
        .into_iter()
        .enumerate()
    {
        assert_eq!(b, base, "background base request {i} changed");
    }
    assert_eq!(denoise(&ch, &[]).await.expect("base after"), base);
    drop(ch);
    drop(admin);
    assert!(service.stop().await.is_ok());
}
