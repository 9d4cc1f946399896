//! `qwen_image.v1.Tensor` <-> host tensors, with the checks every receiver makes (dtype, rank, shape, byte
//! length). Errors name the field and say what to change; services answer them with INVALID_ARGUMENT.

use bytes::Bytes;
use qwen_image_proto::v1::{DataType, Tensor};

use crate::limits::MAX_TENSOR_ELEMENTS;

/// A tensor problem the caller can fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{field}`: {problem}")]
pub struct TensorError {
    pub field: String,
    pub problem: String,
}

impl TensorError {
    pub fn new(field: &str, problem: impl Into<String>) -> Self {
        Self {
            field: field.to_string(),
            problem: problem.into(),
        }
    }
}

/// Bytes per element; `None` for UNSPECIFIED.
pub fn element_size_bytes(dtype: DataType) -> Option<usize> {
    match dtype {
        DataType::Unspecified => None,
        DataType::F32 => Some(4),
        DataType::F16 | DataType::Bf16 => Some(2),
        DataType::U8 => Some(1),
        DataType::I64 => Some(8),
    }
}

/// A decoded host tensor: row-major `data` of `shape`.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor<T> {
    pub shape: Vec<usize>,
    pub data: Vec<T>,
}

impl<T> HostTensor<T> {
    pub fn rank(&self) -> usize {
        self.shape.len()
    }
}

/// The required tensor `field`, or an error saying it is missing.
pub fn required<'a>(t: Option<&'a Tensor>, field: &str) -> Result<&'a Tensor, TensorError> {
    t.ok_or_else(|| TensorError::new(field, "is required but was not set"))
}

/// Checks dtype (one of `dtypes`), rank (one of `ranks`), element count and byte length; returns the
/// dtype and shape.
pub fn check(
    t: &Tensor,
    field: &str,
    dtypes: &[DataType],
    ranks: &[usize],
) -> Result<(DataType, Vec<usize>), TensorError> {
    let names = || {
        dtypes
            .iter()
            .map(|d| d.as_str_name())
            .collect::<Vec<_>>()
            .join(" or ")
    };
    let dtype = DataType::try_from(t.dtype).map_err(|_| {
        TensorError::new(
            field,
            format!("unknown dtype value {}; send {}", t.dtype, names()),
        )
    })?;
    if !dtypes.contains(&dtype) {
        return Err(TensorError::new(
            field,
            format!(
                "dtype {} is not accepted; send {}",
                dtype.as_str_name(),
                names()
            ),
        ));
    }
    if !ranks.contains(&t.shape.len()) {
        return Err(TensorError::new(
            field,
            format!(
                "rank {} (shape {:?}) is not accepted; send a tensor of rank {}",
                t.shape.len(),
                t.shape,
                join(ranks)
            ),
        ));
    }
    let shape: Vec<usize> = t
        .shape
        .iter()
        .map(|&d| {
            usize::try_from(d)
                .map_err(|_| TensorError::new(field, format!("dimension {d} is too large")))
        })
        .collect::<Result<_, _>>()?;
    let elements = shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .filter(|&n| n <= MAX_TENSOR_ELEMENTS)
        .ok_or_else(|| {
            TensorError::new(
                field,
                format!("shape {shape:?} has more than {MAX_TENSOR_ELEMENTS} elements"),
            )
        })?;
    // element_size_bytes is Some for every accepted dtype: UNSPECIFIED has no size and is never listed.
    let size =
        element_size_bytes(dtype).ok_or_else(|| TensorError::new(field, "dtype must be set"))?;
    let want = elements * size;
    if t.data.len() != want {
        return Err(TensorError::new(
            field,
            format!(
                "data holds {} bytes but shape {shape:?} of {} needs {want} bytes (little-endian, contiguous)",
                t.data.len(),
                dtype.as_str_name()
            ),
        ));
    }
    Ok((dtype, shape))
}

fn join(v: &[usize]) -> String {
    v.iter()
        .map(|r| r.to_string())
        .collect::<Vec<_>>()
        .join(" or ")
}

/// Largest magnitude accepted in a float tensor. Latents are unit-variance noise or normalised image
/// latents, prompt embeddings are normed hidden states (at most a few hundred); values near f32::MAX (1e30
/// latents) only make the model's output NaN.
pub const MAX_ABS_VALUE: f32 = 1e6;

/// Decodes to f32 after [`check`]. F16/BF16/U8/I64 are widened; non-finite floats and magnitudes above
/// [`MAX_ABS_VALUE`] are rejected.
pub fn to_f32(
    t: &Tensor,
    field: &str,
    dtypes: &[DataType],
    ranks: &[usize],
) -> Result<HostTensor<f32>, TensorError> {
    let (dtype, shape) = check(t, field, dtypes, ranks)?;
    let d = &t.data;
    let data: Vec<f32> = match dtype {
        DataType::F32 => d
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        DataType::F16 => d
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        DataType::Bf16 => d
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        DataType::U8 => d.iter().map(|&b| f32::from(b)).collect(),
        DataType::I64 => d
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32)
            .collect(),
        DataType::Unspecified => return Err(TensorError::new(field, "dtype must be set")),
    };
    if let Some(i) = data.iter().position(|v| !v.is_finite()) {
        return Err(TensorError::new(
            field,
            format!("element {i} is not finite; send finite values"),
        ));
    }
    if let Some(i) = data.iter().position(|v| v.abs() > MAX_ABS_VALUE) {
        return Err(TensorError::new(
            field,
            format!(
                "element {i} is {}; send values within ±{MAX_ABS_VALUE:e}",
                data[i]
            ),
        ));
    }
    Ok(HostTensor { shape, data })
}

