//! The tensors of one component, from one or more safetensors or GGUF files, under the names the model code
//! uses (after a renaming such as stripping ComfyUI's `model.diffusion_model.` prefix).
//!
//! Dense tensors are converted to the stage dtype at load. Linear weights stored in fewer bits (ggml blocks,
//! fp8 e4m3fn) are kept as stored and split into row parts ([`super::packed`]). Every tensor handed to the
//! model is recorded in a [`MemoryReport`].

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{DType, Device, Result, Tensor};

use super::err;
use super::gguf::{self, GgmlType, GgufFile};
use super::packed::{PART_ELEMS, Part};
use super::report::MemoryReport;
use super::safetensors::SafetensorsFile;

/// A renaming from the file's tensor names to the model's (`None` drops the tensor).
pub type Naming<'a> = &'a dyn Fn(&str) -> Option<String>;

/// One weight file.
#[derive(Debug)]
pub enum TensorFile {
    Safetensors(SafetensorsFile),
    Gguf(GgufFile),
}

/// How a tensor's values are encoded in its file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Encoding {
    /// Plain values candle reads (`F32`, `BF16`, `F8_E4M3`, `U8`, ...).
    Plain(DType),
    /// ggml blocks of a type candle computes with.
    Ggml(GgmlType, GgmlDType),
    /// A type this server cannot compute with (its name).
    Unsupported(String),
}

/// Shape and encoding of one stored tensor.
#[derive(Debug, Clone)]
pub struct StoredInfo {
    pub shape: Vec<usize>,
    pub encoding: Encoding,
}

impl TensorFile {
    /// Opens `path` as GGUF when it starts with the `GGUF` magic, as safetensors otherwise.
    pub fn open(path: &Path) -> Result<Self> {
        use std::io::Read;
        let mut magic = [0u8; 4];
        let is_gguf = std::fs::File::open(path)
            .and_then(|mut f| f.read_exact(&mut magic))
            .map(|_| &magic == b"GGUF")
            .unwrap_or(false);
        if is_gguf {
            Ok(Self::Gguf(GgufFile::open(path)?))
        } else {
            Ok(Self::Safetensors(SafetensorsFile::open(path)?))
        }
    }

    pub fn path(&self) -> &Path {
        match self {
            Self::Safetensors(f) => f.path(),
            Self::Gguf(f) => f.path(),
        }
    }

    pub fn names(&self) -> Vec<&str> {
        match self {
            Self::Safetensors(f) => f.tensors().iter().map(|t| t.name.as_str()).collect(),
            Self::Gguf(f) => f.tensors().iter().map(|t| t.name.as_str()).collect(),
        }
    }

    pub fn stored(&self, name: &str) -> Option<StoredInfo> {
        match self {
            Self::Safetensors(f) => f.info(name).map(|t| StoredInfo {
                shape: t.shape.clone(),
                encoding: match t.candle_dtype() {
                    Some(d) => Encoding::Plain(d),
                    None => Encoding::Unsupported(t.dtype.clone()),
                },
            }),
            Self::Gguf(f) => f.info(name).map(|t| StoredInfo {
                shape: t.shape.clone(),
                encoding: match t.ggml_type().and_then(|g| g.candle().map(|c| (g, c))) {
                    Some((_, GgmlDType::F32)) => Encoding::Plain(DType::F32),
                    Some((_, GgmlDType::F16)) => Encoding::Plain(DType::F16),
                    Some((_, GgmlDType::BF16)) => Encoding::Plain(DType::BF16),
                    Some((g, c)) => Encoding::Ggml(g, c),
                    None => Encoding::Unsupported(t.type_name()),
                },
            }),
        }
    }

    /// Bytes of one row (outermost index) of tensor `name`, and the row count.
    fn rows(&self, name: &str) -> Result<(u64, usize)> {
        let (len, shape) = match self {
            Self::Safetensors(f) => f
                .info(name)
                .map(|t| (Ok(t.len), t.shape.clone()))
                .ok_or_else(|| self.no_tensor(name))?,
            Self::Gguf(f) => f
                .info(name)
                .map(|t| (f.data_len(t), t.shape.clone()))
                .ok_or_else(|| self.no_tensor(name))?,
        };
        let len = len?;
        let rows = if shape.len() >= 2 { shape[0] } else { 1 };
        Ok((if rows == 0 { 0 } else { len / rows as u64 }, rows))
    }

