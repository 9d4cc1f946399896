//! Parsing of OpenPose keypoint JSON.
//!
//! # Accepted format
//!
//! ```json
//! {
//!   "canvas_width": 512, "canvas_height": 768,
//!   "people": [{
//!     "pose_keypoints_2d": [x0, y0, c0, x1, y1, c1, ...],
//!     "hand_left_keypoints_2d": [...], "hand_right_keypoints_2d": [...], "face_keypoints_2d": [...]
//!   }]
//! }
//! ```
//!
//! * The object may also be wrapped in a one-element array (ComfyUI's `POSE_KEYPOINT` file).
//! * `canvas_width` / `canvas_height`: positive integers (≤ 16384). When both are absent `default_size` is used
//!   (the gateway passes the requested image size); when that is `None` too, it is an error.
//! * `people`: at least one person, and at least one visible keypoint overall.
//! * `pose_keypoints_2d`: 18 × 3 numbers (COCO-18, the ControlNet order) or 25 × 3 numbers (OpenPose BODY_25,
//!   mapped to COCO-18 by dropping MidHip (8) and the six foot points (19–24)). Required.
//! * `hand_left_keypoints_2d` / `hand_right_keypoints_2d`: 21 × 3 numbers; `face_keypoints_2d`: 70 × 3 (or
//!   68 × 3). Missing, `null` or `[]` = not present.
//! * Each keypoint is `x, y, confidence`; confidence ≤ 0 means missing (OpenPose writes `0, 0, 0`); any
//!   positive confidence means present (OpenPose's own scores are kept, not thresholded).
//! * Coordinates are pixels of the canvas, or normalised to [0, 1]. Decision: if **every** visible coordinate
//!   of every person lies within [-0.1, 1.1] the file is normalised and is multiplied by the canvas size;
//!   otherwise it is in pixels. (A pixel-space pose whose every point sits within about one pixel of the
//!   top-left corner is not a usable pose, so the rule is unambiguous in practice.)
//! * Every visible keypoint must lie on the canvas, or outside it by at most [`OUTSIDE_TOLERANCE`] (10 %) of
//!   the canvas width / height (editors let points be dragged slightly off-canvas; drawing clips them).
//! * All numbers must be finite (after conversion to `f32`).

use super::{BODY_PART_NAMES, Keypoints, Person, PoseError, PoseKeypoints};
use serde_json::Value;

/// How far (as a fraction of the canvas width / height) a keypoint may lie outside the canvas.
pub const OUTSIDE_TOLERANCE: f64 = 0.1;

const MAX_CANVAS: u64 = 16384;

/// BODY_25 index for each COCO-18 index.
const COCO_FROM_BODY25: [usize; 18] = [
    0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18,
];

/// Raw keypoints of one part: (x, y) when confidence > 0.
type Raw = Vec<Option<(f64, f64)>>;

struct RawPerson {
    body: Raw,
    left_hand: Option<Raw>,
    right_hand: Option<Raw>,
    face: Option<Raw>,
}

