//! The gateway against in-process fake stages (real gRPC on 127.0.0.1:0): the wiring, noise, retries,
//! validation, cancellation and deadlines, without any model.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use qwen_image_common::randn::TorchCpuGenerator;
use qwen_image_common::tensor;
use qwen_image_gateway::{GatewayConfig, GatewayError, REQUEST_ID_KEY};
use qwen_image_proto::v1::denoiser_server::{Denoiser, DenoiserServer};
use qwen_image_proto::v1::image_generator_client::ImageGeneratorClient;
use qwen_image_proto::v1::stage_info_server::{StageInfo, StageInfoServer};
use qwen_image_proto::v1::text_encoder_server::{TextEncoder, TextEncoderServer};
use qwen_image_proto::v1::vae_server::{Vae, VaeServer};
use qwen_image_proto::v1::*;
use qwen_image_testkit::http::request as http;
use qwen_image_testkit::service::{InProcess, health};
use tokio::net::TcpListener;
use tokio::sync::{Notify, mpsc};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Code, Request, Response, Status};
use tonic_health::pb::health_check_response::ServingStatus;

/// Upper bound for anything the tests wait on (a failure guard, not synchronisation).
const GUARD: Duration = Duration::from_secs(20);
const D: usize = 8;

#[derive(Default)]
struct Counters {
    encodes: AtomicUsize,
    denoises: AtomicUsize,
    decodes: AtomicUsize,
    /// Denoise streams that ended because the gateway went away.
    denoise_cancelled: AtomicUsize,
    cancelled: Notify,
    /// The latents of the last denoise request.
    last_latents: std::sync::Mutex<Option<Tensor>>,
    last_has_negative: std::sync::Mutex<Option<bool>>,
}

#[derive(Clone)]
struct Fake {
    c: Arc<Counters>,
    /// Width of the prompt embeddings the fake text encoder says it makes (the denoiser expects `D`).
    hidden_size: u32,
    /// Denoise answers UNAVAILABLE without streaming.
    denoise_unavailable: bool,
    /// Denoise sends step 1 and then waits for the caller to go away.
    denoise_hangs: bool,
    /// The `_class_name` the fake denoiser describes (`QwenImageEditPlusPipeline`: an Edit model).
    pipeline_class: &'static str,
}

#[tonic::async_trait]
impl TextEncoder for Fake {
    async fn encode(
        &self,
        req: Request<EncodeRequest>,
    ) -> Result<Response<EncodeResponse>, Status> {
        self.c.encodes.fetch_add(1, Ordering::SeqCst);
        let prompts = req.into_inner().prompts;
        let l = prompts[0].chars().count().max(1);
        Ok(Response::new(EncodeResponse {
            prompt_embeds: Some(tensor::from_f32(&[1, l, D], &vec![0.25; l * D])),
            prompt_embeds_mask: Some(tensor::from_u8(&[1, l], vec![1; l])),
            mask_all_ones: true,
            token_counts: vec![l as u32],
            truncated: vec![false],
            model_id: "fake-model".into(),
            from_cache: vec![false],
        }))
    }
}

