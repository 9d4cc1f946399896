//! safetensors files (`huggingface/safetensors` format: an 8-byte little-endian header length, a JSON header
//! `{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {..}}`, then the data), parsed with every
//! offset checked against the file size. Data is read on demand with positioned reads.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::{DType, Result};

use super::err;

/// safetensors' own limit on the JSON header (`MAX_HEADER_SIZE`, 100 MB).
const MAX_HEADER: u64 = 100_000_000;

/// One tensor of the file.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    /// The dtype string of the header (`F32`, `BF16`, `F8_E4M3`, ...).
    pub dtype: String,
    pub shape: Vec<usize>,
    /// Absolute byte offset of the data in the file.
    pub start: u64,
    pub len: u64,
}

impl TensorInfo {
    /// The candle dtype of the data, when candle has one.
    pub fn candle_dtype(&self) -> Option<DType> {
        Some(match self.dtype.as_str() {
            "F32" => DType::F32,
            "F16" => DType::F16,
            "BF16" => DType::BF16,
            "F64" => DType::F64,
            "F8_E4M3" => DType::F8E4M3,
            "U8" | "BOOL" => DType::U8,
            "U32" => DType::U32,
            "I16" => DType::I16,
            "I32" => DType::I32,
            "I64" => DType::I64,
            _ => return None,
        })
    }
}

/// Element size of a safetensors dtype string (`None` for sub-byte or unknown types).
fn dtype_size(dtype: &str) -> Option<usize> {
    Some(match dtype {
        "BOOL" | "U8" | "I8" | "F8_E4M3" | "F8_E5M2" | "F8_E8M0" => 1,
        "U16" | "I16" | "F16" | "BF16" => 2,
        "U32" | "I32" | "F32" => 4,
        "U64" | "I64" | "F64" => 8,
        _ => return None,
    })
}

#[derive(serde::Deserialize)]
struct Entry {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: (u64, u64),
}

/// An open safetensors file: header in memory, data read on demand.
pub struct SafetensorsFile {
    path: PathBuf,
    file: Mutex<std::fs::File>,
    metadata: BTreeMap<String, String>,
    tensors: Vec<TensorInfo>,
    index: HashMap<String, usize>,
}

impl std::fmt::Debug for SafetensorsFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SafetensorsFile")
            .field("path", &self.path)
            .field("tensors", &self.tensors.len())
            .finish_non_exhaustive()
    }
}

impl SafetensorsFile {
    /// Parses the header of `path`; a tensor whose data would end past the end of the file (a truncated
    /// download) is reported by name.
    pub fn open(path: &Path) -> Result<Self> {
        let bad = |what: String| {
            err(format!(
                "{}: not a valid safetensors file: {what}",
                path.display()
            ))
        };
        let mut file = std::fs::File::open(path)
            .map_err(|e| err(format!("cannot open {}: {e}", path.display())))?;
        let size = file
            .metadata()
            .map_err(|e| err(format!("cannot stat {}: {e}", path.display())))?
            .len();
        let mut len8 = [0u8; 8];
        file.read_exact(&mut len8)
            .map_err(|_| bad(format!("{size} bytes is too short for a header")))?;
        let n = u64::from_le_bytes(len8);
        if n > MAX_HEADER || n > size.saturating_sub(8) {
            return Err(bad(format!(
                "header length {n} does not fit the file ({size} bytes)"
            )));
        }
        let mut header = vec![0u8; n as usize];
        file.read_exact(&mut header)
            .map_err(|e| bad(format!("cannot read the header: {e}")))?;
        let json: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&header)
            .map_err(|e| bad(format!("header is not a JSON object: {e}")))?;
        let data_start = 8 + n;
        let mut metadata = BTreeMap::new();
        let mut tensors = Vec::with_capacity(json.len());
        for (name, v) in json {
            if name == "__metadata__" {
                if let Some(m) = v.as_object() {
                    for (k, v) in m {
                        if let Some(s) = v.as_str() {
                            metadata.insert(k.clone(), s.to_string());
                        }
                    }
                }
                continue;
            }
            let e: Entry = serde_json::from_value(v)
                .map_err(|e| bad(format!("entry of tensor `{name}`: {e}")))?;
            let (begin, end) = e.data_offsets;
            let elems: usize = e.shape.iter().product();
            if let Some(sz) = dtype_size(&e.dtype) {
                if end < begin || (end - begin) != (elems * sz) as u64 {
                    return Err(bad(format!(
                        "tensor `{name}` ({} {:?}) has data_offsets [{begin}, {end}], expected {} bytes",
                        e.dtype,
                        e.shape,
                        elems * sz
                    )));
                }
            }
            if data_start.saturating_add(end) > size {
                return Err(err(format!(
                    "{}: file is truncated: tensor `{name}` ({}, shape {:?}) needs bytes {}..{} but the file has \
                     {size} bytes",
                    path.display(),
                    e.dtype,
                    e.shape,
                    data_start + begin,
                    data_start + end
                )));
            }
            tensors.push(TensorInfo {
                name,
                dtype: e.dtype,
                shape: e.shape,
                start: data_start + begin,
                len: end - begin,
            });
        }
        tensors.sort_by_key(|t| t.start);
        let index = tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        Ok(Self {
            path: path.to_path_buf(),
            file: Mutex::new(file),
            metadata,
            tensors,
            index,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The `__metadata__` string map.
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.index.get(name).map(|&i| &self.tensors[i])
    }

    /// Bytes `range` (relative to the start of the tensor's data) of tensor `info`.
    pub fn read(&self, info: &TensorInfo, range: std::ops::Range<u64>) -> Result<Vec<u8>> {
        super::read_tensor_bytes(
            &self.path, &self.file, &info.name, info.start, info.len, range,
        )
    }
}
