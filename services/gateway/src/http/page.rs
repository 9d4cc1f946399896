//! The web page at `/` (plain HTML and JS compiled into the binary, no build step) and the demo poses it
//! offers (`/demo-poses.json`: the OpenPose keypoints of `docs/demo/pose-*.json`).

use axum::Router;
use axum::http::header;
use axum::response::{Html, IntoResponse};
use axum::routing::get;

use super::AppState;

const PAGE: &str = include_str!("page.html");

/// (name, OpenPose keypoints JSON) of the demo poses.
const DEMO_POSES: &[(&str, &str)] = &[
    (
        "standing",
        include_str!("../../../../docs/demo/pose-standing.json"),
    ),
    (
        "kicking",
        include_str!("../../../../docs/demo/pose-kicking.json"),
    ),
    (
        "arms_raised",
        include_str!("../../../../docs/demo/pose-arms_raised.json"),
    ),
    (
        "sitting",
        include_str!("../../../../docs/demo/pose-sitting.json"),
    ),
    (
        "jumping",
        include_str!("../../../../docs/demo/pose-jumping.json"),
    ),
    (
        "waving",
        include_str!("../../../../docs/demo/pose-waving.json"),
    ),
    (
        "running",
        include_str!("../../../../docs/demo/pose-running.json"),
    ),
];

fn demo_poses_json() -> String {
    let entries: Vec<String> = DEMO_POSES
        .iter()
        .map(|(name, json)| format!("{:?}: {}", name, json.trim()))
        .collect();
    format!("{{{}}}", entries.join(", "))
}

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/", get(|| async { Html(PAGE) }))
        .route(
            "/demo-poses.json",
            get(|| async {
                (
                    [(header::CONTENT_TYPE, "application/json")],
                    demo_poses_json(),
                )
                    .into_response()
            }),
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demo_poses_are_one_json_object() {
        let v: serde_json::Value = serde_json::from_str(&demo_poses_json()).expect("valid JSON");
        assert_eq!(v.as_object().map(|o| o.len()), Some(DEMO_POSES.len()));
        assert!(v["kicking"]["people"].is_array());
    }
}
