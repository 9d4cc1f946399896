//! OpenPose keypoints → the skeleton picture ControlNet pose models are trained on.
//!
//! [`parse_openpose_json`] reads the OpenPose / ControlNet-aux / sd-webui-openpose-editor JSON (see
//! [`parse`](self::parse) for the accepted format and every rule), and [`render`] draws exactly what
//! controlnet-aux's `draw_poses` draws (`util.draw_bodypose`, `draw_handpose`, `draw_facepose`, with OpenCV's
//! `ellipse2Poly` / `fillConvexPoly` / `circle` / `line` rasterisation reproduced in [`cvdraw`]).

mod cvdraw;
mod parse;

pub use parse::{OUTSIDE_TOLERANCE, parse_openpose_json};

use crate::Image8;
use cvdraw::Canvas;

/// One keypoint list: `None` = missing (confidence 0). Coordinates are pixels of the pose's canvas.
pub type Keypoints = Vec<Option<(f32, f32)>>;

/// A set of posed people on a canvas (`canvas_width` × `canvas_height` pixels; keypoints are in its pixels).
#[derive(Debug, Clone, PartialEq)]
pub struct PoseKeypoints {
    pub canvas_width: usize,
    pub canvas_height: usize,
    pub people: Vec<Person>,
}

/// One person: 18 COCO body points (order: nose, neck, r-shoulder, r-elbow, r-wrist, l-shoulder, l-elbow,
/// l-wrist, r-hip, r-knee, r-ankle, l-hip, l-knee, l-ankle, r-eye, l-eye, r-ear, l-ear), optional 21-point
/// hands and a 68/70-point face.
#[derive(Debug, Clone, PartialEq)]
pub struct Person {
    pub body: Keypoints,
    pub left_hand: Option<Keypoints>,
    pub right_hand: Option<Keypoints>,
    pub face: Option<Keypoints>,
}

/// A JSON pose that cannot be used; the message says what to change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoseError {
    pub message: String,
}

impl PoseError {
    pub(crate) fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
        }
    }
}

impl std::fmt::Display for PoseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for PoseError {}

/// COCO-18 body part names, for error messages.
pub const BODY_PART_NAMES: [&str; 18] = [
    "nose",
    "neck",
    "right shoulder",
    "right elbow",
    "right wrist",
    "left shoulder",
    "left elbow",
    "left wrist",
    "right hip",
    "right knee",
    "right ankle",
    "left hip",
    "left knee",
    "left ankle",
    "right eye",
    "left eye",
    "right ear",
    "left ear",
];

/// `draw_bodypose`'s `limbSeq` (1-based in Python, 0-based here).
const LIMB_SEQ: [(usize, usize); 17] = [
    (1, 2),
    (1, 5),
    (2, 3),
    (3, 4),
    (5, 6),
    (6, 7),
    (1, 8),
    (8, 9),
    (9, 10),
    (1, 11),
    (11, 12),
    (12, 13),
    (1, 0),
    (0, 14),
    (14, 16),
    (0, 15),
    (15, 17),
];

/// `draw_bodypose`'s `colors` (RGB; the canvas is handed out as RGB).
const BODY_COLORS: [[u8; 3]; 18] = [
    [255, 0, 0],
    [255, 85, 0],
    [255, 170, 0],
    [255, 255, 0],
    [170, 255, 0],
    [85, 255, 0],
    [0, 255, 0],
    [0, 255, 85],
    [0, 255, 170],
    [0, 255, 255],
    [0, 170, 255],
    [0, 85, 255],
    [0, 0, 255],
    [85, 0, 255],
    [170, 0, 255],
    [255, 0, 255],
    [255, 0, 170],
    [255, 0, 85],
];

/// `draw_handpose`'s edges.
const HAND_EDGES: [(usize, usize); 20] = [
    (0, 1),
    (1, 2),
    (2, 3),
    (3, 4),
    (0, 5),
    (5, 6),
    (6, 7),
    (7, 8),
    (0, 9),
    (9, 10),
    (10, 11),
    (11, 12),
    (0, 13),
    (13, 14),
    (14, 15),
    (15, 16),
    (0, 17),
    (17, 18),
    (18, 19),
    (19, 20),
];