/// Parses OpenPose JSON (see the module documentation for the accepted format and the rules).
pub fn parse_openpose_json(
    text: &str,
    default_size: Option<(usize, usize)>,
) -> Result<PoseKeypoints, PoseError> {
    let value: Value = serde_json::from_str(text).map_err(|e| {
        PoseError::new(format!(
            "the pose is not valid JSON ({e}); send an OpenPose keypoints object like \
             {{\"people\":[{{\"pose_keypoints_2d\":[x,y,c,...]}}],\"canvas_width\":W,\"canvas_height\":H}}"
        ))
    })?;
    let obj = match &value {
        Value::Array(frames) if frames.len() == 1 => &frames[0],
        Value::Array(frames) => {
            return Err(PoseError::new(format!(
                "the pose JSON is an array of {} frames; send exactly one pose object (or a one-element array)",
                frames.len()
            )));
        }
        v => v,
    };
    let Some(obj) = obj.as_object() else {
        return Err(PoseError::new(
            "the pose JSON must be an object with a \"people\" array (OpenPose format)",
        ));
    };

    let (canvas_width, canvas_height) = canvas_size(obj, default_size)?;

    let people = match obj.get("people") {
        Some(Value::Array(p)) => p,
        Some(_) => {
            return Err(PoseError::new(
                "\"people\" must be an array of person objects",
            ));
        }
        None => {
            return Err(PoseError::new(
                "the pose JSON has no \"people\" array; add \"people\":[{\"pose_keypoints_2d\":[x,y,c,...]}]",
            ));
        }
    };
    if people.is_empty() {
        return Err(PoseError::new(
            "the pose has no people (\"people\" is empty); add at least one person's pose_keypoints_2d",
        ));
    }

    let mut raw_people = Vec::with_capacity(people.len());
    for (pi, person) in people.iter().enumerate() {
        let Some(person) = person.as_object() else {
            return Err(PoseError::new(format!("people[{pi}] must be an object")));
        };
        let body_flat = read_numbers(person.get("pose_keypoints_2d"), pi, "pose_keypoints_2d")?
            .ok_or_else(|| {
                PoseError::new(format!(
                    "people[{pi}] has no \"pose_keypoints_2d\"; give 18 (COCO) or 25 (BODY_25) keypoints as x,y,c triples"
                ))
            })?;
        let body = match body_flat.len() {
            54 => triples(&body_flat),
            75 => {
                let b25 = triples(&body_flat);
                COCO_FROM_BODY25.iter().map(|&i| b25[i]).collect()
            }
            n => {
                return Err(PoseError::new(format!(
                    "people[{pi}].pose_keypoints_2d has {n} numbers; expected 54 (18 COCO keypoints × x,y,c) \
                     or 75 (25 BODY_25 keypoints × x,y,c)"
                )));
            }
        };
        let hand = |key: &str| -> Result<Option<Raw>, PoseError> {
            match read_numbers(person.get(key), pi, key)? {
                None => Ok(None),
                Some(v) if v.is_empty() => Ok(None),
                Some(v) if v.len() == 63 => Ok(Some(triples(&v))),
                Some(v) => Err(PoseError::new(format!(
                    "people[{pi}].{key} has {} numbers; expected 63 (21 hand keypoints × x,y,c) or an empty array",
                    v.len()
                ))),
            }
        };
        let left_hand = hand("hand_left_keypoints_2d")?;
        let right_hand = hand("hand_right_keypoints_2d")?;
        let face = match read_numbers(person.get("face_keypoints_2d"), pi, "face_keypoints_2d")? {
            None => None,
            Some(v) if v.is_empty() => None,
            Some(v) if v.len() == 210 || v.len() == 204 => Some(triples(&v)),
            Some(v) => {
                return Err(PoseError::new(format!(
                    "people[{pi}].face_keypoints_2d has {} numbers; expected 210 (70 face keypoints × x,y,c), \
                     204 (68 keypoints) or an empty array",
                    v.len()
                )));
            }
        };
        raw_people.push(RawPerson {
            body,
            left_hand,
            right_hand,
            face,
        });
    }

    // Normalised or pixels?
    let mut any_visible = false;
    let mut all_unit = true;
    for p in &raw_people {
        for part in parts(p) {
            for (x, y) in part.iter().flatten() {
                any_visible = true;
                let unit = |v: f64| (-OUTSIDE_TOLERANCE..=1.0 + OUTSIDE_TOLERANCE).contains(&v);
                all_unit &= unit(*x) && unit(*y);
            }
        }
    }
    if !any_visible {
        return Err(PoseError::new(
            "no keypoint of any person is visible (every confidence is 0); give confidence > 0 to the points to draw",
        ));
    }
    let (sx, sy) = if all_unit {
        (canvas_width as f64, canvas_height as f64)
    } else {
        (1.0, 1.0)
    };

    let (w, h) = (canvas_width as f64, canvas_height as f64);
    let mut out_people = Vec::with_capacity(raw_people.len());
    for (pi, p) in raw_people.iter().enumerate() {
        let convert = |raw: &Raw, what: &str| -> Result<Keypoints, PoseError> {
            raw.iter()
                .enumerate()
                .map(|(ki, kp)| {
                    let Some((x, y)) = kp else { return Ok(None) };
                    let (px, py) = ((x * sx) as f32, (y * sy) as f32);
                    if !px.is_finite() || !py.is_finite() {
                        return Err(PoseError::new(format!(
                            "people[{pi}] {what} keypoint {ki} has a non-finite coordinate; use finite numbers"
                        )));
                    }
                    let (fx, fy) = (px as f64, py as f64);
                    let (mx, my) = (OUTSIDE_TOLERANCE * w, OUTSIDE_TOLERANCE * h);
                    if fx < -mx || fx > w + mx || fy < -my || fy > h + my {
                        let name = if what == "pose" && ki < 18 {
                            format!(" ({})", BODY_PART_NAMES[ki])
                        } else {
                            String::new()
                        };
                        return Err(PoseError::new(format!(
                            "people[{pi}] {what} keypoint {ki}{name} at ({fx}, {fy}) px lies outside the \
                             {canvas_width}x{canvas_height} canvas by more than {}%; fix the coordinates, set \
                             canvas_width/canvas_height to the size they were measured on, or mark the point \
                             missing with confidence 0",
                            (OUTSIDE_TOLERANCE * 100.0) as u32
                        )));
                    }
                    Ok(Some((px, py)))
                })
                .collect()
        };
        out_people.push(Person {
            body: convert(&p.body, "pose")?,
            left_hand: p
                .left_hand
                .as_ref()
                .map(|r| convert(r, "left hand"))
                .transpose()?,
            right_hand: p
                .right_hand
                .as_ref()
                .map(|r| convert(r, "right hand"))
                .transpose()?,
            face: p.face.as_ref().map(|r| convert(r, "face")).transpose()?,
        });
    }
    Ok(PoseKeypoints {
        canvas_width,
        canvas_height,
        people: out_people,
    })
}