    fn no_tensor(&self, name: &str) -> candle_core::Error {
        err(format!(
            "{}: tensor `{name}` is missing",
            self.path().display()
        ))
    }

    /// Rows `first..first + count` of tensor `name` (the whole tensor for rank < 2), as raw bytes in a buffer
    /// aligned for any ggml block type.
    fn read_rows(&self, name: &str, first: usize, count: usize) -> Result<AlignedBytes> {
        let (row, _) = self.rows(name)?;
        let range = row * first as u64..row * (first + count) as u64;
        let bytes = match self {
            Self::Safetensors(f) => {
                let info = f.info(name).ok_or_else(|| self.no_tensor(name))?;
                f.read(info, range)?
            }
            Self::Gguf(f) => {
                let info = f.info(name).ok_or_else(|| self.no_tensor(name))?;
                f.read(info, range)?
            }
        };
        Ok(AlignedBytes::from(bytes))
    }

    /// Read the whole tensor.
    fn read_all(&self, name: &str) -> Result<AlignedBytes> {
        let (_, rows) = self.rows(name)?;
        self.read_rows(name, 0, rows)
    }

    /// GGUF metadata (empty for safetensors).
    pub fn gguf_metadata(&self) -> Option<&BTreeMap<String, gguf::Value>> {
        match self {
            Self::Gguf(f) => Some(f.metadata()),
            Self::Safetensors(_) => None,
        }
    }

    /// safetensors `__metadata__` (empty for GGUF).
    pub fn safetensors_metadata(&self) -> Option<&BTreeMap<String, String>> {
        match self {
            Self::Safetensors(f) => Some(f.metadata()),
            Self::Gguf(_) => None,
        }
    }
}

/// Raw tensor bytes in 8-byte aligned storage (ggml block types need 2- or 4-byte alignment).
struct AlignedBytes {
    words: Vec<u64>,
    len: usize,
}

impl From<Vec<u8>> for AlignedBytes {
    fn from(bytes: Vec<u8>) -> Self {
        let mut words = vec![0u64; bytes.len().div_ceil(8)];
        bytemuck::cast_slice_mut::<u64, u8>(&mut words)[..bytes.len()].copy_from_slice(&bytes);
        Self {
            words,
            len: bytes.len(),
        }
    }
}

impl AlignedBytes {
    fn bytes(&self) -> &[u8] {
        &bytemuck::cast_slice::<u64, u8>(&self.words)[..self.len]
    }
}

/// A linear weight as the model receives it.
#[derive(Debug, Clone)]
pub enum LinearWeight {
    /// `[out, in]` in the stage dtype.
    Dense(Tensor),
    /// Row parts kept as stored.
    Packed(Vec<Part>),
}

/// An embedding table as the model receives it.
#[derive(Debug, Clone)]
pub enum EmbeddingTable {
    /// `[vocab, hidden]` in the stage dtype.
    Dense(Tensor),
    /// ggml blocks `[vocab, hidden]`; rows are dequantized on lookup.
    Ggml(Arc<QTensor>),
}

/// The tensors of one component.
pub struct WeightStore {
    /// What the errors call this component's weights (a folder or a file).
    label: String,
    files: Vec<TensorFile>,
    /// model name -> (file index, name in that file)
    map: HashMap<String, (usize, String)>,
    /// ComfyUI mixed-precision formats by layer (model names), from `_quantization_metadata`.
    layer_formats: HashMap<String, String>,
    report: Mutex<MemoryReport>,
}

impl std::fmt::Debug for WeightStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WeightStore")
            .field("label", &self.label)
            .field("tensors", &self.map.len())
            .finish_non_exhaustive()
    }
}

/// `BF16`, `F32`, ... as a format label.
pub fn dtype_label(d: DType) -> String {
    match d {
        DType::F8E4M3 => "F8_E4M3".to_string(),
        other => format!("{other:?}").to_uppercase(),
    }
}

impl WeightStore {
    /// Opens `paths` (safetensors and/or GGUF) and names their tensors through `naming`. `label` is what errors
    /// call these weights.
    pub fn open(paths: &[PathBuf], label: impl Into<String>, naming: Naming) -> Result<Self> {
        let mut files = Vec::with_capacity(paths.len());
        for p in paths {
            files.push(TensorFile::open(p)?);
        }
        Self::from_files(files, label, naming)
    }