/// Decodes a U8 tensor after [`check`].
pub fn to_u8(t: &Tensor, field: &str, ranks: &[usize]) -> Result<HostTensor<u8>, TensorError> {
    let (_, shape) = check(t, field, &[DataType::U8], ranks)?;
    Ok(HostTensor {
        shape,
        data: t.data.to_vec(),
    })
}

/// Checks that `shape[axis] == expected`, naming the axis for the caller.
pub fn expect_dim(
    field: &str,
    shape: &[usize],
    axis: usize,
    what: &str,
    expected: usize,
) -> Result<(), TensorError> {
    match shape.get(axis) {
        Some(&d) if d == expected => Ok(()),
        Some(&d) => Err(TensorError::new(
            field,
            format!("dimension {axis} ({what}) is {d} but must be {expected} (shape {shape:?})"),
        )),
        None => Err(TensorError::new(
            field,
            format!("has no dimension {axis} ({what}); shape {shape:?}"),
        )),
    }
}

/// Checks every element is 0 or 1 (attention / inpaint masks).
pub fn expect_binary(field: &str, data: &[f32]) -> Result<(), TensorError> {
    match data.iter().position(|&v| v != 0.0 && v != 1.0) {
        None => Ok(()),
        Some(i) => Err(TensorError::new(
            field,
            format!("element {i} is {}; mask values must be 0 or 1", data[i]),
        )),
    }
}

/// Encodes f32 data of `shape` (row-major). The caller guarantees `data.len() == product(shape)`.
pub fn from_f32(shape: &[usize], data: &[f32]) -> Tensor {
    let mut bytes = Vec::with_capacity(data.len() * 4);
    for v in data {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    Tensor {
        dtype: DataType::F32 as i32,
        shape: shape.iter().map(|&d| d as u64).collect(),
        data: Bytes::from(bytes),
    }
}

/// Encodes u8 data of `shape` (row-major).
pub fn from_u8(shape: &[usize], data: Vec<u8>) -> Tensor {
    Tensor {
        dtype: DataType::U8 as i32,
        shape: shape.iter().map(|&d| d as u64).collect(),
        data: Bytes::from(data),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const F32: &[DataType] = &[DataType::F32];

    #[test]
    fn f32_round_trip() {
        let t = from_f32(&[2, 3], &[1.0, -2.0, 3.5, 0.0, 5.0, 6.25]);
        let h = to_f32(&t, "x", F32, &[2]).expect("valid");
        assert_eq!(h.shape, vec![2, 3]);
        assert_eq!(h.data, vec![1.0, -2.0, 3.5, 0.0, 5.0, 6.25]);
    }

    #[test]
    fn u8_round_trip() {
        let t = from_u8(&[1, 4], vec![0, 1, 255, 7]);
        assert_eq!(
            to_u8(&t, "m", &[2]).expect("valid").data,
            vec![0, 1, 255, 7]
        );
    }

    #[test]
    fn half_and_int_widen() {
        let mut data = Vec::new();
        data.extend_from_slice(&half::bf16::from_f32(1.5).to_le_bytes());
        let t = Tensor {
            dtype: DataType::Bf16 as i32,
            shape: vec![1],
            data: data.into(),
        };
        assert_eq!(
            to_f32(&t, "x", &[DataType::Bf16], &[1])
                .expect("valid")
                .data,
            vec![1.5]
        );
        let t = Tensor {
            dtype: DataType::I64 as i32,
            shape: vec![2],
            data: [1i64.to_le_bytes(), 0i64.to_le_bytes()].concat().into(),
        };
        assert_eq!(
            to_f32(&t, "m", &[DataType::I64], &[1]).expect("valid").data,
            vec![1.0, 0.0]
        );
    }

    #[test]
    fn errors_name_the_problem() {
        let t = from_f32(&[2, 2], &[0.0; 4]);
        let e = to_f32(&t, "x", &[DataType::F16], &[2]).expect_err("dtype");
        assert!(
            e.to_string()
                .contains("DATA_TYPE_F32 is not accepted; send DATA_TYPE_F16"),
            "{e}"
        );
        let e = to_f32(&t, "x", F32, &[3]).expect_err("rank");
        assert!(e.to_string().contains("rank 2"), "{e}");
        let mut short = t.clone();
        short.data = short.data.slice(..12);
        let e = to_f32(&short, "x", F32, &[2]).expect_err("bytes");
        assert!(e.to_string().contains("holds 12 bytes"), "{e}");
        let unspecified = Tensor {
            dtype: 0,
            ..t.clone()
        };
        assert!(to_f32(&unspecified, "x", F32, &[2]).is_err());
        let unknown = Tensor {
            dtype: 99,
            ..t.clone()
        };
        assert!(to_f32(&unknown, "x", F32, &[2]).is_err());
        let huge = Tensor {
            shape: vec![u64::MAX, 2],
            ..t.clone()
        };
        assert!(to_f32(&huge, "x", F32, &[2]).is_err());
        let nan = from_f32(&[1], &[f32::NAN]);
        assert!(to_f32(&nan, "x", F32, &[1]).is_err());
        assert!(expect_dim("x", &[1, 2], 1, "width", 3).is_err());
        assert!(expect_binary("m", &[0.0, 1.0, 0.5]).is_err());
        assert!(required(None, "x").is_err());
    }
}