/// `matplotlib.colors.hsv_to_rgb([ie / 20, 1, 1]) * 255` as OpenCV stores it (`saturate_cast<uchar>`, ties to
/// even), checked against cv2.
const HAND_COLORS: [[u8; 3]; 20] = [
    [255, 0, 0],
    [255, 77, 0],
    [255, 153, 0],
    [255, 229, 0],
    [204, 255, 0],
    [128, 255, 0],
    [51, 255, 0],
    [0, 255, 25],
    [0, 255, 102],
    [0, 255, 179],
    [0, 255, 255],
    [0, 178, 255],
    [0, 102, 255],
    [0, 25, 255],
    [51, 0, 255],
    [128, 0, 255],
    [204, 0, 255],
    [255, 0, 230],
    [255, 0, 153],
    [255, 0, 77],
];

/// `eps` in controlnet-aux's util.py: hand/face points are drawn only when `int(x * W) > eps` (i.e. ≥ 1).
const EPS: f64 = 0.01;

/// Maps a canvas-pixel keypoint to controlnet-aux's render space: `Keypoint.x = x / canvas_width` (float64),
/// then `x * W`. Points absurdly far outside the render (beyond 4 image sizes) are treated as missing so a
/// programmatic caller cannot make the scan converter walk millions of rows; parsed poses never get there.
fn scaled(p: Option<(f32, f32)>, sx: (f64, f64), sy: (f64, f64)) -> Option<(f64, f64)> {
    let (x, y) = p?;
    let x = x as f64 / sx.0 * sx.1;
    let y = y as f64 / sy.0 * sy.1;
    let far = |v: f64, size: f64| !v.is_finite() || v < -4.0 * size - 64.0 || v > 5.0 * size + 64.0;
    if far(x, sx.1) || far(y, sy.1) {
        return None;
    }
    Some((x, y))
}

/// Renders the skeleton picture (black background, RGB8, `width` × `height`) as controlnet-aux's `draw_poses`
/// draws it: per person the body (17 limbs as filled ellipses at 60 % colour, then 18 joint dots), then the left
/// and right hand (20 coloured 2-px lines, blue dots) if `draw_hands`, then the face (white dots) if `draw_face`.
/// Keypoints are scaled from the pose's canvas to `width` × `height`.
pub fn render(
    pose: &PoseKeypoints,
    width: usize,
    height: usize,
    draw_hands: bool,
    draw_face: bool,
) -> Image8 {
    let mut data = vec![0u8; width * height * 3];
    let mut canvas = Canvas {
        data: &mut data,
        width: width as i64,
        height: height as i64,
    };
    let sx = (pose.canvas_width.max(1) as f64, width as f64);
    let sy = (pose.canvas_height.max(1) as f64, height as f64);
    for person in &pose.people {
        let body: Vec<Option<(f64, f64)>> = (0..18)
            .map(|i| scaled(person.body.get(i).copied().flatten(), sx, sy))
            .collect();
        draw_body(&mut canvas, &body);
        if draw_hands {
            for hand in [&person.left_hand, &person.right_hand]
                .into_iter()
                .flatten()
            {
                let pts: Vec<_> = hand.iter().map(|p| scaled(*p, sx, sy)).collect();
                draw_hand(&mut canvas, &pts);
            }
        }
        if let (true, Some(face)) = (draw_face, &person.face) {
            {
                for p in face.iter().filter_map(|p| scaled(*p, sx, sy)) {
                    let (x, y) = (p.0 as i64, p.1 as i64);
                    if x as f64 > EPS && y as f64 > EPS {
                        canvas.fill_circle((x, y), 3, [255, 255, 255]);
                    }
                }
            }
        }
    }
    Image8 {
        width,
        height,
        channels: 3,
        data,
    }
}