#[tonic::async_trait]
impl Denoiser for Fake {
    type DenoiseStream = ReceiverStream<Result<DenoiseEvent, Status>>;
    async fn denoise(
        &self,
        req: Request<DenoiseRequest>,
    ) -> Result<Response<Self::DenoiseStream>, Status> {
        self.c.denoises.fetch_add(1, Ordering::SeqCst);
        if self.denoise_unavailable {
            return Err(Status::unavailable("fake replica down"));
        }
        let r = req.into_inner();
        let latents = r
            .latents
            .ok_or_else(|| Status::invalid_argument("latents"))?;
        *self.c.last_latents.lock().expect("lock") = Some(latents.clone());
        *self.c.last_has_negative.lock().expect("lock") = Some(r.negative_prompt_embeds.is_some());
        let (tx, rx) = mpsc::channel(4);
        let (c, hangs, steps) = (self.c.clone(), self.denoise_hangs, r.steps);
        tokio::spawn(async move {
            for step in 1..=steps {
                let ev = DenoiseProgress {
                    step,
                    total_steps: steps,
                    ..Default::default()
                };
                let ev = DenoiseEvent {
                    event: Some(denoise_event::Event::Progress(ev)),
                };
                if tx.send(Ok(ev)).await.is_err() {
                    return;
                }
                if hangs {
                    tx.closed().await;
                    c.denoise_cancelled.fetch_add(1, Ordering::SeqCst);
                    c.cancelled.notify_one();
                    return;
                }
            }
            let mut out = latents;
            // [B, 1, C, h, w] -> [B, C, 1, h, w] is the same bytes for a single frame.
            out.shape = vec![out.shape[0], out.shape[2], 1, out.shape[3], out.shape[4]];
            let res = DenoiseResult {
                latents: Some(out),
                sigmas: vec![],
                elapsed_ms: 1,
            };
            let _ = tx
                .send(Ok(DenoiseEvent {
                    event: Some(denoise_event::Event::Result(res)),
                }))
                .await;
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

#[tonic::async_trait]
impl Vae for Fake {
    async fn decode(
        &self,
        req: Request<DecodeRequest>,
    ) -> Result<Response<DecodeResponse>, Status> {
        self.c.decodes.fetch_add(1, Ordering::SeqCst);
        let t = req
            .into_inner()
            .latents
            .ok_or_else(|| Status::invalid_argument("latents"))?;
        let (b, h, w) = (
            t.shape[0] as usize,
            t.shape[3] as u32 * 8,
            t.shape[4] as u32 * 8,
        );
        let images = (0..b)
            .map(|i| Image {
                width_px: w,
                height_px: h,
                rgb8: Bytes::from(vec![i as u8 * 40; (w * h * 3) as usize]),
            })
            .collect();
        Ok(Response::new(DecodeResponse {
            images,
            decoded: None,
        }))
    }
    async fn encode(
        &self,
        _req: Request<EncodeImageRequest>,
    ) -> Result<Response<EncodeImageResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
}

/// The fake's description of itself as `kind`: text hidden size `hidden_size`, transformer D wide with 16
/// latent channels, a VAE with z_dim 16 and scale factor 8.
struct Describe {
    kind: StageKind,
    hidden_size: u32,
    pipeline_class: &'static str,
}

#[tonic::async_trait]
impl StageInfo for Describe {
    async fn describe(
        &self,
        _req: Request<DescribeRequest>,
    ) -> Result<Response<StageDescription>, Status> {
        let mut d = StageDescription {
            kind: self.kind as i32,
            model_id: "fake-model".into(),
            ..Default::default()
        };
        match self.kind {
            StageKind::TextEncoder => {
                d.text_encoder = Some(TextEncoderDescription {
                    digest: "te".into(),
                    hidden_size: self.hidden_size,
                    max_sequence_length: 1024,
                    default_max_sequence_length: 512,
                    vision: false,
                })
            }
            StageKind::Denoiser => {
                d.transformer = Some(TransformerDescription {
                    digest: "dn".into(),
                    latent_channels: 16,
                    in_channels: 64,
                    patch_size: 2,
                    joint_attention_dim: D as u32,
                    max_prompt_tokens: 1024,
                    max_steps: 1000,
                    zero_cond_t: false,
                    pipeline_class: self.pipeline_class.into(),
                })
            }
            _ => {
                d.vae = Some(VaeDescription {
                    digest: "vae".into(),
                    z_dim: 16,
                    scale_factor: 8,
                })
            }
        }
        Ok(Response::new(d))
    }
}

/// Serves the fake as the stage `kind` (its service, health and `StageInfo`); returns its URL.
async fn serve_as(fake: Fake, kind: StageKind) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    let describe = StageInfoServer::new(Describe {
        kind,
        hidden_size: fake.hidden_size,
        pipeline_class: fake.pipeline_class,
    });
    let router = tonic::transport::Server::builder()
        .add_service(health)
        .add_service(describe);
    let router = match kind {
        StageKind::TextEncoder => router.add_service(TextEncoderServer::new(fake)),
        StageKind::Denoiser => router.add_service(DenoiserServer::new(fake)),
        _ => router.add_service(VaeServer::new(fake)),
    };
    tokio::spawn(async move {
        let _keep = reporter;
        router
            .serve_with_incoming(TcpListenerStream::new(listener))
            .await
    });
    format!("http://{addr}")
}

/// The fake as the three stages: (text encoder, denoiser, VAE) URLs.
async fn serve_fake(fake: Fake) -> (String, String, String) {
    (
        serve_as(fake.clone(), StageKind::TextEncoder).await,
        serve_as(fake.clone(), StageKind::Denoiser).await,
        serve_as(fake, StageKind::Vae).await,
    )
}

/// A URL where nothing listens (bound, then closed).
async fn dead_url() -> String {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    format!("http://{}", l.local_addr().expect("addr"))
}

struct Gateway {
    client: ImageGeneratorClient<tonic::transport::Channel>,
    service: InProcess<GatewayError>,
}

/// The gateway in this process, not yet waited for.
async fn start_gateway_unready(config: GatewayConfig) -> Gateway {
    let service = InProcess::start(|l, stop| qwen_image_gateway::run(config, l, stop)).await;
    let client = ImageGeneratorClient::new(service.channel()).max_decoding_message_size(64 << 20);
    Gateway { client, service }
}

async fn start_gateway(config: GatewayConfig) -> Gateway {
    let gw = start_gateway_unready(config).await;
    qwen_image_testkit::service::wait_serving(&gw.service.url(), "", GUARD)
        .await
        .expect("gateway SERVING");
    gw
}

fn config(te: &str, dn: &[String], vae: &str) -> GatewayConfig {
    let mut c = GatewayConfig::new(te, "unused", vae);
    c.denoiser = dn.to_vec();
    c.health_interval = Duration::from_millis(50);
    c
}

fn fake(c: &Arc<Counters>) -> Fake {
    Fake {
        c: c.clone(),
        hidden_size: D as u32,
        denoise_unavailable: false,
        denoise_hangs: false,
        pipeline_class: "",
    }
}

fn settings() -> GenerationSettings {
    GenerationSettings {
        prompt: "A cat holding a sign that says hello world".into(),
        negative_prompt: Some(" ".into()),
        width_px: 64,
        height_px: 48,
        steps: 3,
        true_cfg_scale: Some(4.0),
        seed: Some(0),
        ..Default::default()
    }
}

fn request() -> TextToImageRequest {
    with(settings())
}

fn with(settings: GenerationSettings) -> TextToImageRequest {
    TextToImageRequest {
        settings: Some(settings),
        initial_latents: None,
    }
}

/// The text chunks (tEXt and iTXt) of a PNG.
fn text_chunks(png_bytes: &[u8]) -> Vec<(String, String)> {
    let reader = png::Decoder::new(std::io::Cursor::new(png_bytes))
        .read_info()
        .expect("png");
    let info = reader.info();
    let mut v: Vec<(String, String)> = info
        .uncompressed_latin1_text
        .iter()
        .map(|c| (c.keyword.clone(), c.text.clone()))
        .collect();
    for c in &info.utf8_text {
        v.push((c.keyword.clone(), c.get_text().expect("utf-8")));
    }
    v
}

/// Collects the events of one call: (progress events, result).
async fn collect(
    client: &mut ImageGeneratorClient<tonic::transport::Channel>,
    req: TextToImageRequest,
) -> Result<(Vec<GenerateProgress>, GenerateResult, String), Status> {
    let resp = client.text_to_image(req).await?;
    let id = resp
        .metadata()
        .get(REQUEST_ID_KEY)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let mut stream = resp.into_inner();
    let mut progress = Vec::new();
    while let Some(ev) = stream.message().await? {
        match ev.event {
            Some(generate_event::Event::Progress(p)) => progress.push(p),
            Some(generate_event::Event::Result(r)) => return Ok((progress, r, id)),
            None => {}
        }
    }
    Err(Status::internal("no result"))
}

#[tokio::test]
async fn text_to_image_end_to_end_over_fakes() {
    let c = Arc::new(Counters::default());
    let (te, dn, vae) = serve_fake(fake(&c)).await;
    let mut gw = start_gateway(config(&te, &[dn], &vae)).await;
    let (progress, result, id) = collect(&mut gw.client, request()).await.expect("generates");

    // Noise is torch.randn([1, 1, 16, 6, 8]) from manual_seed(0), row-major.
    let sent = c
        .last_latents
        .lock()
        .expect("lock")
        .clone()
        .expect("denoise called");
    assert_eq!(sent.shape, vec![1, 1, 16, 6, 8]);
    let sent = tensor::to_f32(&sent, "l", &[DataType::F32], &[5])
        .expect("f32")
        .data;
    assert_eq!(
        sent,
        TorchCpuGenerator::new(0)
            .randn(16 * 6 * 8)
            .expect("n >= 16")
    );
    assert_eq!(
        *c.last_has_negative.lock().expect("lock"),
        Some(true),
        "CFG sends negative embeds"
    );
    assert_eq!(
        c.encodes.load(Ordering::SeqCst),
        2,
        "prompt and negative prompt"
    );

    let stages: Vec<i32> = progress.iter().map(|p| p.stage).collect();
    assert_eq!(stages.first(), Some(&(Stage::EncodePrompt as i32)));
    assert_eq!(stages.last(), Some(&(Stage::Decode as i32)));
    let steps: Vec<(u32, u32)> = progress
        .iter()
        .filter(|p| p.stage == Stage::Denoise as i32)
        .map(|p| (p.step, p.total_steps))
        .collect();
    assert_eq!(steps, vec![(1, 3), (2, 3), (3, 3)]);

    assert_eq!(
        (result.width_px, result.height_px, result.seed),
        (64, 48, 0)
    );
    assert_eq!(result.request_id, id);
    assert_eq!(id.len(), 36);
    assert_eq!(result.png.len(), 1);
    let params = result.parameters.expect("echoed parameters");
    assert_eq!(params.steps, 3);
    let chunks = text_chunks(&result.png[0]);
    let get = |k: &str| {
        chunks
            .iter()
            .find(|(kk, _)| kk == k)
            .map(|(_, v)| v.clone())
    };
    assert_eq!(get("model").as_deref(), Some("fake-model"));
    assert_eq!(get("seed").as_deref(), Some("0"));
    assert_eq!(get("width").as_deref(), Some("64"));
    assert_eq!(get("request_id").as_deref(), Some(id.as_str()));

    // No negative prompt: no CFG, one encode, and a random seed is reported back.
    let before = c.encodes.load(Ordering::SeqCst);
    let req = with(GenerationSettings {
        negative_prompt: None,
        seed: None,
        num_images: 2,
        ..settings()
    });
    let (_, result, _) = collect(&mut gw.client, req).await.expect("generates");
    assert_eq!(c.encodes.load(Ordering::SeqCst) - before, 1);
    assert_eq!(*c.last_has_negative.lock().expect("lock"), Some(false));
    assert_eq!(result.png.len(), 2);
    let sent = c
        .last_latents
        .lock()
        .expect("lock")
        .clone()
        .expect("denoise called");
    let sent = tensor::to_f32(&sent, "l", &[DataType::F32], &[5])
        .expect("f32")
        .data;
    assert_eq!(
        sent,
        TorchCpuGenerator::new(result.seed)
            .randn(2 * 16 * 6 * 8)
            .expect("n >= 16")
    );
}

#[tokio::test]
async fn bad_inputs_are_invalid_argument_and_the_gateway_stays_healthy() {
    let c = Arc::new(Counters::default());
    let (te, dn, vae) = serve_fake(fake(&c)).await;
    let mut gw = start_gateway(config(&te, &[dn], &vae)).await;
    let bad_latents = tensor::from_f32(&[1, 16, 1, 4, 4], &[0.0; 256]);
    let cases = [
        with(GenerationSettings {
            prompt: String::new(),
            ..settings()
        }),
        with(GenerationSettings {
            width_px: 100,
            ..settings()
        }),
        with(GenerationSettings {
            steps: 1001,
            ..settings()
        }),
        with(GenerationSettings {
            true_cfg_scale: Some(f32::NAN),
            ..settings()
        }),
        // huge but finite: would overflow the guided velocity
        with(GenerationSettings {
            true_cfg_scale: Some(3.4e38),
            ..settings()
        }),
        TextToImageRequest {
            initial_latents: Some(bad_latents),
            ..request()
        },
    ];
    for req in cases {
        let e = gw.client.text_to_image(req).await.expect_err("rejected");
        assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
        assert!(e.metadata().get(REQUEST_ID_KEY).is_some());
    }
    // A JPEG cut in half (the image crate alone would fill the rest with grey).
    let mut jpeg = std::io::Cursor::new(Vec::new());
    image::DynamicImage::ImageRgb8(image::RgbImage::from_fn(64, 64, |x, y| {
        image::Rgb([(x * 4) as u8, (y * 4) as u8, 90])
    }))
    .write_to(&mut jpeg, image::ImageFormat::Jpeg)
    .expect("encode");
    let mut cut = jpeg.into_inner();
    cut.truncate(cut.len() / 2);
    let e = gw
        .client
        .img2_img(Img2ImgRequest {
            settings: Some(settings()),
            image: cut.into(),
            strength: Some(0.6),
        })
        .await
        .expect_err("rejected");
    assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
    assert!(
        e.message().contains("cut or corrupt JPEG"),
        "{}",
        e.message()
    );
    // A picture above the per-picture limit, then a message above the public limit (sized to the largest
    // legal request, below the stages' 128 MiB): both refused before any stage is called.
    let mut big =
        ImageGeneratorClient::new(gw.service.channel()).max_encoding_message_size(usize::MAX);
    let e = big
        .img2_img(Img2ImgRequest {
            settings: Some(settings()),
            image: vec![0x89; (32 << 20) + 1].into(),
            strength: Some(0.6),
        })
        .await
        .expect_err("rejected");
    assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
    assert!(e.message().contains("at most 32 MiB"), "{}", e.message());
    let e = big.edit(oversized_edit(None)).await.expect_err("rejected");
    assert_eq!(e.code(), Code::OutOfRange, "{}", e.message());
    assert_eq!(
        c.encodes.load(Ordering::SeqCst),
        0,
        "nothing reached the stages"
    );
    let h = health(&gw.service.url(), "").await.expect("health");
    assert_eq!(h, ServingStatus::Serving as i32);
    collect(&mut gw.client, request())
        .await
        .expect("still generates");
}

#[tokio::test]
async fn retries_the_denoiser_on_another_replica() {
    let c = Arc::new(Counters::default());
    let down = Arc::new(Counters::default());
    let (te, good, vae) = serve_fake(fake(&c)).await;
    let (_, refusing, _) = serve_fake(Fake {
        c: down.clone(),
        hidden_size: D as u32,
        denoise_unavailable: true,
        denoise_hangs: false,
        pipeline_class: "",
    })
    .await;
    let dead = dead_url().await;
    let denoisers = vec![refusing.clone(), dead, good.clone()];
    let mut gw = start_gateway(config(&te, &denoisers, &vae)).await;
    for _ in 0..3 {
        collect(&mut gw.client, request())
            .await
            .expect("served by the good replica");
    }
    assert_eq!(c.denoises.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn all_denoisers_down_is_unavailable() {
    let c = Arc::new(Counters::default());
    let (te, _, vae) = serve_fake(fake(&c)).await;
    let (_, refusing, _) = serve_fake(Fake {
        c: c.clone(),
        hidden_size: D as u32,
        denoise_unavailable: true,
        denoise_hangs: false,
        pipeline_class: "",
    })
    .await;
    let mut gw = start_gateway(config(&te, &[refusing], &vae)).await;
    let e = collect(&mut gw.client, request())
        .await
        .expect_err("no denoiser");
    assert_eq!(e.code(), Code::Unavailable, "{}", e.message());
}

/// Reads events until the first denoising step arrives.
async fn until_denoising(stream: &mut tonic::Streaming<GenerateEvent>) {
    tokio::time::timeout(GUARD, async {
        while let Some(ev) = stream.message().await.expect("events") {
            if let Some(generate_event::Event::Progress(p)) = ev.event
                && p.stage == Stage::Denoise as i32
            {
                return;
            }
        }
    })
    .await
    .expect("a denoise step");
}

#[tokio::test]
async fn dropping_the_stream_cancels_the_denoiser() {
    let c = Arc::new(Counters::default());
    let (te, dn, vae) = serve_fake(Fake {
        denoise_hangs: true,
        ..fake(&c)
    })
    .await;
    let mut gw = start_gateway(config(&te, &[dn], &vae)).await;
    let mut stream = gw
        .client
        .text_to_image(request())
        .await
        .expect("accepted")
        .into_inner();
    // Read until the first denoising step arrives, then hang up.
    until_denoising(&mut stream).await;
    let cancelled = c.cancelled.notified();
    drop(stream);
    tokio::time::timeout(GUARD, cancelled)
        .await
        .expect("the denoiser saw the cancellation");
    assert_eq!(c.denoise_cancelled.load(Ordering::SeqCst), 1);
}

/// An Edit message above the public limit: OUT_OF_RANGE once the gateway has read it.
fn oversized_edit(key: Option<&str>) -> Request<EditRequest> {
    with_key(
        EditRequest {
            settings: Some(settings()),
            images: vec![vec![0x89; 35 << 20].into(); 3],
        },
        key,
    )
}

#[tokio::test]
async fn a_full_gateway_and_a_wrong_key_refuse_a_call_before_reading_its_message() {
    let c = Arc::new(Counters::default());
    let (te, dn, vae) = serve_fake(Fake {
        denoise_hangs: true,
        ..fake(&c)
    })
    .await;
    let mut cfg = config(&te, &[dn], &vae);
    cfg.max_queued = 1;
    cfg.api_keys = Some(Arc::new(
        qwen_image_gateway::auth::ApiKeys::parse(KEY).expect("keys"),
    ));
    let mut gw = start_gateway(cfg).await;
    let mut big =
        ImageGeneratorClient::new(gw.service.channel()).max_encoding_message_size(usize::MAX);
    // A wrong key is refused before the message is read (reading it would give OUT_OF_RANGE).
    let e = big
        .edit(oversized_edit(Some("sk-wrong-0123456789abcdef")))
        .await
        .expect_err("refused");
    assert_eq!(e.code(), Code::Unauthenticated, "{}", e.message());
    assert!(e.metadata().get(REQUEST_ID_KEY).is_some());
    // The one place is taken by a request hanging in the denoiser.
    let mut stream = gw
        .client
        .text_to_image(with_key(request(), Some(KEY)))
        .await
        .expect("accepted")
        .into_inner();
    until_denoising(&mut stream).await;
    let e = big.edit(oversized_edit(Some(KEY))).await.expect_err("full");
    assert_eq!(e.code(), Code::ResourceExhausted, "{}", e.message());
    assert!(qwen_image_common::status::retry_after(&e).is_some());
    // ListModels and health take no place.
    gw.client
        .list_models(with_key(ListModelsRequest {}, Some(KEY)))
        .await
        .expect("models listed while full");
    let cancelled = c.cancelled.notified();
    drop(stream);
    tokio::time::timeout(GUARD, cancelled)
        .await
        .expect("the denoiser saw the cancellation");
    // Once the place is free the same call is read, and refused for its size.
    let e = tokio::time::timeout(GUARD, async {
        loop {
            let e = big
                .edit(oversized_edit(Some(KEY)))
                .await
                .expect_err("refused");
            if e.code() != Code::ResourceExhausted {
                return e;
            }
            // The place is freed as the cancelled flow unwinds, just after the denoiser call ends.
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the place is freed");
    assert_eq!(e.code(), Code::OutOfRange, "{}", e.message());
}

#[tokio::test]
async fn the_deadline_ends_the_request_and_the_denoiser_call() {
    let c = Arc::new(Counters::default());
    let (te, dn, vae) = serve_fake(Fake {
        denoise_hangs: true,
        ..fake(&c)
    })
    .await;
    let mut gw = start_gateway(config(&te, &[dn], &vae)).await;
    let cancelled = c.cancelled.notified();
    let mut req = Request::new(request());
    req.set_timeout(Duration::from_millis(300));
    let e = tokio::time::timeout(GUARD, async {
        let mut stream = gw.client.text_to_image(req).await?.into_inner();
        while stream.message().await?.is_some() {}
        Ok::<(), Status>(())
    })
    .await
    .expect("ends")
    .expect_err("deadline");
    assert!(
        matches!(e.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{e:?}"
    );
    tokio::time::timeout(GUARD, cancelled)
        .await
        .expect("the denoiser saw the cancellation");
}

/// Stages that do not serve one model: the gateway reads every replica's description, refuses the text
/// encoder whose embeddings do not fit the denoiser, never turns SERVING, and a request gets
/// FAILED_PRECONDITION naming both stages and the field; nothing reaches the stages.
#[tokio::test]
async fn stages_of_different_models_are_refused_with_the_mismatch_named() {
    let c = Arc::new(Counters::default());
    let (_, dn, vae) = serve_fake(fake(&c)).await;
    let te = serve_as(
        Fake {
            hidden_size: 2 * D as u32,
            ..fake(&c)
        },
        StageKind::TextEncoder,
    )
    .await;
    let mut gw = start_gateway_unready(config(&te, &[dn], &vae)).await;
    let e = collect(&mut gw.client, request())
        .await
        .expect_err("refused");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    let want = format!(
        "text-encoder hidden size {} ({te}), denoiser expects {D}",
        2 * D
    );
    assert!(e.message().contains(&want), "{}", e.message());
    assert_eq!(
        health(&gw.service.url(), "").await.expect("health"),
        ServingStatus::NotServing as i32
    );
    assert_eq!(
        c.encodes.load(Ordering::SeqCst),
        0,
        "nothing reached the stages"
    );
}

/// A stage configured at the wrong place (the VAE given as the text encoder) is refused by kind.
#[tokio::test]
async fn a_replica_of_the_wrong_kind_is_refused() {
    let c = Arc::new(Counters::default());
    let (_, dn, vae) = serve_fake(fake(&c)).await;
    let mut gw = start_gateway_unready(config(&vae, &[dn], &vae)).await;
    let e = collect(&mut gw.client, request())
        .await
        .expect_err("refused");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("STAGE_KIND_VAE"), "{}", e.message());
}

const KEY: &str = "sk-test-0123456789abcdef";

fn with_key<T>(msg: T, key: Option<&str>) -> Request<T> {
    let mut r = Request::new(msg);
    if let Some(k) = key {
        r.metadata_mut().insert(
            "authorization",
            format!("Bearer {k}").parse().expect("ascii"),
        );
    }
    r
}

#[tokio::test]
async fn api_keys_guard_the_api_but_not_health_or_reflection() {
    let c = Arc::new(Counters::default());
    let (te, dn, vae) = serve_fake(fake(&c)).await;
    let mut cfg = config(&te, std::slice::from_ref(&dn), &vae);
    cfg.api_keys = Some(Arc::new(
        qwen_image_gateway::auth::ApiKeys::parse(KEY).expect("keys"),
    ));
    // start_gateway waits for SERVING through grpc.health without a key.
    let mut gw = start_gateway(cfg).await;
    for key in [None, Some("sk-wrong-0123456789abcdef")] {
        let e = gw
            .client
            .text_to_image(with_key(request(), key))
            .await
            .expect_err("refused");
        assert_eq!(e.code(), Code::Unauthenticated, "{key:?}");
        assert!(!e.message().contains(KEY));
    }
    assert_eq!(c.encodes.load(Ordering::SeqCst), 0, "nothing ran");
    let mut stream = gw
        .client
        .text_to_image(with_key(request(), Some(KEY)))
        .await
        .expect("accepted")
        .into_inner();
    let mut done = false;
    while let Some(ev) = stream.message().await.expect("stream") {
        done |= matches!(ev.event, Some(generate_event::Event::Result(_)));
    }
    assert!(done, "a result with the right key");
    let services = reflected_services(&gw.service.url())
        .await
        .expect("reflection without a key");
    assert!(
        services.iter().any(|s| s == "qwen_image.v1.ImageGenerator"),
        "{services:?}"
    );

    let mut cfg = config(&te, &[dn], &vae);
    cfg.reflection = false;
    let gw = start_gateway(cfg).await;
    let e = reflected_services(&gw.service.url())
        .await
        .expect_err("--no-reflection");
    assert_eq!(e.code(), Code::Unimplemented, "{e:?}");
}

/// The services gRPC reflection (v1) lists.
async fn reflected_services(url: &str) -> Result<Vec<String>, tonic::Status> {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let mut c = ServerReflectionClient::new(qwen_image_testkit::service::channel(url));
    let ask = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = c
        .server_reflection_info(tokio_stream::iter([ask]))
        .await?
        .into_inner();
    match answers.message().await?.and_then(|m| m.message_response) {
        Some(MessageResponse::ListServicesResponse(l)) => {
            Ok(l.service.into_iter().map(|s| s.name).collect())
        }
        other => panic!("not a service list: {other:?}"),
    }
}

#[tokio::test]
async fn http_api_runs_the_grpc_flows_with_keys_errors_and_streaming() {
    let c = Arc::new(Counters::default());
    let (te, dn, vae) = serve_fake(fake(&c)).await;
    let mut cfg = config(&te, &[dn], &vae);
    cfg.api_keys = Some(Arc::new(
        qwen_image_gateway::auth::ApiKeys::parse(KEY).expect("keys"),
    ));
    let http_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = http_listener.local_addr().expect("addr");
    let service = InProcess::start(move |l, stop| {
        qwen_image_gateway::run_with_http(cfg, l, Some(http_listener), stop)
    })
    .await;
    qwen_image_testkit::service::wait_serving(&service.url(), "", GUARD)
        .await
        .expect("SERVING");
    let bearer = format!("Bearer {KEY}");
    let auth = [
        ("authorization", bearer.as_str()),
        ("content-type", "application/json"),
    ];

    let (status, doc) = http(addr, "GET", "/openapi.json", &[], "").await;
    assert_eq!(status, 200);
    for path in [
        "/v1/images/generations",
        "/v1/images/edits",
        "/v1/models",
        "/healthz",
        "/readyz",
    ] {
        assert!(
            doc.contains(&format!("\"{path}\"")),
            "{path} missing from the OpenAPI document"
        );
    }
    assert_eq!(http(addr, "GET", "/readyz", &[], "").await.0, 200);
    let (status, page) = http(addr, "GET", "/", &[], "").await;
    assert!(status == 200 && page.contains("id=\"prompt\""));

    let body =
        r#"{"prompt": "a cat", "size": "64x48", "steps": 3, "seed": 0, "negative_prompt": " "}"#;
    let (status, err) = http(
        addr,
        "POST",
        "/v1/images/generations",
        &[("authorization", "Bearer sk-wrong-0123456789")],
        body,
    )
    .await;
    assert_eq!(status, 401, "{err}");
    assert!(err.contains("\"error\"") && !err.contains(KEY), "{err}");
    let (status, err) = http(
        addr,
        "POST",
        "/v1/images/generations",
        &auth,
        r#"{"prompt": "a cat", "size": "big"}"#,
    )
    .await;
    assert_eq!(status, 400, "{err}");
    assert!(
        err.contains("1024x1024") && err.contains("\"param\":\"size\""),
        "{err}"
    );
    let (status, err) = http(
        addr,
        "POST",
        "/v1/images/generations",
        &auth,
        r#"{"prompt": "a cat", "size": "1000x48"}"#,
    )
    .await;
    assert_eq!(status, 400, "the service's own validation: {err}");
    assert!(err.contains("multiple of"), "{err}");
    assert_eq!(c.encodes.load(Ordering::SeqCst), 0, "nothing ran yet");

    let (status, ok) = http(addr, "POST", "/v1/images/generations", &auth, body).await;
    assert_eq!(status, 200, "{ok}");
    let v: serde_json::Value = serde_json::from_str(&ok).expect("JSON body");
    assert_eq!(v["size"], "64x48");
    assert_eq!(v["seed"], 0);
    assert!(
        v["data"][0]["b64_json"]
            .as_str()
            .is_some_and(|s| s.len() > 100)
    );

    let stream_body =
        r#"{"prompt": "a cat", "size": "64x48", "steps": 3, "seed": 1, "stream": true, "n": 2}"#;
    let (status, events) = http(addr, "POST", "/v1/images/generations", &auth, stream_body).await;
    assert_eq!(status, 200, "{events}");
    assert!(
        events.contains("event: image_generation.progress"),
        "{events}"
    );
    assert_eq!(
        events.matches("event: image_generation.completed").count(),
        2,
        "one per image"
    );
    assert!(c.encodes.load(Ordering::SeqCst) > 0);
}

/// The HTTP API over two models (a base model and an Edit model on its own fake denoiser, sharing the
/// text-encoder and VAE fakes): `model` picks the model, `GET /v1/models` lists both with their kinds, an
/// unknown model is 404 `model_not_found` listing the served ones, and `/v1/images/edits` routes by the
/// model's kind (an Edit model's form reaches the `Edit` RPC, whose answer here is the fake text encoder's
/// missing vision) with the client errors saying what to send.
#[tokio::test]
async fn http_api_picks_the_model_and_routes_edits_by_its_kind() {
    let c = Arc::new(Counters::default());
    let c_edit = Arc::new(Counters::default());
    let (te, dn, vae) = serve_fake(fake(&c)).await;
    let dn_edit = serve_as(
        Fake {
            pipeline_class: "QwenImageEditPlusPipeline",
            ..fake(&c_edit)
        },
        StageKind::Denoiser,
    )
    .await;
    let mut cfg = config(&te, &[dn], &vae);
    cfg.model_name = Some("base".into());
    cfg.extra_models = vec![format!("edit={dn_edit}").parse().expect("model spec")];
    let http_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = http_listener.local_addr().expect("addr");
    let service = InProcess::start(move |l, stop| {
        qwen_image_gateway::run_with_http(cfg, l, Some(http_listener), stop)
    })
    .await;
    qwen_image_testkit::service::wait_serving(&service.url(), "", GUARD)
        .await
        .expect("SERVING");
    let json = [("content-type", "application/json")];

    let (status, list) = http(addr, "GET", "/v1/models", &[], "").await;
    assert_eq!(status, 200, "{list}");
    let list: serde_json::Value = serde_json::from_str(&list).expect("JSON");
    let models: Vec<(&str, &str, bool)> = list["data"]
        .as_array()
        .expect("data")
        .iter()
        .map(|m| {
            (
                m["id"].as_str().unwrap_or_default(),
                m["kind"].as_str().unwrap_or_default(),
                m["default"].as_bool().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(models, [("base", "base", true), ("edit", "edit", false)]);

    // `model` picks the denoiser: the Edit model's serves this text-to-image request, the base one's none.
    let body = r#"{"prompt": "a cat", "size": "64x48", "steps": 3, "seed": 0, "model": "edit"}"#;
    let (status, ok) = http(addr, "POST", "/v1/images/generations", &json, body).await;
    assert_eq!(status, 200, "{ok}");
    assert_eq!(
        (
            c_edit.denoises.load(Ordering::SeqCst),
            c.denoises.load(Ordering::SeqCst)
        ),
        (1, 0)
    );
    let body = r#"{"prompt": "a cat", "size": "64x48", "steps": 3, "seed": 0}"#;
    let (status, ok) = http(addr, "POST", "/v1/images/generations", &json, body).await;
    assert_eq!(status, 200, "{ok}");
    assert_eq!(c.denoises.load(Ordering::SeqCst), 1, "the default model");

    // An unknown model: 404 model_not_found listing the served ones, on both endpoints.
    let body = r#"{"prompt": "a cat", "model": "edit-2512"}"#;
    let (status, err) = http(addr, "POST", "/v1/images/generations", &json, body).await;
    assert_eq!(status, 404, "{err}");
    let e: serde_json::Value = serde_json::from_str(&err).expect("JSON");
    assert_eq!(e["error"]["code"], "model_not_found", "{err}");
    assert_eq!(e["error"]["param"], "model", "{err}");
    assert!(
        e["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("served: [base, edit]")),
        "{err}"
    );
    use qwen_image_testkit::http::multipart as edit_form;
    let post_form = |form: (String, Vec<u8>)| async move {
        qwen_image_testkit::http::request_bytes(
            addr,
            "POST",
            "/v1/images/edits",
            &[("content-type", form.0.as_str())],
            &form.1,
        )
        .await
    };
    let picture: &[u8] = b"not decoded before the model is checked";
    let (status, err) = post_form(edit_form(
        &[("prompt", "p"), ("model", "nope")],
        &[("image", "a.png", picture)],
    ))
    .await;
    assert!(
        status == 404 && err.contains("model_not_found") && err.contains("base, edit"),
        "{status} {err}"
    );

    // Two `image[]` parts to the Edit model reach the Edit RPC (which refuses the fake text encoder: no
    // vision), not img2img.
    let (status, err) = post_form(edit_form(
        &[
            ("prompt", "put picture 2 into picture 1"),
            ("model", "edit"),
        ],
        &[("image[]", "a.png", picture), ("image[]", "b.png", picture)],
    ))
    .await;
    assert_eq!(status, 400, "{err}");
    assert!(err.contains("cannot encode prompts with pictures"), "{err}");
    // A mask on the Edit model, several pictures for the base model, four pictures: 400 saying what to do.
    let (status, err) = post_form(edit_form(
        &[("prompt", "p"), ("model", "edit")],
        &[("image", "a.png", picture), ("mask", "m.png", picture)],
    ))
    .await;
    assert!(
        status == 400 && err.contains("\"param\":\"mask\"") && err.contains("kind `base`"),
        "{status} {err}"
    );
    let (status, err) = post_form(edit_form(
        &[("prompt", "p")],
        &[("image[]", "a.png", picture), ("image[]", "b.png", picture)],
    ))
    .await;
    assert!(
        status == 400 && err.contains("`base` is a base model"),
        "{status} {err}"
    );
    let four = [("image[]", "a.png", picture); 4];
    let (status, err) = post_form(edit_form(&[("prompt", "p"), ("model", "edit")], &four)).await;
    assert!(
        status == 400 && err.contains("send 1 to 3"),
        "{status} {err}"
    );
    assert_eq!(
        c.encodes.load(Ordering::SeqCst),
        2,
        "only the two generations reached a stage"
    );
}