fn parts(p: &RawPerson) -> impl Iterator<Item = &Raw> {
    std::iter::once(&p.body)
        .chain(p.left_hand.iter())
        .chain(p.right_hand.iter())
        .chain(p.face.iter())
}

fn canvas_size(
    obj: &serde_json::Map<String, Value>,
    default_size: Option<(usize, usize)>,
) -> Result<(usize, usize), PoseError> {
    let dim = |key: &str| -> Result<Option<usize>, PoseError> {
        match obj.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => {
                let n = v
                    .as_f64()
                    .filter(|f| f.fract() == 0.0 && *f >= 1.0 && *f <= MAX_CANVAS as f64);
                match n {
                    Some(f) => Ok(Some(f as usize)),
                    None => Err(PoseError::new(format!(
                        "\"{key}\" must be a whole number of pixels between 1 and {MAX_CANVAS}; got {v}"
                    ))),
                }
            }
        }
    };
    match (dim("canvas_width")?, dim("canvas_height")?) {
        (Some(w), Some(h)) => Ok((w, h)),
        (None, None) => match default_size {
            Some((w, h)) if w >= 1 && h >= 1 => Ok((w, h)),
            _ => Err(PoseError::new(
                "the pose JSON has no \"canvas_width\"/\"canvas_height\"; add the size of the image the \
                 keypoints were measured on",
            )),
        },
        _ => Err(PoseError::new(
            "the pose JSON has only one of \"canvas_width\"/\"canvas_height\"; give both",
        )),
    }
}

/// Reads an optional flat number array. `Ok(None)` when absent or `null`.
fn read_numbers(v: Option<&Value>, pi: usize, key: &str) -> Result<Option<Vec<f64>>, PoseError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, item)| match item.as_f64() {
                Some(f) if f.is_finite() && (f as f32).is_finite() => Ok(f),
                Some(_) => Err(PoseError::new(format!(
                    "people[{pi}].{key}[{i}] is not a finite number; use finite coordinates"
                ))),
                None => Err(PoseError::new(format!(
                    "people[{pi}].{key}[{i}] is {item}, not a number; the array must be flat x,y,c numbers"
                ))),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some),
        Some(other) => Err(PoseError::new(format!(
            "people[{pi}].{key} must be a flat array of x,y,c numbers; got {other}"
        ))),
    }
}

/// Flat x,y,c numbers (length a multiple of 3) → points, confidence ≤ 0 = missing.
fn triples(v: &[f64]) -> Raw {
    v.chunks_exact(3)
        .map(|t| if t[2] > 0.0 { Some((t[0], t[1])) } else { None })
        .collect()
}
