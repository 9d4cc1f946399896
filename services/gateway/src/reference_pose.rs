//! `PoseRequest.reference_image`: the picture goes to the pose-detector stage (`--pose-detector`,
//! controlnet-aux's OpenPose body estimator), and the people it finds become the request's `keypoints_json`,
//! so the rest of the Pose flow is the keypoints flow (skeleton drawn at the output size, whose default is the
//! reference's own size). Nobody in the picture, or no detector configured, is FAILED_PRECONDITION; a detector
//! that cannot be reached is UNAVAILABLE after one retry.

use std::time::Instant;

use qwen_image_common::limits::MAX_MESSAGE_BYTES;
use qwen_image_proto::v1::pose_detector_client::PoseDetectorClient;
use qwen_image_proto::v1::{DetectPoseRequest, Image, PoseRequest, pose_request};
use tonic::Code;
use tonic::transport::Channel;

use crate::error::GatewayError;
use crate::images;

/// Attempts at the detector for one request (the first and one retry when it is unreachable).
const ATTEMPTS: usize = 2;

/// A lazily connected client of the pose-detector stage.
#[derive(Clone, Debug)]
pub struct Detector {
    url: String,
    channel: Channel,
}

impl Detector {
    /// `url`: the stage's endpoint, e.g. `http://127.0.0.1:50054`, or `https://` with `tls` (the gateway's
    /// stage TLS, as for the other stages).
    pub fn new(
        url: &str,
        tls: Option<&qwen_image_common::tls::StageClientTls>,
    ) -> Result<Self, String> {
        let channel = qwen_image_common::tls::client::channel(url, tls, None)
            .map_err(|e| format!("--pose-detector: {e}"))?;
        Ok(Self {
            url: url.to_string(),
            channel,
        })
    }

    async fn detect(&self, image: Image, deadline: Instant) -> Result<(String, u32), GatewayError> {
        let mut last = None;
        for _ in 0..ATTEMPTS {
            let mut client = PoseDetectorClient::new(self.channel.clone())
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES);
            let mut req = tonic::Request::new(DetectPoseRequest {
                image: Some(image.clone()),
            });
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(GatewayError::DeadlineExceeded);
            }
            req.set_timeout(left);
            match client.detect_pose(req).await {
                Ok(r) => {
                    let r = r.into_inner();
                    return Ok((r.keypoints_json, r.people));
                }
                Err(s) if s.code() == Code::Unavailable => last = Some(s),
                Err(s) if s.code() == Code::DeadlineExceeded => {
                    return Err(GatewayError::DeadlineExceeded);
                }
                Err(s) if s.code() == Code::InvalidArgument => {
                    return Err(GatewayError::InvalidArgument(format!(
                        "reference_image: {}",
                        s.message()
                    )));
                }
                Err(s) => {
                    return Err(GatewayError::Unavailable(format!(
                        "the pose detector at {} answered {}: {}",
                        self.url,
                        s.code(),
                        s.message()
                    )));
                }
            }
        }
        Err(GatewayError::Unavailable(format!(
            "the pose detector at {} is unreachable: {}",
            self.url,
            last.map(|s| s.message().to_string()).unwrap_or_default()
        )))
    }
}

