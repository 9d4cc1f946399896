//! GGUF files (the llama.cpp / ggml container, spec `ggml/docs/gguf.md`): header, metadata and the tensor table,
//! parsed with every length checked against the file size, so a truncated or foreign file is an error naming the
//! file (and the tensor) rather than a panic or a huge allocation.
//!
//! Layout: `GGUF` magic, version (2 or 3), tensor count, metadata count, metadata key/values, tensor infos
//! (`name`, dims innermost first, ggml type id, offset), then tensor data starting at the next multiple of
//! `general.alignment` (32 by default). Tensor data is read on demand with positioned reads (no mmap), so the
//! bytes are copied once into their final storage and nothing of the file stays mapped in the process.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::quantized::GgmlDType;
use candle_core::{Result, Shape};

use super::err;

/// `GGUF` read as a little-endian u32.
const GGUF_MAGIC: u32 = 0x4655_4747;
/// Default `general.alignment` (gguf.md: "If not specified, the alignment is 32").
const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml's `GGML_MAX_DIMS`.
const MAX_DIMS: u32 = 4;

/// One metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U64(u64),
    I64(i64),
    F64(f64),
    Bool(bool),
    Str(String),
    Array(Vec<Value>),
}

impl Value {
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U64(v) => Some(v),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F64(v) => Some(v),
            Value::U64(v) => Some(v as f64),
            Value::I64(v) => Some(v as f64),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
}

/// A ggml tensor type id with its name and block geometry (ggml.h `ggml_type`, gguf-py `GGML_QUANT_SIZES`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GgmlType {
    pub id: u32,
    pub name: &'static str,
    /// Elements per block.
    pub block: usize,
    /// Bytes per block.
    pub bytes: usize,
}

/// Every type id ggml defines today (ids 4, 5 and 31-33 were removed upstream).
const GGML_TYPES: &[GgmlType] = &[
    t(0, "F32", 1, 4),
    t(1, "F16", 1, 2),
    t(2, "Q4_0", 32, 18),
    t(3, "Q4_1", 32, 20),
    t(6, "Q5_0", 32, 22),
    t(7, "Q5_1", 32, 24),
    t(8, "Q8_0", 32, 34),
    t(9, "Q8_1", 32, 36),
    t(10, "Q2_K", 256, 84),
    t(11, "Q3_K", 256, 110),
    t(12, "Q4_K", 256, 144),
    t(13, "Q5_K", 256, 176),
    t(14, "Q6_K", 256, 210),
    t(15, "Q8_K", 256, 292),
    t(16, "IQ2_XXS", 256, 66),
    t(17, "IQ2_XS", 256, 74),
    t(18, "IQ3_XXS", 256, 98),
    t(19, "IQ1_S", 256, 50),
    t(20, "IQ4_NL", 32, 18),
    t(21, "IQ3_S", 256, 110),
    t(22, "IQ2_S", 256, 82),
    t(23, "IQ4_XS", 256, 136),
    t(24, "I8", 1, 1),
    t(25, "I16", 1, 2),
    t(26, "I32", 1, 4),
    t(27, "I64", 1, 8),
    t(28, "F64", 1, 8),
    t(29, "IQ1_M", 256, 56),
    t(30, "BF16", 1, 2),
    t(34, "TQ1_0", 256, 54),
    t(35, "TQ2_0", 256, 66),
    t(39, "MXFP4", 32, 17),
];

const fn t(id: u32, name: &'static str, block: usize, bytes: usize) -> GgmlType {
    GgmlType {
        id,
        name,
        block,
        bytes,
    }
}

impl GgmlType {
    pub fn from_id(id: u32) -> Option<Self> {
        GGML_TYPES.iter().copied().find(|t| t.id == id)
    }

    /// The candle type that loads this tensor, for the types whose weights this server computes with (candle
    /// 0.11 implements these; `Q8_1`/`Q8_K` are only activation formats in ggml, the IQ/TQ/MXFP4 families
    /// have no candle kernels).
    pub fn candle(&self) -> Option<GgmlDType> {
        Some(match self.id {
            0 => GgmlDType::F32,
            1 => GgmlDType::F16,
            30 => GgmlDType::BF16,
            2 => GgmlDType::Q4_0,
            3 => GgmlDType::Q4_1,
            6 => GgmlDType::Q5_0,
            7 => GgmlDType::Q5_1,
            8 => GgmlDType::Q8_0,
            10 => GgmlDType::Q2K,
            11 => GgmlDType::Q3K,
            12 => GgmlDType::Q4K,
            13 => GgmlDType::Q5K,
            14 => GgmlDType::Q6K,
            _ => return None,
        })
    }

