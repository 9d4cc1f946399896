//! Loading a diffusers snapshot directory: `model_index.json`, component folders, JSON configs and
//! (sharded) safetensors weights.
//!
//! Layout (diffusers `save_pretrained`): `ROOT/model_index.json`, `ROOT/<component>/config.json` (or
//! `scheduler_config.json`), `ROOT/<component>/*.safetensors` with an optional `*.safetensors.index.json`
//! for sharded weights. Every error names the file (and tensor) that is missing or wrong.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use serde::de::DeserializeOwned;

use crate::weights::{VarBuilder, WeightStore};

fn err(msg: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Msg(msg.to_string())
}

/// A diffusers snapshot directory (the root holding `model_index.json`).
#[derive(Debug, Clone)]
pub struct Snapshot {
    root: PathBuf,
    index: serde_json::Map<String, serde_json::Value>,
}

impl Snapshot {
    /// Opens `root`, which must contain `model_index.json`.
    pub fn open(root: impl AsRef<Path>) -> candle_core::Result<Self> {
        let root = root.as_ref().to_path_buf();
        let index_path = root.join("model_index.json");
        let index: serde_json::Value = read_json(&index_path)?;
        let index = index
            .as_object()
            .cloned()
            .ok_or_else(|| err(format!("{}: expected a JSON object", index_path.display())))?;
        Ok(Self { root, index })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `_class_name` of the pipeline (e.g. `QwenImagePipeline`).
    pub fn pipeline_class(&self) -> Option<&str> {
        self.index.get("_class_name").and_then(|v| v.as_str())
    }

    /// Folder of a component (`transformer`, `vae`, ...). Errors when it does not exist.
    pub fn component_dir(&self, name: &str) -> candle_core::Result<PathBuf> {
        let dir = self.root.join(name);
        if !dir.is_dir() {
            return Err(err(format!(
                "snapshot {}: component folder `{name}` is missing",
                self.root.display()
            )));
        }
        Ok(dir)
    }

    /// Parses `<component>/<file>` (unknown keys are ignored by the config types).
    pub fn config<T: DeserializeOwned>(
        &self,
        component: &str,
        file: &str,
    ) -> candle_core::Result<T> {
        read_json(&self.component_dir(component)?.join(file))
    }

    /// The weights of `component` as a builder converting dense tensors to `dtype`.
    pub fn weights(
        &self,
        component: &str,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<VarBuilder> {
        load_weights(&self.component_dir(component)?, dtype, device)
    }
}

/// Reads and parses a JSON file; errors name the file.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> candle_core::Result<T> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| err(format!("cannot read {}: {e}", path.display())))?;
    serde_json::from_str(&text).map_err(|e| err(format!("cannot parse {}: {e}", path.display())))
}

/// The safetensors files of a model folder: the shards listed by a `*.safetensors.index.json` when present,
/// otherwise every `*.safetensors` file in the folder.
pub fn weight_files(dir: &Path) -> candle_core::Result<Vec<PathBuf>> {
    let entries =
        std::fs::read_dir(dir).map_err(|e| err(format!("cannot list {}: {e}", dir.display())))?;
    let mut names: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    names.sort();
    if let Some(index) = names
        .iter()
        .find(|p| p.to_string_lossy().ends_with(".safetensors.index.json"))
    {
        #[derive(serde::Deserialize)]
        struct Index {
            weight_map: HashMap<String, String>,
        }
        let idx: Index = read_json(index)?;
        let mut files: Vec<String> = idx.weight_map.into_values().collect();
        files.sort();
        files.dedup();
        let files: Vec<PathBuf> = files.into_iter().map(|f| dir.join(f)).collect();
        for f in &files {
            if !f.is_file() {
                return Err(err(format!(
                    "{}: shard {} listed in {} is missing",
                    dir.display(),
                    f.display(),
                    index.display()
                )));
            }
        }
        return Ok(files);
    }
    let files: Vec<PathBuf> = names
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    if files.is_empty() {
        return Err(err(format!(
            "{}: no *.safetensors weights found",
            dir.display()
        )));
    }
    Ok(files)
}

/// Weights of one model folder: its safetensors files under their own tensor names.
pub type Weights = WeightStore;

impl WeightStore {
    /// Opens every weight file of the model folder `dir` ([`weight_files`]).
    pub fn open_dir(dir: &Path) -> candle_core::Result<Self> {
        let files = weight_files(dir)?;
        WeightStore::open(&files, dir.display().to_string(), &|n| Some(n.to_string()))
    }
}

/// The weights of a model folder as a [`VarBuilder`] converting dense tensors to `dtype` on load.
pub fn load_weights(dir: &Path, dtype: DType, device: &Device) -> candle_core::Result<VarBuilder> {
    Ok(VarBuilder::from_store(
        WeightStore::open_dir(dir)?,
        dtype,
        device,
    ))
}

/// First line of an error message (candle errors may carry a backtrace).
pub fn first_line(e: &impl std::fmt::Display) -> String {
    e.to_string().lines().next().unwrap_or_default().to_string()
}
