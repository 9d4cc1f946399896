//! TLS on every hop, end to end with real processes and certificates made at test time (rcgen):
//! `qwen-image serve` with the TLS flags (mutual TLS from the gateway to its four stages, a PNG on the
//! default model, the HTTP API over HTTPS, OTLP export over https), each stage refusing clients without the
//! right certificate, certificate reload without restart (SIGHUP and file change) with a call in flight,
//! the plaintext health listener, `--no-reflection`.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use common::*;
use qwen_image_model::openpose::random::{BodyNetShape, random_body_weights};
use qwen_image_proto::v1::GenerationSettings;
use qwen_image_proto::v1::image_generator_client::ImageGeneratorClient;
use qwen_image_testkit::certs::{self, CertFiles, TestCa};
use qwen_image_testkit::otlp_sink::OtlpSink;
use qwen_image_testkit::process::{ServiceProcess, wait_serving};
use tonic::Code;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
use tonic_reflection::pb::v1::{ServerReflectionRequest, ServerReflectionResponse};

fn cli() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_qwen-image"))
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// A CA, a server certificate for `localhost` (every service of a stack shares it) and the gateway's client
/// certificate, in `dir`. The certificate names no IP address: the stack's gateway resolves its stages'
/// `https://localhost:PORT` URLs (DNS discovery) and dials 127.0.0.1, so it must verify the DNS name, not the
/// address it dialled.
struct Pki {
    ca: TestCa,
    server: CertFiles,
    gateway: CertFiles,
}

fn pki(dir: &Path) -> Pki {
    let ca = TestCa::new(dir, "ca").expect("CA");
    let server = ca
        .server("server", "localhost", &["localhost"])
        .expect("server certificate");
    let gateway = ca
        .client("gateway", "qwen-image-gateway")
        .expect("client certificate");
    Pki {
        ca,
        server,
        gateway,
    }
}

async fn health_check(
    addr: SocketAddr,
    ca: &Path,
    identity: Option<&CertFiles>,
) -> Result<i32, String> {
    let channel = certs::endpoint(addr, "localhost", ca, identity)?
        .connect()
        .await
        .map_err(|e| format!("connect: {e:?}"))?;
    HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .map(|r| r.into_inner().status)
        .map_err(|e| format!("{e:?}"))
}

/// The services listed by gRPC reflection (v1) on `channel`.
async fn reflected_services(channel: Channel) -> Result<Vec<String>, tonic::Status> {
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = ServerReflectionClient::new(channel)
        .server_reflection_info(tokio_stream_once(request))
        .await?
        .into_inner();
    let response: ServerReflectionResponse = stream
        .message()
        .await?
        .ok_or_else(|| tonic::Status::internal("no reflection response"))?;
    match response.message_response {
        Some(MessageResponse::ListServicesResponse(list)) => {
            Ok(list.service.into_iter().map(|s| s.name).collect())
        }
        other => Err(tonic::Status::internal(format!("unexpected {other:?}"))),
    }
}

fn tokio_stream_once<T: Send + 'static>(item: T) -> impl tokio_stream::Stream<Item = T> {
    tokio_stream::iter([item])
}

/// Small random pose-detector weights (the detector's maths is tested elsewhere; here it only has to load).
fn pose_weights(dir: &Path) -> std::path::PathBuf {
    let narrow = BodyNetShape {
        backbone: [4, 4, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8],
        stage: 8,
        stage1_wide: 8,
    };
    let w = random_body_weights(&narrow, 3).expect("random weights");
    let path = dir.join("body.safetensors");
    qwen_image_model::candle_core::safetensors::save(&w, &path).expect("weights written");
    path
}