    /// Names of the types [`GgmlType::candle`] accepts, for error messages.
    pub fn supported_names() -> String {
        GGML_TYPES
            .iter()
            .filter(|t| t.candle().is_some())
            .map(|t| t.name)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// One entry of the tensor table.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    /// PyTorch order (outermost first): the GGUF dims reversed.
    pub shape: Vec<usize>,
    /// The raw type id (known or not).
    pub type_id: u32,
    /// Absolute byte offset of the data in the file.
    pub start: u64,
    /// Data size in bytes (`None` for an unknown type id).
    pub len: Option<u64>,
}

impl TensorInfo {
    pub fn ggml_type(&self) -> Option<GgmlType> {
        GgmlType::from_id(self.type_id)
    }

    pub fn type_name(&self) -> String {
        self.ggml_type()
            .map(|t| t.name.to_string())
            .unwrap_or_else(|| format!("unknown ggml type {}", self.type_id))
    }
}

/// An open GGUF file: metadata and tensor table in memory, data read on demand.
pub struct GgufFile {
    path: PathBuf,
    file: Mutex<std::fs::File>,
    metadata: BTreeMap<String, Value>,
    tensors: Vec<TensorInfo>,
    index: HashMap<String, usize>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("tensors", &self.tensors.len())
            .finish_non_exhaustive()
    }
}

/// A reader that knows its position and the file size, so every length is checked before it is trusted.
struct Header<'a> {
    r: BufReader<&'a std::fs::File>,
    pos: u64,
    size: u64,
    path: &'a Path,
}