/// Replaces a `reference_image` pose by the keypoints the detector finds in it; other requests pass unchanged.
pub async fn resolve(
    detector: Option<&Detector>,
    mut req: PoseRequest,
    deadline: Instant,
) -> Result<PoseRequest, GatewayError> {
    let Some(pose_request::Pose::ReferenceImage(bytes)) = &req.pose else {
        return Ok(req);
    };
    let Some(detector) = detector else {
        return Err(GatewayError::FailedPrecondition(
            "reference_image needs a pose-detector stage, and this gateway has none (--pose-detector URL); \
             send pose_image or keypoints_json instead"
                .into(),
        ));
    };
    let img = images::decode_rgb("reference_image", bytes)?;
    let image = Image {
        width_px: img.width as u32,
        height_px: img.height as u32,
        rgb8: img.data.into(),
    };
    let (json, people) = detector.detect(image, deadline).await?;
    if people == 0 {
        return Err(GatewayError::FailedPrecondition(
            "no person found in reference_image: send a picture in which a whole body is visible, or the pose \
             itself as pose_image / keypoints_json"
                .into(),
        ));
    }
    tracing::info!(people, "pose detected in the reference image");
    req.pose = Some(pose_request::Pose::KeypointsJson(json));
    Ok(req)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

    use super::*;
    use qwen_image_proto::v1::DetectPoseResponse;
    use qwen_image_proto::v1::pose_detector_server::{PoseDetector, PoseDetectorServer};
    use tonic::{Request, Response, Status};

    /// A detector that finds `people` people (and checks it got the picture's pixels).
    struct FakeDetector {
        people: u32,
    }

    #[tonic::async_trait]
    impl PoseDetector for FakeDetector {
        async fn detect_pose(
            &self,
            r: Request<DetectPoseRequest>,
        ) -> Result<Response<DetectPoseResponse>, Status> {
            let img = r.into_inner().image.unwrap();
            assert_eq!((img.width_px, img.height_px, img.rgb8.len()), (3, 2, 18));
            let people = (0..self.people)
                .map(|_| "{\"pose_keypoints_2d\":[1,1,1]}")
                .collect::<Vec<_>>()
                .join(",");
            Ok(Response::new(DetectPoseResponse {
                keypoints_json: format!(
                    "{{\"canvas_width\":3,\"canvas_height\":2,\"people\":[{people}]}}"
                ),
                people: self.people,
                skeleton_png: Vec::new().into(),
            }))
        }
    }

    async fn serve(people: u32) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(PoseDetectorServer::new(FakeDetector { people }))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        format!("http://{addr}")
    }

    fn png_3x2() -> Vec<u8> {
        let mut out = Vec::new();
        let mut enc = png::Encoder::new(&mut out, 3, 2);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        enc.write_header()
            .unwrap()
            .write_image_data(&[7u8; 18])
            .unwrap();
        out
    }

    fn reference(bytes: Vec<u8>) -> PoseRequest {
        PoseRequest {
            pose: Some(pose_request::Pose::ReferenceImage(bytes.into())),
            ..Default::default()
        }
    }

    fn soon() -> Instant {
        Instant::now() + std::time::Duration::from_secs(60)
    }

    #[tokio::test]
    async fn found_people_become_the_keypoints_json() {
        let d = Detector::new(&serve(2).await, None).unwrap();
        let r = resolve(Some(&d), reference(png_3x2()), soon())
            .await
            .unwrap();
        let Some(pose_request::Pose::KeypointsJson(json)) = r.pose else {
            panic!("{:?}", r.pose)
        };
        assert!(
            json.contains("\"canvas_width\":3") && json.matches("pose_keypoints_2d").count() == 2,
            "{json}"
        );
    }

    #[tokio::test]
    async fn nobody_in_the_picture_or_no_detector_is_failed_precondition() {
        let d = Detector::new(&serve(0).await, None).unwrap();
        let e = resolve(Some(&d), reference(png_3x2()), soon())
            .await
            .unwrap_err();
        assert!(
            matches!(&e, GatewayError::FailedPrecondition(m) if m.contains("no person found")),
            "{e:?}"
        );
        let e = resolve(None, reference(png_3x2()), soon())
            .await
            .unwrap_err();
        assert!(
            matches!(&e, GatewayError::FailedPrecondition(m) if m.contains("--pose-detector")),
            "{e:?}"
        );
    }

    #[tokio::test]
    async fn a_bad_picture_is_invalid_and_a_dead_detector_unavailable() {
        let d = Detector::new(&serve(1).await, None).unwrap();
        let e = resolve(Some(&d), reference(b"not a picture".to_vec()), soon())
            .await
            .unwrap_err();
        assert!(
            matches!(&e, GatewayError::InvalidArgument(m) if m.contains("reference_image")),
            "{e:?}"
        );
        // a port nobody listens on
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let dead = format!("http://{}", l.local_addr().unwrap());
        drop(l);
        let d = Detector::new(&dead, None).unwrap();
        let e = resolve(Some(&d), reference(png_3x2()), soon())
            .await
            .unwrap_err();
        assert!(
            matches!(&e, GatewayError::Unavailable(m) if m.contains("unreachable")),
            "{e:?}"
        );
    }

    #[tokio::test]
    async fn other_poses_pass_unchanged() {
        let req = PoseRequest {
            pose: Some(pose_request::Pose::KeypointsJson("{}".into())),
            ..Default::default()
        };
        let r = resolve(None, req.clone(), soon()).await.unwrap();
        assert_eq!(r, req);
    }
}