/// The whole stack in one process (`qwen-image serve`) on the default model, every service over TLS, the
/// stages (text encoder, denoiser, VAE, pose detector) requiring the gateway's client certificate: a PNG
/// through the gateway and through `qwen-image generate --ca-cert`; each stage serves the gateway's
/// certificate and refuses a client without one or with one from another CA; plaintext and an unknown CA
/// are refused at the gateway; the HTTP API answers over HTTPS with the gateway's certificate; the spans
/// reach an OTLP collector over https; the plaintext health listener answers health and nothing else;
/// reflection is on by default.
#[tokio::test]
async fn serve_stack_over_mutual_tls() {
    let dir = tempfile::tempdir().expect("temp dir");
    let Pki {
        ca,
        server,
        gateway,
    } = pki(dir.path());
    let other_ca = TestCa::new(dir.path(), "other-ca").expect("CA");
    let stranger = other_ca
        .client("stranger", "stranger")
        .expect("client certificate");
    let pose = pose_weights(dir.path());
    let collector = ca
        .server("collector", "localhost", &["localhost"])
        .expect("collector certificate");
    let sink = OtlpSink::start_tls(&collector.cert, &collector.key)
        .await
        .expect("OTLP collector over TLS");

    let mut stack = ServiceProcess::spawn(
        cli(),
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--health-listen",
            "127.0.0.1:0",
            "--tls-cert",
            s(&server.cert),
            "--tls-key",
            s(&server.key),
            "--tls-client-ca",
            s(&ca.cert),
            "--stage-ca",
            s(&ca.cert),
            "--stage-client-cert",
            s(&gateway.cert),
            "--stage-client-key",
            s(&gateway.key),
            "--pose-weights",
            s(&pose),
            "--http-listen",
            "127.0.0.1:0",
            "--otlp-endpoint",
            &sink.endpoint,
            "--otlp-ca",
            s(&ca.cert),
        ],
        &[("RUST_LOG", "warn")],
        GUARD,
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    // SERVING only once the gateway reached its three stages over mutual TLS.
    let health = health_serving(&stack).await;

    // The plaintext health listener serves grpc.health.v1 and nothing else.
    let plain = Channel::from_shared(format!("http://{health}"))
        .expect("url")
        .connect()
        .await
        .expect("plaintext health listener");
    let e = ImageGeneratorClient::new(plain.clone())
        .text_to_image(t2i(GenerationSettings {
            prompt: "x".into(),
            ..Default::default()
        }))
        .await
        .expect_err("only health on the plaintext listener");
    assert_eq!(e.code(), Code::Unimplemented, "{e:?}");
    assert_eq!(
        reflected_services(plain)
            .await
            .expect_err("no reflection")
            .code(),
        Code::Unimplemented
    );

    // The gateway over TLS: a picture made by stages reached over mutual TLS.
    let gateway_channel = certs::endpoint(stack.addr, "localhost", &ca.cert, None)
        .expect("endpoint")
        .connect()
        .await
        .expect("TLS connection to the gateway");
    let mut client = ImageGeneratorClient::new(gateway_channel.clone());
    let r = generate(
        &mut client,
        t2i(GenerationSettings {
            prompt: "a red stick figure standing on a white background".into(),
            width_px: 64,
            height_px: 64,
            steps: 2,
            seed: Some(7),
            ..Default::default()
        }),
    )
    .await
    .expect("a picture over TLS");
    assert_eq!(decode_rgb(&r.png[0]).0, 64);
    let services = reflected_services(gateway_channel)
        .await
        .expect("reflection is on by default");
    assert!(
        services.iter().any(|s| s == "qwen_image.v1.ImageGenerator"),
        "{services:?}"
    );

    // Refused at the gateway: plaintext, and a certificate this CA did not sign.
    let plaintext = Channel::from_shared(format!("http://{}", stack.addr))
        .expect("url")
        .connect()
        .await;
    if let Ok(ch) = plaintext {
        let e = HealthClient::new(ch)
            .check(HealthCheckRequest::default())
            .await
            .expect_err("plaintext h2c to a TLS port");
        assert_ne!(e.code(), Code::Ok);
    }
    let e = health_check(stack.addr, &other_ca.cert, None)
        .await
        .expect_err("the gateway's certificate is not from other-ca");
    assert!(
        e.contains("UnknownIssuer") || e.contains("certificate"),
        "{e}"
    );

    // Each stage: TLS with the gateway's client certificate; refused without one or with a stranger's.
    for stage in ["text-encoder", "denoiser", "vae", "pose-detector"] {
        let addr = stack.printed_addr(stage).expect("stage address");
        assert_eq!(
            health_check(addr, &ca.cert, Some(&gateway)).await,
            Ok(ServingStatus::Serving as i32),
            "{stage} with the gateway's certificate"
        );
        health_check(addr, &ca.cert, None)
            .await
            .expect_err(&format!(
                "{stage} must refuse a client without a certificate"
            ));
        health_check(addr, &ca.cert, Some(&stranger))
            .await
            .expect_err(&format!("{stage} must refuse a certificate of another CA"));
    }

    // The HTTP API over HTTPS, with the gateway's certificate; plaintext HTTP gets no answer.
    let http = stack
        .http_addr(GUARD)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let (status, body) = certs::https_get(http, "localhost", &ca.cert, "/readyz")
        .await
        .unwrap_or_else(|e| panic!("HTTPS: {e}"));
    assert_eq!(status, 200, "{body}");
    let plain_http = {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut tcp = tokio::net::TcpStream::connect(http).await.expect("connect");
        tcp.write_all(b"GET /readyz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .await
            .expect("write");
        let mut out = Vec::new();
        let _ = tokio::time::timeout(GUARD, tcp.read_to_end(&mut out)).await;
        String::from_utf8_lossy(&out).into_owned()
    };
    assert!(
        !plain_http.starts_with("HTTP/"),
        "plaintext HTTP answered: {plain_http}"
    );

    // The spans of the request reached the collector over https.
    let spans = sink.wait_until(GUARD, |s| !s.is_empty()).await;
    assert!(!spans.is_empty(), "no span exported over https");

    // The CLI against the TLS gateway: --ca-cert verifies it; without it the system roots do not.
    let url = format!("https://localhost:{}", stack.addr.port());
    let out = dir.path().join("cli.png");
    let run = |ca_cert: Option<&Path>| {
        let mut c = std::process::Command::new(cli());
        c.args([
            "generate",
            "--gateway",
            &url,
            "--prompt",
            "a blue stick figure",
        ])
        .args([
            "--width", "64", "--height", "64", "--steps", "2", "--seed", "1",
        ])
        .args(["--quiet", "--timeout-secs", "300", "--out", s(&out)]);
        if let Some(ca) = ca_cert {
            c.args(["--ca-cert", s(ca)]);
        }
        c.output().expect("qwen-image generate runs")
    };
    let ok = run(Some(&ca.cert));
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let png = std::fs::read(&out).expect("the PNG written");
    assert_eq!(decode_rgb(&png).0, 64);
    let refused = run(None);
    assert!(!refused.status.success(), "an unknown CA must be refused");

    let status = stack.terminate(GUARD).await.expect("drains");
    assert!(status.success(), "{status:?}");
}

async fn wait_for_certificate(addr: SocketAddr, ca: &Path, want: &CertFiles, what: &str) {
    let found = tokio::time::timeout(GUARD, async {
        loop {
            if certs::peer_certificate(addr, "localhost", ca).await.ok() == Some(want.der.clone()) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    assert!(
        found.is_ok(),
        "new handshakes never presented the {what} certificate"
    );
}

/// A stage reloads its certificate without restarting, on SIGHUP and on a file change: new handshakes
/// present the new certificate while a call opened before (a health Watch) keeps running and still gets
/// the drain's NOT_SERVING at the end. Started with `--no-reflection`: reflection is UNIMPLEMENTED.
#[tokio::test]
async fn stage_reloads_its_certificate_without_restart() {
    let dir = tempfile::tempdir().expect("temp dir");
    let Pki { ca, server, .. } = pki(dir.path());
    let mut stage = ServiceProcess::spawn(
        cli(),
        &[
            "serve",
            "--stage",
            "vae",
            "--model",
            s(&snapshot()),
            "--listen",
            "127.0.0.1:0",
            "--health-listen",
            "127.0.0.1:0",
            "--tls-cert",
            s(&server.cert),
            "--tls-key",
            s(&server.key),
            "--no-reflection",
            "--log-format",
            "json",
        ],
        &[("RUST_LOG", "warn,qwen_image_common::tls=info")],
        GUARD,
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    health_serving(&stage).await;
    assert_eq!(
        certs::peer_certificate(stage.addr, "localhost", &ca.cert).await,
        Ok(server.der.clone())
    );

    // The call in flight: a Watch on a connection made with the first certificate.
    let channel = certs::endpoint(stage.addr, "localhost", &ca.cert, None)
        .expect("endpoint")
        .connect()
        .await
        .expect("TLS connection");
    let mut watch = HealthClient::new(channel.clone())
        .watch(HealthCheckRequest::default())
        .await
        .expect("watch")
        .into_inner();
    let first = watch.message().await.expect("watch").expect("a status");
    assert_eq!(first.status, ServingStatus::Serving as i32);
    assert_eq!(
        reflected_services(channel.clone())
            .await
            .expect_err("--no-reflection")
            .code(),
        Code::Unimplemented
    );

    // SIGHUP after replacing the files (same names, new key and certificate).
    let second = ca
        .server("server", "localhost", &["localhost"])
        .expect("second certificate");
    assert_ne!(second.der, server.der);
    let before_hup = stage.log_lines().len();
    stage.signal("HUP").await.expect("SIGHUP");
    wait_for_certificate(stage.addr, &ca.cert, &second, "second").await;
    wait_reload_logged(&stage, before_hup, true).await;

    // A file change alone (no signal): noticed by the periodic check.
    let before_change = stage.log_lines().len();
    let third = ca
        .server("server", "localhost", &["localhost"])
        .expect("third certificate");
    wait_for_certificate(stage.addr, &ca.cert, &third, "third").await;
    wait_reload_logged(&stage, before_change, false).await;
    assert!(stage.is_running(), "reloaded without a restart");

    // The old connection still serves, and the Watch opened before both reloads sees the drain.
    let again = HealthClient::new(channel)
        .check(HealthCheckRequest::default())
        .await
        .expect("the connection made before the reloads still serves");
    assert_eq!(again.into_inner().status, ServingStatus::Serving as i32);
    stage.signal("TERM").await.expect("SIGTERM");
    let drained = tokio::time::timeout(GUARD, async {
        while let Some(m) = watch.message().await.expect("the watch was not dropped") {
            if m.status == ServingStatus::NotServing as i32 {
                return true;
            }
        }
        false
    })
    .await
    .expect("the drain is reported");
    assert!(drained, "the in-flight Watch saw NOT_SERVING");
    drop(watch);
    let status = stage.wait(GUARD).await.expect("exits after the drain");
    assert!(status.success(), "{status:?}");
}

/// The plaintext health listener `p` printed, once it reports SERVING.
async fn health_serving(p: &ServiceProcess) -> SocketAddr {
    let health = p.printed_addr("health").expect("health listening on");
    wait_serving(&format!("http://{health}"), GUARD)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    health
}

/// Waits for the stage's "TLS files reloaded" line after its first `skip` log lines, from a SIGHUP or from the
/// periodic file check. The line is logged just after the swap, so it is waited for rather than looked up once.
async fn wait_reload_logged(stage: &ServiceProcess, skip: usize, sighup: bool) {
    let cause = format!(r#""sighup":{sighup}"#);
    stage
        .wait_log_line(
            skip,
            |l| l.contains("TLS files reloaded") && l.contains(&cause),
            GUARD,
        )
        .await
        .unwrap_or_else(|e| panic!("the reload (sighup {sighup}): {e}"));
}

/// Wrong TLS flag combinations stop `serve` before it loads anything, saying what to change.
#[test]
fn bad_tls_flags_are_refused_with_a_reason() {
    let dir = tempfile::tempdir().expect("temp dir");
    let Pki { ca, server, .. } = pki(dir.path());
    let run = |args: &[&str]| {
        let out = std::process::Command::new(cli())
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(args)
            .output()
            .expect("runs");
        assert!(!out.status.success(), "{args:?} must be refused");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let e = run(&["--stage", "vae", "--stage-ca", s(&ca.cert)]);
    assert!(e.contains("--stage gateway"), "{e}");
    let e = run(&["--tls-client-ca", s(&ca.cert)]);
    assert!(e.contains("--tls-cert"), "{e}");
    // A stack over TLS whose gateway could not verify its stages.
    let e = run(&["--tls-cert", s(&server.cert), "--tls-key", s(&server.key)]);
    assert!(e.contains("--stage-ca"), "{e}");
    // A key that is not the certificate's.
    let e = run(&[
        "--stage",
        "vae",
        "--tls-cert",
        s(&server.cert),
        "--tls-key",
        s(&ca.cert),
    ]);
    assert!(e.contains("server.crt") || e.contains("ca.crt"), "{e}");
}
