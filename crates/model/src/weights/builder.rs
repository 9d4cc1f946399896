//! The `VarBuilder` the model components load through: candle's `VarBuilder` API subset they use (`pp`, `get`,
//! `dtype`, `device`) plus linear weights and embedding tables that may stay quantized or fp8.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{DType, Device, Result, Shape, Tensor};

use super::err;
use super::packed::QuantMatmul;
use super::report::MemoryReport;
use super::store::{EmbeddingTable, LinearWeight, WeightStore, dtype_label};

enum Backend {
    Store(WeightStore),
    /// In-memory tensors (unit tests, programmatic weights).
    Map(HashMap<String, Tensor>, std::sync::Mutex<MemoryReport>),
}

/// A prefix path into a component's weights, with the stage dtype and device.
#[derive(Clone)]
pub struct VarBuilder {
    backend: Arc<Backend>,
    path: Vec<String>,
    dtype: DType,
    device: Device,
    matmul: QuantMatmul,
}

impl std::fmt::Debug for VarBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VarBuilder")
            .field("prefix", &self.prefix())
            .field("dtype", &self.dtype)
            .field("device", &self.device)
            .finish_non_exhaustive()
    }
}

impl VarBuilder {
    /// Loads from `store`: dense tensors in `dtype` on `device`; quantized/fp8 linears multiplied as
    /// [`QuantMatmul::Auto`] picks for the device.
    pub fn from_store(store: WeightStore, dtype: DType, device: &Device) -> Self {
        Self {
            backend: Arc::new(Backend::Store(store)),
            path: Vec::new(),
            dtype,
            device: device.clone(),
            matmul: QuantMatmul::Auto.resolve(device),
        }
    }

    /// In-memory tensors by full name (converted to `dtype` on `get`).
    pub fn from_tensors(tensors: HashMap<String, Tensor>, dtype: DType, device: &Device) -> Self {
        Self {
            backend: Arc::new(Backend::Map(tensors, Default::default())),
            path: Vec::new(),
            dtype,
            device: device.clone(),
            matmul: QuantMatmul::Auto.resolve(device),
        }
    }

    /// How packed linears multiply ([`QuantMatmul::Auto`] resolves per device).
    pub fn with_quant_matmul(mut self, mode: QuantMatmul) -> Self {
        self.matmul = mode.resolve(&self.device);
        self
    }

    pub fn quant_matmul(&self) -> QuantMatmul {
        self.matmul
    }

    /// The builder for `prefix.s`.
    pub fn pp<S: ToString>(&self, s: S) -> Self {
        let mut path = self.path.clone();
        path.push(s.to_string());
        Self {
            backend: self.backend.clone(),
            path,
            dtype: self.dtype,
            device: self.device.clone(),
            matmul: self.matmul,
        }
    }

    /// Same as [`VarBuilder::pp`] (candle's name).
    pub fn push_prefix<S: ToString>(&self, s: S) -> Self {
        self.pp(s)
    }

    pub fn prefix(&self) -> String {
        self.path.join(".")
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The full name of `name` under this prefix.
    pub fn path(&self, name: &str) -> String {
        if self.path.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix())
        }
    }

    /// The store behind this builder (`None` for in-memory tensors).
    pub fn store(&self) -> Option<&WeightStore> {
        match self.backend.as_ref() {
            Backend::Store(s) => Some(s),
            Backend::Map(..) => None,
        }
    }

    pub fn contains_tensor(&self, name: &str) -> bool {
        let full = self.path(name);
        match self.backend.as_ref() {
            Backend::Store(s) => s.contains(&full),
            Backend::Map(m, _) => m.contains_key(&full),
        }
    }

    /// The resident weights loaded through this builder's store so far.
    pub fn report(&self) -> MemoryReport {
        match self.backend.as_ref() {
            Backend::Store(s) => s.report(),
            Backend::Map(_, r) => r.lock().map(|r| r.clone()).unwrap_or_default(),
        }
    }

    fn where_(&self, full: &str) -> String {
        match self.backend.as_ref() {
            Backend::Store(s) => s
                .file_of(full)
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| s.label().to_string()),
            Backend::Map(..) => "in-memory weights".to_string(),
        }
    }

    fn check_shape(&self, full: &str, got: &[usize], want: &Shape) -> Result<()> {
        if got != want.dims() {
            return Err(err(format!(
                "{}: tensor `{full}` has shape {got:?}, the config expects {:?}",
                self.where_(full),
                want.dims()
            )));
        }
        Ok(())
    }

    fn map_get(&self, full: &str) -> Result<Tensor> {
        match self.backend.as_ref() {
            Backend::Map(m, r) => {
                let t = m
                    .get(full)
                    .ok_or_else(|| err(format!("tensor `{full}` is missing from the weights")))?
                    .to_device(&self.device)?
                    .to_dtype(self.dtype)?;
                if let Ok(mut r) = r.lock() {
                    r.add(
                        &dtype_label(self.dtype),
                        t.elem_count() as u64,
                        (t.elem_count() * self.dtype.size_in_bytes()) as u64,
                    );
                }
                Ok(t)
            }
            Backend::Store(s) => s.dense(full, self.dtype, &self.device),
        }
    }

    /// Tensor `name` in the stage dtype, checked against `shape`.
    pub fn get<S: Into<Shape>>(&self, shape: S, name: &str) -> Result<Tensor> {
        let full = self.path(name);
        let shape = shape.into();
        if let Backend::Store(s) = self.backend.as_ref() {
            // check before reading (and dequantizing) the data
            self.check_shape(&full, &s.stored(&full)?.shape, &shape)?;
        }
        let t = self.map_get(&full)?;
        self.check_shape(&full, t.dims(), &shape)?;
        Ok(t)
    }

    /// Tensor `name` in the stage dtype, whatever its shape.
    pub fn get_unchecked(&self, name: &str) -> Result<Tensor> {
        self.map_get(&self.path(name))
    }

    /// The linear weight `name` (`[out, in]`): dense in the stage dtype, or kept as stored (ggml blocks, fp8).
    pub fn linear_weight(&self, out_dim: usize, in_dim: usize, name: &str) -> Result<LinearWeight> {
        let full = self.path(name);
        let shape = Shape::from((out_dim, in_dim));
        match self.backend.as_ref() {
            Backend::Store(s) => {
                self.check_shape(&full, &s.stored(&full)?.shape, &shape)?;
                s.linear(&full, self.dtype, &self.device)
            }
            Backend::Map(..) => Ok(LinearWeight::Dense(self.get(shape, name)?)),
        }
    }

    /// The embedding table `name` (`[vocab, hidden]`): dense in the stage dtype, or ggml blocks.
    pub fn embedding_table(
        &self,
        vocab: usize,
        hidden: usize,
        name: &str,
    ) -> Result<EmbeddingTable> {
        let full = self.path(name);
        let shape = Shape::from((vocab, hidden));
        match self.backend.as_ref() {
            Backend::Store(s) => {
                self.check_shape(&full, &s.stored(&full)?.shape, &shape)?;
                s.embedding(&full, self.dtype, &self.device)
            }
            Backend::Map(..) => Ok(EmbeddingTable::Dense(self.get(shape, name)?)),
        }
    }
}
