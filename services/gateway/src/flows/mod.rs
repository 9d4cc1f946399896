//! The flows of the public API, siblings over the shared steps of [`crate::pipeline`]: none uses another.

pub mod cn_inpaint;
pub mod edit;
pub mod instruct;
pub mod pose;
pub mod t2i;