    /// As [`WeightStore::open`] for files already opened.
    pub fn from_files(
        files: Vec<TensorFile>,
        label: impl Into<String>,
        naming: Naming,
    ) -> Result<Self> {
        let label = label.into();
        let mut map = HashMap::new();
        let mut layer_formats = HashMap::new();
        for (i, f) in files.iter().enumerate() {
            for name in f.names() {
                let Some(model_name) = naming(name) else {
                    continue;
                };
                if let Some((j, prev)) = map.insert(model_name.clone(), (i, name.to_string())) {
                    return Err(err(format!(
                        "{label}: tensors `{prev}` ({}) and `{name}` ({}) both map to `{model_name}`",
                        files[j].path().display(),
                        f.path().display()
                    )));
                }
            }
            // ComfyUI mixed precision: {"layers": {"<layer>": {"format": "float8_e4m3fn", ...}}}
            if let Some(q) = f
                .safetensors_metadata()
                .and_then(|m| m.get("_quantization_metadata"))
            {
                let v: serde_json::Value = serde_json::from_str(q).map_err(|e| {
                    err(format!(
                        "{}: _quantization_metadata is not JSON: {e}",
                        f.path().display()
                    ))
                })?;
                if let Some(layers) = v.get("layers").and_then(|l| l.as_object()) {
                    for (layer, conf) in layers {
                        let format = conf
                            .get("format")
                            .and_then(|f| f.as_str())
                            .or(conf.as_str())
                            .unwrap_or("?");
                        if let Some(w) = naming(&format!("{layer}.weight")) {
                            let layer = w.strip_suffix(".weight").unwrap_or(&w).to_string();
                            layer_formats.insert(layer, format.to_string());
                        }
                    }
                }
            }
        }
        Ok(Self {
            label,
            files,
            map,
            layer_formats,
            report: Mutex::new(MemoryReport::default()),
        })
    }

    pub fn label(&self) -> &str {
        &self.label
    }

    pub fn files(&self) -> &[TensorFile] {
        &self.files
    }

    pub fn contains(&self, name: &str) -> bool {
        self.map.contains_key(name)
    }