/// `util.draw_bodypose` (x, y already multiplied by W, H).
fn draw_body(canvas: &mut Canvas<'_>, kp: &[Option<(f64, f64)>]) {
    const STICKWIDTH: i64 = 4;
    for (&(k1, k2), color) in LIMB_SEQ.iter().zip(BODY_COLORS.iter()) {
        let (Some(a), Some(b)) = (kp[k1], kp[k2]) else {
            continue;
        };
        // Python names: Y holds the x's, X the y's.
        let (y0, y1) = (a.0, b.0);
        let (x0, x1) = (a.1, b.1);
        let m_x = (x0 + x1) / 2.0;
        let m_y = (y0 + y1) / 2.0;
        let (ddx, ddy) = (x0 - x1, y0 - y1);
        let length = (ddx * ddx + ddy * ddy).powf(0.5);
        let angle = ddx.atan2(ddy).to_degrees();
        let poly = cvdraw::ellipse2poly(
            (m_y as i64, m_x as i64),
            ((length / 2.0) as i64, STICKWIDTH),
            angle as i64,
            1,
        );
        let c = color.map(|c| (c as f64 * 0.6) as u8);
        canvas.fill_convex_poly(&poly, c, 0);
    }
    for (p, color) in kp.iter().zip(BODY_COLORS.iter()) {
        if let Some((x, y)) = p {
            canvas.fill_circle((*x as i64, *y as i64), 4, *color);
        }
    }
}

/// `util.draw_handpose`.
fn draw_hand(canvas: &mut Canvas<'_>, kp: &[Option<(f64, f64)>]) {
    if kp.is_empty() {
        return;
    }
    for (ie, &(e1, e2)) in HAND_EDGES.iter().enumerate() {
        let (Some(Some(a)), Some(Some(b))) = (kp.get(e1), kp.get(e2)) else {
            continue;
        };
        let (x1, y1, x2, y2) = (a.0 as i64, a.1 as i64, b.0 as i64, b.1 as i64);
        if x1 as f64 > EPS && y1 as f64 > EPS && x2 as f64 > EPS && y2 as f64 > EPS {
            canvas.thick_line((x1, y1), (x2, y2), HAND_COLORS[ie], 2);
        }
    }
    for (x, y) in kp.iter().flatten() {
        let (x, y) = (*x as i64, *y as i64);
        if x as f64 > EPS && y as f64 > EPS {
            canvas.fill_circle((x, y), 4, [0, 0, 255]);
        }
    }
}

/// The raw OpenCV primitives, for parity tests only (not a stable API).
#[doc(hidden)]
pub mod primitives {
    use super::cvdraw::Canvas;

    /// `cv2.fillConvexPoly(img, pts, color)` (LINE_8, shift 0) on an RGB8 buffer.
    pub fn fill_convex_poly(
        data: &mut [u8],
        width: usize,
        height: usize,
        pts: &[(i64, i64)],
        color: [u8; 3],
    ) {
        let mut c = Canvas {
            data,
            width: width as i64,
            height: height as i64,
        };
        c.fill_convex_poly(pts, color, 0);
    }

    /// `Line2` (what `cv2.polylines(..., thickness=1, shift=16)` draws for one segment).
    pub fn line2(
        data: &mut [u8],
        width: usize,
        height: usize,
        p0: (i64, i64),
        p1: (i64, i64),
        color: [u8; 3],
    ) {
        let mut c = Canvas {
            data,
            width: width as i64,
            height: height as i64,
        };
        c.line2(p0, p1, color);
    }

    /// `cv2.line(img, p0, p1, color, thickness)` (thickness ≥ 2, LINE_8) on an RGB8 buffer.
    pub fn thick_line(
        data: &mut [u8],
        width: usize,
        height: usize,
        p0: (i64, i64),
        p1: (i64, i64),
        color: [u8; 3],
        thickness: i64,
    ) {
        let mut c = Canvas {
            data,
            width: width as i64,
            height: height as i64,
        };
        c.thick_line(p0, p1, color, thickness);
    }
}