impl Header<'_> {
    fn truncated(&self, what: &str) -> candle_core::Error {
        err(format!(
            "{}: truncated or corrupt GGUF header while reading {what} (at byte {} of {})",
            self.path.display(),
            self.pos,
            self.size
        ))
    }

    fn bytes<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let mut b = [0u8; N];
        self.r
            .read_exact(&mut b)
            .map_err(|_| self.truncated(what))?;
        self.pos += N as u64;
        Ok(b)
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.bytes::<4>(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.bytes::<8>(what)?))
    }

    /// A count whose items take at least `min_item` bytes each: larger than the rest of the file is corrupt.
    fn count(&mut self, what: &str, min_item: u64) -> Result<u64> {
        let n = self.u64(what)?;
        if n.saturating_mul(min_item.max(1)) > self.size.saturating_sub(self.pos) {
            return Err(self.truncated(what));
        }
        Ok(n)
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.count(what, 1)?;
        let mut buf = vec![0u8; n as usize];
        self.r
            .read_exact(&mut buf)
            .map_err(|_| self.truncated(what))?;
        self.pos += n;
        String::from_utf8(buf).map_err(|_| self.truncated(&format!("{what} (not UTF-8)")))
    }

    /// gguf.md `gguf_metadata_value_type`.
    fn value(&mut self, ty: u32, what: &str, depth: usize) -> Result<Value> {
        Ok(match ty {
            0 => Value::U64(self.bytes::<1>(what)?[0] as u64),
            1 => Value::I64(self.bytes::<1>(what)?[0] as i8 as i64),
            2 => Value::U64(u16::from_le_bytes(self.bytes::<2>(what)?) as u64),
            3 => Value::I64(i16::from_le_bytes(self.bytes::<2>(what)?) as i64),
            4 => Value::U64(self.u32(what)? as u64),
            5 => Value::I64(i32::from_le_bytes(self.bytes::<4>(what)?) as i64),
            6 => Value::F64(f32::from_le_bytes(self.bytes::<4>(what)?) as f64),
            7 => Value::Bool(self.bytes::<1>(what)?[0] != 0),
            8 => Value::Str(self.string(what)?),
            9 => {
                if depth > 4 {
                    return Err(self.truncated(&format!("{what} (arrays nested too deep)")));
                }
                let item_ty = self.u32(what)?;
                let n = self.count(what, 1)?;
                let mut items = Vec::with_capacity((n as usize).min(1 << 16));
                for _ in 0..n {
                    items.push(self.value(item_ty, what, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64(what)?),
            11 => Value::I64(i64::from_le_bytes(self.bytes::<8>(what)?)),
            12 => Value::F64(f64::from_le_bytes(self.bytes::<8>(what)?)),
            other => {
                return Err(self.truncated(&format!("{what} (unknown value type {other})")));
            }
        })
    }
}

impl GgufFile {
    /// Parses the header of `path`. Errors name the file; a tensor whose data would end past the end of the
    /// file is reported by name (a truncated download).
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path)
            .map_err(|e| err(format!("cannot open {}: {e}", path.display())))?;
        let size = file
            .metadata()
            .map_err(|e| err(format!("cannot stat {}: {e}", path.display())))?
            .len();
        let mut h = Header {
            r: BufReader::with_capacity(1 << 20, &file),
            pos: 0,
            size,
            path,
        };
        let magic = h.u32("the magic number")?;
        if magic != GGUF_MAGIC {
            return Err(err(format!(
                "{}: not a GGUF file (magic {:02x?}, expected \"GGUF\")",
                path.display(),
                magic.to_le_bytes()
            )));
        }
        let version = h.u32("the version")?;
        if !(2..=3).contains(&version) {
            return Err(err(format!(
                "{}: GGUF version {version} is not supported (2 or 3)",
                path.display()
            )));
        }
        // minimum sizes: a tensor info is >= 8 (name len) + 4 + 4 + 8 bytes, a key/value >= 8 + 4 + 1
        let n_tensors = h.count("the tensor count", 24)?;
        let n_kv = h.count("the metadata count", 13)?;
        let mut metadata = BTreeMap::new();
        for i in 0..n_kv {
            let key = h.string(&format!("metadata key #{i}"))?;
            let ty = h.u32(&format!("the type of metadata `{key}`"))?;
            let v = h.value(ty, &format!("metadata `{key}`"), 0)?;
            metadata.insert(key, v);
        }
        let mut raw = Vec::with_capacity(n_tensors as usize);
        for i in 0..n_tensors {
            let name = h.string(&format!("tensor name #{i}"))?;
            let what = format!("the info of tensor `{name}`");
            let n_dims = h.u32(&what)?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(err(format!(
                    "{}: tensor `{name}` has {n_dims} dimensions (1..={MAX_DIMS} allowed)",
                    path.display()
                )));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(h.u64(&what)? as usize);
            }
            let type_id = h.u32(&what)?;
            let offset = h.u64(&what)?;
            dims.reverse(); // GGUF lists ne[0] (innermost) first
            raw.push((name, dims, type_id, offset));
        }
        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => match v.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() => a,
                _ => {
                    return Err(err(format!(
                        "{}: general.alignment {v:?} is not a power of two",
                        path.display()
                    )));
                }
            },
        };
        let data_start = h.pos.div_ceil(alignment) * alignment;
        let mut tensors = Vec::with_capacity(raw.len());
        let mut index = HashMap::with_capacity(raw.len());
        for (name, shape, type_id, offset) in raw {
            let start = data_start.checked_add(offset).ok_or_else(|| {
                err(format!(
                    "{}: tensor `{name}` has an impossible offset {offset}",
                    path.display()
                ))
            })?;
            let len = match GgmlType::from_id(type_id) {
                None => None,
                Some(ty) => Some(data_len(path, &name, &shape, ty)?),
            };
            if let Some(len) = len {
                if start.saturating_add(len) > size {
                    return Err(err(format!(
                        "{}: file is truncated: tensor `{name}` ({}, shape {shape:?}) needs bytes {start}..{} but \
                         the file has {size} bytes",
                        path.display(),
                        GgmlType::from_id(type_id).map(|t| t.name).unwrap_or("?"),
                        start + len
                    )));
                }
            }
            if index.insert(name.clone(), tensors.len()).is_some() {
                return Err(err(format!(
                    "{}: tensor `{name}` appears twice",
                    path.display()
                )));
            }
            tensors.push(TensorInfo {
                name,
                shape,
                type_id,
                start,
                len,
            });
        }
        drop(h);
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

    pub fn metadata(&self) -> &BTreeMap<String, Value> {
        &self.metadata
    }

    /// `general.architecture`, when present.
    pub fn architecture(&self) -> Option<&str> {
        self.metadata
            .get("general.architecture")
            .and_then(Value::as_str)
    }

    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.index.get(name).map(|&i| &self.tensors[i])
    }

    /// The data size of `info`, or an error naming the tensor's type when ggml defines no size for it here.
    pub fn data_len(&self, info: &TensorInfo) -> Result<u64> {
        info.len.ok_or_else(|| {
            err(format!(
                "{}: tensor `{}` has {}; supported: {}",
                self.path.display(),
                info.name,
                info.type_name(),
                GgmlType::supported_names()
            ))
        })
    }

    /// Bytes `range` (relative to the start of the tensor's data) of tensor `info`.
    pub fn read(&self, info: &TensorInfo, range: std::ops::Range<u64>) -> Result<Vec<u8>> {
        let len = self.data_len(info)?;
        super::read_tensor_bytes(&self.path, &self.file, &info.name, info.start, len, range)
    }
}

/// Bytes of a tensor of `shape` in `ty`; rows must hold whole blocks.
fn data_len(path: &Path, name: &str, shape: &[usize], ty: GgmlType) -> Result<u64> {
    let inner = shape.last().copied().unwrap_or(1);
    let elems = Shape::from(shape.to_vec()).elem_count();
    if inner % ty.block != 0 {
        return Err(err(format!(
            "{}: tensor `{name}` ({}, shape {shape:?}) has rows of {inner} values, not a multiple of the {} block",
            path.display(),
            ty.name,
            ty.block
        )));
    }
    (elems / ty.block)
        .checked_mul(ty.bytes)
        .map(|b| b as u64)
        .ok_or_else(|| {
            err(format!(
                "{}: tensor `{name}` shape {shape:?} is too large",
                path.display()
            ))
        })
}