    /// Model names of all tensors.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.map.keys().map(String::as_str)
    }

    /// The file holding `name`.
    pub fn file_of(&self, name: &str) -> Option<&Path> {
        self.map.get(name).map(|(i, _)| self.files[*i].path())
    }

    /// Shape and encoding of `name`, or an error naming the weights and the tensor.
    pub fn stored(&self, name: &str) -> Result<StoredInfo> {
        let (f, fname) = self.locate(name)?;
        f.stored(fname).ok_or_else(|| f.no_tensor(fname))
    }

    /// The resident weights handed out so far.
    pub fn report(&self) -> MemoryReport {
        self.report.lock().map(|r| r.clone()).unwrap_or_default()
    }

    fn record(&self, format: &str, params: usize, bytes: usize) {
        if let Ok(mut r) = self.report.lock() {
            r.add(format, params as u64, bytes as u64);
        }
    }

    fn locate(&self, name: &str) -> Result<(&TensorFile, &str)> {
        match self.map.get(name) {
            Some((i, fname)) => Ok((&self.files[*i], fname.as_str())),
            None => Err(err(format!(
                "{}: tensor `{name}` is missing from the weights",
                self.label
            ))),
        }
    }

    /// An error for a tensor stored in a type this server cannot compute with.
    fn unsupported(&self, name: &str, what: &str) -> candle_core::Error {
        let file = self
            .file_of(name)
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| self.label.clone());
        err(format!(
            "{file}: tensor `{name}` is stored as {what}, which this server cannot load (GGUF: {}; safetensors: \
             F32, F16, BF16, F8_E4M3)",
            GgmlType::supported_names()
        ))
    }

    /// Tensor `name` as plain values of `dtype` on `device` (dequantized, fp8 scales applied).
    pub fn dense(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor> {
        let t = self.load_dense(name, dtype, device)?;
        self.record(
            &dtype_label(dtype),
            t.elem_count(),
            t.elem_count() * dtype.size_in_bytes(),
        );
        Ok(t)
    }

    fn load_dense(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor> {
        let (f, fname) = self.locate(name)?;
        let info = f.stored(fname).ok_or_else(|| f.no_tensor(fname))?;
        let context = |e: candle_core::Error| {
            err(format!(
                "{}: cannot load tensor `{name}`: {}",
                f.path().display(),
                crate::snapshot::first_line(&e)
            ))
        };
        match &info.encoding {
            Encoding::Plain(DType::F8E4M3) => {
                let bytes = f.read_all(fname)?;
                let t = Tensor::from_raw_buffer(
                    bytes.bytes(),
                    DType::F8E4M3,
                    &info.shape,
                    &Device::Cpu,
                )
                .and_then(|t| t.to_dtype(DType::F32))
                .map_err(context)?;
                let t = match self.fp8_scale(name)? {
                    Some(s) => t.affine(s, 0.0)?,
                    None => t,
                };
                t.to_dtype(dtype)?.to_device(device)
            }
            Encoding::Plain(d) if d.is_float() => {
                let bytes = f.read_all(fname)?;
                Tensor::from_raw_buffer(bytes.bytes(), *d, &info.shape, &Device::Cpu)
                    .and_then(|t| t.to_device(device))
                    .and_then(|t| t.to_dtype(dtype))
                    .map_err(context)
            }
            Encoding::Plain(d) => Err(err(format!(
                "{}: tensor `{name}` is stored as {}, expected floating-point values",
                f.path().display(),
                dtype_label(*d)
            ))),
            Encoding::Ggml(_, g) => {
                let bytes = f.read_all(fname)?;
                let q = qtensor(bytes.bytes(), *g, &info.shape, &Device::Cpu).map_err(context)?;
                q.dequantize(&Device::Cpu)
                    .and_then(|t| t.to_device(device))
                    .and_then(|t| t.to_dtype(dtype))
                    .map_err(context)
            }
            Encoding::Unsupported(what) => Err(self.unsupported(name, what)),
        }
    }

    /// The scale of an fp8 weight `<layer>.weight`: ComfyUI's `<layer>.scale_weight` (legacy `scaled_fp8`
    /// files) or `<layer>.weight_scale` (mixed-precision files), a single float32 (comfy/utils.py
    /// `convert_old_quants`, comfy/quant_ops.py `TensorCoreFP8Layout`). Also checks the layer's declared
    /// format.
    fn fp8_scale(&self, weight_name: &str) -> Result<Option<f64>> {
        let layer = weight_name.strip_suffix(".weight").unwrap_or(weight_name);
        let conf_key = format!("{layer}.comfy_quant");
        let format = if self.contains(&conf_key) {
            let raw = self.load_raw_u8(&conf_key)?;
            let v: serde_json::Value = serde_json::from_slice(&raw).map_err(|e| {
                err(format!(
                    "{}: `{conf_key}` is not ComfyUI quant JSON: {e}",
                    self.label
                ))
            })?;
            v.get("format").and_then(|f| f.as_str()).map(str::to_string)
        } else {
            self.layer_formats.get(layer).cloned()
        };
        if let Some(format) = format {
            if format != "float8_e4m3fn" {
                return Err(err(format!(
                    "{}: layer `{layer}` uses ComfyUI quant format `{format}`; only float8_e4m3fn is supported",
                    self.label
                )));
            }
        }
        for key in [
            format!("{layer}.scale_weight"),
            format!("{layer}.weight_scale"),
        ] {
            if self.contains(&key) {
                let s = self.load_dense(&key, DType::F32, &Device::Cpu)?;
                if s.elem_count() != 1 {
                    return Err(err(format!(
                        "{}: `{key}` has shape {:?}; only a single per-tensor scale is supported",
                        self.label,
                        s.dims()
                    )));
                }
                let v = s.flatten_all()?.to_vec1::<f32>()?[0];
                return Ok(Some(v as f64));
            }
        }
        Ok(None)
    }

    fn load_raw_u8(&self, name: &str) -> Result<Vec<u8>> {
        let (f, fname) = self.locate(name)?;
        Ok(f.read_all(fname)?.bytes().to_vec())
    }

    /// A 2-D linear weight `[out, in]`: ggml blocks and fp8 stay as stored (split into row parts of about
    /// [`PART_ELEMS`] values), anything else becomes a dense `dtype` tensor.
    pub fn linear(&self, name: &str, dtype: DType, device: &Device) -> Result<LinearWeight> {
        let (f, fname) = self.locate(name)?;
        let info = f.stored(fname).ok_or_else(|| f.no_tensor(fname))?;
        let (out_dim, in_dim) = match info.shape.as_slice() {
            [o, i] => (*o, *i),
            _ => return Ok(LinearWeight::Dense(self.dense(name, dtype, device)?)),
        };
        let rows_per_part = (PART_ELEMS / in_dim.max(1)).max(1);
        let mut parts = Vec::with_capacity(out_dim.div_ceil(rows_per_part));
        let mut first = 0;
        match &info.encoding {
            Encoding::Plain(DType::F8E4M3) => {
                let scale = self.fp8_scale(name)?;
                while first < out_dim {
                    let rows = rows_per_part.min(out_dim - first);
                    let bytes = f.read_rows(fname, first, rows)?;
                    let w = Tensor::from_raw_buffer(
                        bytes.bytes(),
                        DType::F8E4M3,
                        &[rows, in_dim],
                        &Device::Cpu,
                    )?
                    .to_device(device)?;
                    parts.push(Part::Fp8 { weight: w, scale });
                    first += rows;
                }
                self.record("F8_E4M3", out_dim * in_dim, out_dim * in_dim);
            }
            Encoding::Ggml(ty, g) => {
                let mut bytes_total = 0;
                while first < out_dim {
                    let rows = rows_per_part.min(out_dim - first);
                    let bytes = f.read_rows(fname, first, rows)?;
                    bytes_total += bytes.len;
                    let q = qtensor(bytes.bytes(), *g, &[rows, in_dim], device).map_err(|e| {
                        err(format!(
                            "{}: cannot load tensor `{name}` ({}): {}",
                            f.path().display(),
                            ty.name,
                            crate::snapshot::first_line(&e)
                        ))
                    })?;
                    parts.push(Part::Ggml(Arc::new(q)));
                    first += rows;
                }
                self.record(ty.name, out_dim * in_dim, bytes_total);
            }
            _ => return Ok(LinearWeight::Dense(self.dense(name, dtype, device)?)),
        }
        Ok(LinearWeight::Packed(parts))
    }

    /// An embedding table `[vocab, hidden]`: ggml blocks stay quantized (rows are dequantized on lookup), a
    /// bf16/f16 table stays in its narrower type when the stage dtype is wider (rows are upcast exactly on
    /// lookup: half the memory of ComfyUI's bf16 `embed_tokens` in an f32 stage), anything else becomes a dense
    /// `dtype` tensor.
    pub fn embedding(&self, name: &str, dtype: DType, device: &Device) -> Result<EmbeddingTable> {
        let (f, fname) = self.locate(name)?;
        let info = f.stored(fname).ok_or_else(|| f.no_tensor(fname))?;
        match (&info.encoding, info.shape.as_slice()) {
            (Encoding::Ggml(ty, g), [_, _]) => {
                let bytes = f.read_all(fname)?;
                let q = qtensor(bytes.bytes(), *g, &info.shape, device)?;
                self.record(ty.name, info.shape.iter().product(), bytes.len);
                Ok(EmbeddingTable::Ggml(Arc::new(q)))
            }
            (Encoding::Plain(d @ (DType::BF16 | DType::F16)), [_, _])
                if d.size_in_bytes() < dtype.size_in_bytes() =>
            {
                Ok(EmbeddingTable::Dense(self.dense(name, *d, device)?))
            }
            _ => Ok(EmbeddingTable::Dense(self.dense(name, dtype, device)?)),
        }
    }

    /// GGUF metadata of the first GGUF file, if any.
    pub fn gguf_metadata(&self) -> Option<&BTreeMap<String, gguf::Value>> {
        self.files.iter().find_map(TensorFile::gguf_metadata)
    }
}

/// A QTensor from raw ggml block bytes.
fn qtensor(bytes: &[u8], dtype: GgmlDType, shape: &[usize], device: &Device) -> Result<QTensor> {
    let storage = QStorage::from_data(Cow::Borrowed(bytes), device, dtype)?;
    QTensor::new(storage, shape.to_vec())
}
