//! The public message limit, sized to the largest legal request rather than a round number: the
//! gateway reads a whole request before validating it, so this bounds what one caller can make it hold.
//!
//! The largest legal request is an `Edit` with [`MAX_PICTURES`] pictures of [`MAX_PICTURE_BYTES`] each
//! (no other request carries more pictures: inpaint has an image and a mask, pose one picture or the
//! keypoints JSON), its prompt and negative prompt, plus the protobuf framing. A larger message gets
//! OUT_OF_RANGE from tonic (HTTP: 413) before any work is done. Answers are bounded separately
//! ([`qwen_image_common::limits::MAX_MESSAGE_BYTES`]: up to [`crate::request::settings::MAX_IMAGES`]
//! PNGs of 2048x2048).

use crate::images::MAX_PICTURE_BYTES;
use crate::request::instruct::MAX_PICTURES;
use crate::request::pose::MAX_KEYPOINTS_JSON_BYTES;
use crate::request::settings::MAX_PROMPT_BYTES;

/// Protobuf field tags and lengths, the other settings' scalars and the model name: far above what they
/// take.
const FRAMING_BYTES: usize = 64 << 10;

/// Largest public request message (gRPC) or body (HTTP) the gateway accepts: about 100 MiB.
pub const MAX_REQUEST_BYTES: usize = {
    let pictures = MAX_PICTURES * MAX_PICTURE_BYTES;
    // A pose request carries one picture or the keypoints JSON; counting both is a bound.
    let largest = if pictures > MAX_PICTURE_BYTES + MAX_KEYPOINTS_JSON_BYTES {
        pictures
    } else {
        MAX_PICTURE_BYTES + MAX_KEYPOINTS_JSON_BYTES
    };
    largest + 2 * MAX_PROMPT_BYTES + FRAMING_BYTES
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_limit_holds_the_largest_legal_request_and_is_below_the_old_round_number() {
        assert!(MAX_REQUEST_BYTES >= MAX_PICTURES * MAX_PICTURE_BYTES + 2 * MAX_PROMPT_BYTES);
        assert!(MAX_REQUEST_BYTES < qwen_image_common::limits::MAX_MESSAGE_BYTES);
    }
}
