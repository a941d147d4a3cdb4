//! Weights in the Hugging Face safetensors layout.
//!
//! A checkpoint is a directory written by `save_pretrained`: either one `model.safetensors`, or
//! shards listed by `model.safetensors.index.json`. [`Weights::load_dir`] reads it into host
//! tensors keyed by checkpoint name (`model.layers.0.self_attn.q_a_proj.weight`), the same names
//! the model library gives its graph parameters, and [`Weights::check_against`] checks the two
//! agree. [`save_safetensors`] writes tensors back, atomically, in a form `transformers` loads.
//!
//! Float tensors (F32, BF16, F16) load as f32 values, exactly; the tensor type records `f32`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use fathom_compiler::{DType, Graph, Shape, TensorType};
use half::{bf16, f16};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensorError, SafeTensors, View};
use serde::Deserialize;
use thiserror::Error;

use crate::tensor::{Data, HostTensor};

/// The index file of a sharded checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// The single file of an unsharded checkpoint.
pub const SINGLE_FILE: &str = "model.safetensors";

const CHECKPOINT_DTYPES: &str = "f32, bf16 and f16";
const ANY_DTYPES: &str = "f32, bf16, f16, i32, i64 and bool";

/// Everything that can go wrong reading, checking or writing weights. Every variant names the
/// file or the tensor concerned.
#[derive(Debug, Error)]
pub enum WeightsError {
    #[error("cannot read {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("{} is not a valid safetensors file: {source}", path.display())]
    Corrupt {
        path: PathBuf,
        source: SafeTensorError,
    },
    #[error("{} is not a valid safetensors index: {message}", path.display())]
    BadIndex { path: PathBuf, message: String },
    #[error("{} lists shards that do not exist: {}", index.display(), display_paths(shards))]
    MissingShards {
        index: PathBuf,
        shards: Vec<PathBuf>,
    },
    #[error("{} maps tensor `{tensor}` to {}, which does not hold it", index.display(), shard.display())]
    NotInShard {
        index: PathBuf,
        tensor: String,
        shard: PathBuf,
    },
    #[error(
        "no checkpoint in {}: found neither {INDEX_FILE}, {SINGLE_FILE} nor any *.safetensors file",
        dir.display()
    )]
    NoCheckpoint { dir: PathBuf },
    #[error("tensors stored twice in {}:{}", dir.display(), display_duplicates(duplicates))]
    Duplicates {
        dir: PathBuf,
        duplicates: Vec<Duplicate>,
    },
    #[error("unsupported dtype {dtype} for tensor `{tensor}` in {}; Fathom loads {accepted}", file.display())]
    UnsupportedDtype {
        file: PathBuf,
        tensor: String,
        dtype: Dtype,
        accepted: &'static str,
    },
    /// The weights do not fit the graph; the report lists every problem.
    #[error("{} not match the model:\n{report}", display_origin(checkpoint.as_deref()))]
    Mismatch {
        /// Where the weights came from, when they came from disk.
        checkpoint: Option<PathBuf>,
        report: Box<CheckReport>,
    },
    #[error("cannot write {}: {source}", path.display())]
    Write { path: PathBuf, source: io::Error },
    #[error("cannot write {}: {source}", path.display())]
    Serialize {
        path: PathBuf,
        source: SafeTensorError,
    },
    #[error("cannot save tensor `{tensor}`: {detail}")]
    InvalidTensor { tensor: String, detail: String },
}

/// One tensor name held by two files of a checkpoint directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Duplicate {
    pub tensor: String,
    pub first: PathBuf,
    pub second: PathBuf,
}

fn display_paths(paths: &[PathBuf]) -> String {
    let names: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
    names.join(", ")
}

fn display_duplicates(duplicates: &[Duplicate]) -> String {
    duplicates
        .iter()
        .map(|d| {
            format!(
                "\n  `{}` is in both {} and {}",
                d.tensor,
                d.first.display(),
                d.second.display()
            )
        })
        .collect()
}

fn display_origin(checkpoint: Option<&Path>) -> String {
    match checkpoint {
        Some(path) => format!("checkpoint {} does", path.display()),
        None => "the weights do".to_owned(),
    }
}

/// Named host tensors: a loaded checkpoint, or weights made in memory (see
/// [`crate::init::init_parameters`]). Iteration is in name order, so it is deterministic.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Weights {
    tensors: BTreeMap<String, HostTensor>,
    source: Option<PathBuf>,
}

impl Weights {
    pub fn new() -> Self {
        Weights::default()
    }

    /// Loads a Hugging Face checkpoint directory:
    /// - with `model.safetensors.index.json`, every shard its `weight_map` lists, and from each
    ///   shard exactly the tensors the map assigns to it (a listed shard that is absent, or a
    ///   tensor missing from its shard, is an error; tensors a shard holds but the map does not
    ///   list are ignored, as the index defines the checkpoint);
    /// - else `model.safetensors`;
    /// - else every `*.safetensors` file of the directory, in name order; a tensor name held by
    ///   two files is an error. Note that this includes any other safetensors file lying there.
    ///
    /// Only float tensors (F32, BF16, F16) are accepted, converted exactly to f32.
    pub fn load_dir(dir: &Path) -> Result<Weights, WeightsError> {
        let index = dir.join(INDEX_FILE);
        let tensors = if index.is_file() {
            load_indexed(dir, &index)?
        } else {
            let single = dir.join(SINGLE_FILE);
            let files = if single.is_file() {
                vec![single]
            } else {
                safetensors_files(dir)?
            };
            if files.is_empty() {
                return Err(WeightsError::NoCheckpoint {
                    dir: dir.to_path_buf(),
                });
            }
            load_files(dir, &files)?
        };
        Ok(Weights {
            tensors,
            source: Some(dir.to_path_buf()),
        })
    }

    /// Loads one safetensors file with the checkpoint rules of [`Weights::load_dir`]: float
    /// tensors only, as exact f32.
    pub fn load_file(path: &Path) -> Result<Weights, WeightsError> {
        let bytes = read(path)?;
        let st = parse(path, &bytes)?;
        let mut tensors = BTreeMap::new();
        for (name, view) in st.iter() {
            tensors.insert(name.to_owned(), to_host(path, name, &view, Accept::Floats)?);
        }
        Ok(Weights {
            tensors,
            source: Some(path.to_path_buf()),
        })
    }

    /// Where the weights were loaded from (a directory or a file), if they were.
    pub fn source(&self) -> Option<&Path> {
        self.source.as_deref()
    }

    pub fn get(&self, name: &str) -> Option<&HostTensor> {
        self.tensors.get(name)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Adds or replaces a tensor, returning the one it replaces.
    pub fn insert(&mut self, name: impl Into<String>, tensor: HostTensor) -> Option<HostTensor> {
        self.tensors.insert(name.into(), tensor)
    }

    pub fn remove(&mut self, name: &str) -> Option<HostTensor> {
        self.tensors.remove(name)
    }

    /// The tensors in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &HostTensor)> + '_ {
        self.tensors.iter().map(|(n, t)| (n.as_str(), t))
    }

    /// The names in order.
    pub fn names(&self) -> impl Iterator<Item = &str> + '_ {
        self.tensors.keys().map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    pub fn into_map(self) -> HashMap<String, HostTensor> {
        self.tensors.into_iter().collect()
    }

    /// Compares the weights with the graph's parameters, judging nothing: every parameter absent
    /// or of another shape, and every tensor the graph does not use. Dtypes are not compared
    /// (checkpoint floats load as f32 whatever their stored dtype).
    pub fn compare(&self, graph: &Graph) -> CheckReport {
        let mut report = CheckReport::default();
        let mut used = HashSet::new();
        for (_, name, ty) in graph.parameters() {
            used.insert(name);
            match self.tensors.get(name) {
                None => report.missing.push(MissingTensor {
                    name: name.to_owned(),
                    expected: ty.clone(),
                }),
                Some(t) if t.ty.shape != ty.shape => report.mismatched.push(ShapeMismatch {
                    name: name.to_owned(),
                    found: t.ty.shape.clone(),
                    expected: ty.shape.clone(),
                }),
                Some(_) => {}
            }
        }
        report.unexpected = self
            .names()
            .filter(|n| !used.contains(n))
            .map(str::to_owned)
            .collect();
        report
    }

    /// Checks that every graph parameter is present with the shape the graph declares and that
    /// every tensor is used, except those `allow_extra` accepts (e.g. the MTP layers of a
    /// checkpoint loaded into a model without MTP: see [`is_layer_at_or_above`]). On success the
    /// report lists those accepted extras in `ignored`; otherwise one error lists every problem.
    pub fn check_against(
        &self,
        graph: &Graph,
        allow_extra: impl Fn(&str) -> bool,
    ) -> Result<CheckReport, WeightsError> {
        let mut report = self.compare(graph);
        let (ignored, unexpected) = report.unexpected.into_iter().partition(|n| allow_extra(n));
        report.ignored = ignored;
        report.unexpected = unexpected;
        if report.is_ok() {
            Ok(report)
        } else {
            Err(WeightsError::Mismatch {
                checkpoint: self.source.clone(),
                report: Box::new(report),
            })
        }
    }

    /// Writes every tensor to one safetensors file (see [`save_safetensors`]).
    pub fn save(&self, path: &Path) -> Result<(), WeightsError> {
        save_safetensors(path, self.iter())
    }
}

impl From<HashMap<String, HostTensor>> for Weights {
    fn from(map: HashMap<String, HostTensor>) -> Self {
        map.into_iter().collect()
    }
}

impl FromIterator<(String, HostTensor)> for Weights {
    fn from_iter<I: IntoIterator<Item = (String, HostTensor)>>(iter: I) -> Self {
        Weights {
            tensors: iter.into_iter().collect(),
            source: None,
        }
    }
}

impl IntoIterator for Weights {
    type Item = (String, HostTensor);
    type IntoIter = std::collections::btree_map::IntoIter<String, HostTensor>;
    fn into_iter(self) -> Self::IntoIter {
        self.tensors.into_iter()
    }
}

/// Whether `name` belongs to a decoder layer of index `first` or more (`model.layers.{i}.…`,
/// `i >= first`). In DeepSeek-V3 checkpoints the MTP modules are the layers from
/// `num_hidden_layers` on, so `|n| is_layer_at_or_above(n, spec.layers)` lets a model built
/// without MTP load a checkpoint that has it.
pub fn is_layer_at_or_above(name: &str, first: usize) -> bool {
    name.strip_prefix("model.layers.")
        .and_then(|rest| rest.split('.').next())
        .and_then(|index| index.parse::<usize>().ok())
        .is_some_and(|index| index >= first)
}

/// How weights and a graph differ. Its `Display` is one line per problem, each indented by two
/// spaces and naming the tensor.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CheckReport {
    /// Graph parameters absent from the weights, in declaration order.
    pub missing: Vec<MissingTensor>,
    /// Parameters present with another shape, in declaration order.
    pub mismatched: Vec<ShapeMismatch>,
    /// Tensors the graph does not use (and the caller did not allow), in name order.
    pub unexpected: Vec<String>,
    /// Unused tensors the caller allowed, in name order.
    pub ignored: Vec<String>,
}

impl CheckReport {
    /// No missing, mis-shaped or unexpected tensor (ignored ones are fine).
    pub fn is_ok(&self) -> bool {
        self.missing.is_empty() && self.mismatched.is_empty() && self.unexpected.is_empty()
    }
}

impl fmt::Display for CheckReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut lines = Vec::new();
        for m in &self.missing {
            lines.push(format!("  missing: {} ({})", m.name, m.expected));
        }
        for m in &self.mismatched {
            lines.push(format!(
                "  wrong shape: {} is {} in the checkpoint, the model expects {}",
                m.name, m.found, m.expected
            ));
        }
        for name in &self.unexpected {
            lines.push(format!("  unexpected: {name}"));
        }
        f.write_str(&lines.join("\n"))
    }
}

/// A graph parameter the weights lack, with the type the graph declares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MissingTensor {
    pub name: String,
    pub expected: TensorType,
}

/// A parameter whose stored shape differs from the graph's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShapeMismatch {
    pub name: String,
    /// The shape in the weights.
    pub found: Shape,
    /// The shape the graph declares.
    pub expected: Shape,
}

/// Reads every tensor of one safetensors file that Fathom has a type for, not only weights:
/// floats (F32, BF16, F16) as exact f32 with type `f32`, I32 and I64 as i64 values with their
/// own type, BOOL as bools. For reference data such as `input_ids`; checkpoints go through
/// [`Weights::load_dir`].
pub fn read_safetensors(path: &Path) -> Result<Weights, WeightsError> {
    let bytes = read(path)?;
    let st = parse(path, &bytes)?;
    let mut tensors = BTreeMap::new();
    for (name, view) in st.iter() {
        tensors.insert(name.to_owned(), to_host(path, name, &view, Accept::Any)?);
    }
    Ok(Weights {
        tensors,
        source: Some(path.to_path_buf()),
    })
}

/// Writes tensors to one safetensors file, atomically: the bytes go to a hidden temporary file in
/// the same directory, which is synced and then renamed over `path`, so a reader never sees a
/// partial file and an interrupted save leaves any previous file intact.
///
/// Float tensors are stored as F32 whatever their dtype (a bf16 tensor's values are exact in
/// f32), i64 tensors as I64, i32 as I32, bool as BOOL. The header carries
/// `{"format": "pt"}` so that `transformers` accepts the file. The order of `tensors` does not
/// matter: safetensors sorts the header. Two tensors of one name are an error.
pub fn save_safetensors<'a, S: AsRef<str>>(
    path: &Path,
    tensors: impl IntoIterator<Item = (S, &'a HostTensor)>,
) -> Result<(), WeightsError> {
    let mut views: Vec<(String, OwnedView)> = Vec::new();
    let mut seen = HashSet::new();
    for (name, tensor) in tensors {
        let name = name.as_ref();
        if !seen.insert(name.to_owned()) {
            return Err(WeightsError::InvalidTensor {
                tensor: name.to_owned(),
                detail: "two tensors have this name".to_owned(),
            });
        }
        views.push((name.to_owned(), OwnedView::new(name, tensor)?));
    }

    let write_err = |source| WeightsError::Write {
        path: path.to_path_buf(),
        source,
    };
    let file_name = path.file_name().ok_or_else(|| {
        write_err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the path names no file",
        ))
    })?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let temp = dir.join(format!(
        ".{}.{}.{}.tmp",
        file_name.to_string_lossy(),
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));

    let metadata = HashMap::from([("format".to_owned(), "pt".to_owned())]);
    // Serialise to memory and write the file ourselves: safetensors' own `serialize_to_file`
    // goes through a private temporary file and leaves the result readable by its owner only.
    let bytes = safetensors::serialize(views, Some(metadata)).map_err(|source| {
        WeightsError::Serialize {
            path: path.to_path_buf(),
            source,
        }
    })?;
    let result = fs::File::create(&temp)
        .and_then(|mut f| {
            io::Write::write_all(&mut f, &bytes)?;
            f.sync_all()
        })
        .and_then(|()| fs::rename(&temp, path))
        .map_err(write_err);
    if result.is_err() {
        // Best effort: the temporary file may not exist.
        let _ = fs::remove_file(&temp);
        return result;
    }
    // Make the rename itself durable where the platform allows syncing a directory.
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// A tensor encoded for safetensors.
struct OwnedView {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl OwnedView {
    fn new(name: &str, tensor: &HostTensor) -> Result<Self, WeightsError> {
        let numel = tensor.ty.numel();
        let len = match &tensor.data {
            Data::Float(v) => v.len(),
            Data::Int(v) => v.len(),
            Data::Bool(v) => v.len(),
        };
        if len != numel {
            return Err(WeightsError::InvalidTensor {
                tensor: name.to_owned(),
                detail: format!("{} values do not fill {}", len, tensor.ty),
            });
        }
        let (dtype, bytes) = match &tensor.data {
            Data::Float(v) => (Dtype::F32, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
            Data::Int(v) if tensor.ty.dtype == DType::I32 => {
                let mut bytes = Vec::with_capacity(4 * v.len());
                for &x in v {
                    let x = i32::try_from(x).map_err(|_| WeightsError::InvalidTensor {
                        tensor: name.to_owned(),
                        detail: format!("{x} does not fit i32"),
                    })?;
                    bytes.extend(x.to_le_bytes());
                }
                (Dtype::I32, bytes)
            }
            Data::Int(v) => (Dtype::I64, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
            Data::Bool(v) => (Dtype::BOOL, v.iter().map(|&b| u8::from(b)).collect()),
        };
        Ok(OwnedView {
            dtype,
            shape: tensor.dims().to_vec(),
            bytes,
        })
    }
}

impl View for OwnedView {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        (&self.bytes[..]).into()
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Accept {
    /// Checkpoint weights: floats only.
    Floats,
    /// Anything Fathom has a type for.
    Any,
}

fn read(path: &Path) -> Result<Vec<u8>, WeightsError> {
    fs::read(path).map_err(|source| WeightsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn parse<'a>(path: &Path, bytes: &'a [u8]) -> Result<SafeTensors<'a>, WeightsError> {
    SafeTensors::deserialize(bytes).map_err(|source| WeightsError::Corrupt {
        path: path.to_path_buf(),
        source,
    })
}

/// Converts one stored tensor. safetensors has already checked that the data fills the shape.
fn to_host(
    file: &Path,
    name: &str,
    view: &TensorView<'_>,
    accept: Accept,
) -> Result<HostTensor, WeightsError> {
    let bytes = view.data();
    let shape = view.shape().to_vec();
    let floats = |values: Vec<f32>| HostTensor {
        ty: TensorType::new(DType::F32, shape.clone()),
        data: Data::Float(values),
    };
    let ints = |dtype, values: Vec<i64>| HostTensor {
        ty: TensorType::new(dtype, shape.clone()),
        data: Data::Int(values),
    };
    Ok(match (view.dtype(), accept) {
        (Dtype::F32, _) => floats(
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        ),
        (Dtype::BF16, _) => floats(
            bytes
                .chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
        ),
        (Dtype::F16, _) => floats(
            bytes
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
        ),
        (Dtype::I64, Accept::Any) => ints(
            DType::I64,
            bytes
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                .collect(),
        ),
        (Dtype::I32, Accept::Any) => ints(
            DType::I32,
            bytes
                .chunks_exact(4)
                .map(|c| i64::from(i32::from_le_bytes([c[0], c[1], c[2], c[3]])))
                .collect(),
        ),
        (Dtype::BOOL, Accept::Any) => HostTensor {
            ty: TensorType::new(DType::Bool, shape.clone()),
            data: Data::Bool(bytes.iter().map(|&b| b != 0).collect()),
        },
        (dtype, accept) => {
            return Err(WeightsError::UnsupportedDtype {
                file: file.to_path_buf(),
                tensor: name.to_owned(),
                dtype,
                accepted: match accept {
                    Accept::Floats => CHECKPOINT_DTYPES,
                    Accept::Any => ANY_DTYPES,
                },
            });
        }
    })
}

#[derive(Deserialize)]
struct Index {
    weight_map: BTreeMap<String, String>,
}

fn load_indexed(dir: &Path, index: &Path) -> Result<BTreeMap<String, HostTensor>, WeightsError> {
    let text = fs::read_to_string(index).map_err(|source| WeightsError::Read {
        path: index.to_path_buf(),
        source,
    })?;
    let parsed: Index = serde_json::from_str(&text).map_err(|e| WeightsError::BadIndex {
        path: index.to_path_buf(),
        message: e.to_string(),
    })?;
    // Shard file -> the tensors the index assigns to it.
    let mut shards: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (tensor, shard) in &parsed.weight_map {
        shards.entry(shard).or_default().push(tensor);
    }
    let absent: Vec<PathBuf> = shards
        .keys()
        .map(|shard| dir.join(shard))
        .filter(|path| !path.is_file())
        .collect();
    if !absent.is_empty() {
        return Err(WeightsError::MissingShards {
            index: index.to_path_buf(),
            shards: absent,
        });
    }
    let mut tensors = BTreeMap::new();
    for (shard, names) in shards {
        let path = dir.join(shard);
        let bytes = read(&path)?;
        let st = parse(&path, &bytes)?;
        for name in names {
            let view = st.tensor(name).map_err(|_| WeightsError::NotInShard {
                index: index.to_path_buf(),
                tensor: name.to_owned(),
                shard: path.clone(),
            })?;
            tensors.insert(
                name.to_owned(),
                to_host(&path, name, &view, Accept::Floats)?,
            );
        }
    }
    Ok(tensors)
}

/// The `*.safetensors` files of `dir`, sorted by name.
fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>, WeightsError> {
    let read_err = |source| WeightsError::Read {
        path: dir.to_path_buf(),
        source,
    };
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).map_err(read_err)? {
        let path = entry.map_err(read_err)?.path();
        let is_safetensors = path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().ends_with(".safetensors"));
        if is_safetensors && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

fn load_files(dir: &Path, files: &[PathBuf]) -> Result<BTreeMap<String, HostTensor>, WeightsError> {
    let mut tensors = BTreeMap::new();
    let mut origin: HashMap<String, usize> = HashMap::new();
    let mut duplicates = Vec::new();
    for (i, path) in files.iter().enumerate() {
        let bytes = read(path)?;
        let st = parse(path, &bytes)?;
        for (name, view) in st.iter() {
            if let Some(&first) = origin.get(name) {
                duplicates.push(Duplicate {
                    tensor: name.to_owned(),
                    first: files[first].clone(),
                    second: path.clone(),
                });
                continue;
            }
            origin.insert(name.to_owned(), i);
            tensors.insert(name.to_owned(), to_host(path, name, &view, Accept::Floats)?);
        }
    }
    if !duplicates.is_empty() {
        duplicates.sort_by(|a, b| a.tensor.cmp(&b.tensor));
        return Err(WeightsError::Duplicates {
            dir: dir.to_path_buf(),
            duplicates,
        });
    }
    Ok(tensors)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use fathom_compiler::GraphBuilder;

    fn f32_ty(dims: &[usize]) -> TensorType {
        TensorType::new(DType::F32, dims)
    }

    fn graph(params: &[(&str, &[usize])]) -> Graph {
        let mut b = GraphBuilder::new("t");
        for (name, dims) in params {
            b.parameter(name, f32_ty(dims)).unwrap();
        }
        b.finish()
    }

    /// Writes raw tensors with the safetensors crate itself.
    fn write_raw(path: &Path, tensors: &[(&str, Dtype, &[usize], Vec<u8>)]) {
        let views: Vec<(String, TensorView<'_>)> = tensors
            .iter()
            .map(|(n, d, s, b)| (n.to_string(), TensorView::new(*d, s.to_vec(), b).unwrap()))
            .collect();
        safetensors::serialize_to_file(views, None, path).unwrap();
    }

    fn ramp(dims: &[usize]) -> HostTensor {
        let n = dims.iter().product::<usize>();
        HostTensor::f32(dims, (0..n).map(|i| i as f32 * 0.25 - 1.0).collect())
    }

    fn fixtures() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
    }

    #[test]
    fn save_then_load_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let a = ramp(&[2, 3]);
        let b = HostTensor::f32([4], vec![0.1, -0.0, f32::MIN_POSITIVE, 1e30]);
        let s = HostTensor::f32(Vec::<usize>::new(), vec![7.5]);
        let path = dir.path().join(SINGLE_FILE);
        // Order does not matter.
        save_safetensors(
            &path,
            [("z.weight", &a), ("a.weight", &b), ("m.scalar", &s)],
        )
        .unwrap();
        let w = Weights::load_dir(dir.path()).unwrap();
        assert_eq!(w.len(), 3);
        assert_eq!(w.get("z.weight"), Some(&a));
        assert_eq!(w.get("a.weight"), Some(&b));
        assert_eq!(w.get("m.scalar"), Some(&s));
        assert_eq!(
            w.names().collect::<Vec<_>>(),
            ["a.weight", "m.scalar", "z.weight"]
        );
        assert_eq!(w.source(), Some(dir.path()));
        // No temporary file is left behind.
        let entries: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(entries.len(), 1);
        // The header carries the format transformers asks for.
        let bytes = fs::read(&path).unwrap();
        let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
        let meta = meta.metadata().as_ref().unwrap();
        assert_eq!(meta.get("format").map(String::as_str), Some("pt"));
    }

    #[test]
    fn save_overwrites_atomically_and_keeps_ints() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("reference.safetensors");
        save_safetensors(&path, [("x", &ramp(&[3]))]).unwrap();
        let ids = HostTensor::i64([2, 2], vec![1, -2, 3, i64::MAX]);
        let small = HostTensor {
            ty: TensorType::new(DType::I32, [2]),
            data: Data::Int(vec![-5, 6]),
        };
        let mask = HostTensor {
            ty: TensorType::new(DType::Bool, [3]),
            data: Data::Bool(vec![true, false, true]),
        };
        let mut w = Weights::new();
        w.insert("input_ids", ids.clone());
        w.insert("positions", small.clone());
        w.insert("mask", mask.clone());
        w.save(&path).unwrap();
        let back = read_safetensors(&path).unwrap();
        assert_eq!(back.len(), 3, "the old file was replaced");
        assert_eq!(back.get("input_ids"), Some(&ids));
        assert_eq!(back.get("positions"), Some(&small));
        assert_eq!(back.get("mask"), Some(&mask));
        // Checkpoint loading accepts floats only.
        let err = Weights::load_file(&path).unwrap_err().to_string();
        assert!(err.contains("unsupported dtype"), "{err}");
    }

    #[test]
    fn save_rejects_bad_tensors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.safetensors");
        let t = ramp(&[2]);
        let err = save_safetensors(&path, [("a", &t), ("a", &t)]).unwrap_err();
        assert!(err.to_string().contains("`a`"), "{err}");
        let bad = HostTensor {
            ty: f32_ty(&[3]),
            data: Data::Float(vec![1.0]),
        };
        let err = save_safetensors(&path, [("b", &bad)]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "cannot save tensor `b`: 1 values do not fill f32[3]"
        );
        assert!(!path.exists());
        let err = save_safetensors(&dir.path().join("no/such/dir/x.safetensors"), [("a", &t)])
            .unwrap_err();
        assert!(
            err.to_string().contains("no/such/dir/x.safetensors"),
            "{err}"
        );
    }

    #[test]
    fn bf16_and_f16_convert_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let values = [1.5f32, -2.0, 0.1, 3.0e38, -0.0];
        let bf: Vec<u8> = values
            .iter()
            .flat_map(|&v| bf16::from_f32(v).to_le_bytes())
            .collect();
        let hf: Vec<u8> = values[..3]
            .iter()
            .flat_map(|&v| f16::from_f32(v).to_le_bytes())
            .collect();
        write_raw(
            &dir.path().join(SINGLE_FILE),
            &[("b", Dtype::BF16, &[5], bf), ("h", Dtype::F16, &[3], hf)],
        );
        let w = Weights::load_dir(dir.path()).unwrap();
        let b = w.get("b").unwrap();
        assert_eq!(b.ty, f32_ty(&[5]));
        let got = b.as_f32().unwrap();
        assert_eq!(got[0], 1.5);
        assert_eq!(got[1], -2.0);
        // 0.1 rounds to the nearest bf16, 0x3DCD = 0.10009765625.
        assert_eq!(f64::from(got[2]), 0.100_097_656_25);
        assert_eq!(got[2].to_bits(), 0x3DCD_0000);
        assert_eq!(got[3], bf16::from_f32(3.0e38).to_f32());
        assert!(got[4] == 0.0 && got[4].is_sign_negative());
        let h = w.get("h").unwrap().as_f32().unwrap();
        assert_eq!(h, [1.5, -2.0, f16::from_f32(0.1).to_f32()]);
        assert_eq!(f64::from(h[2]), 0.099_975_585_937_5);
    }

    #[test]
    fn sharded_checkpoint_loads_through_its_index() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b, c) = (ramp(&[2, 2]), ramp(&[3]), ramp(&[1, 4]));
        save_safetensors(
            &dir.path().join("model-00001-of-00002.safetensors"),
            [("a", &a), ("b", &b)],
        )
        .unwrap();
        save_safetensors(
            &dir.path().join("model-00002-of-00002.safetensors"),
            [("c", &c)],
        )
        .unwrap();
        // A stray file that the index does not mention is not read.
        fs::write(dir.path().join("junk.safetensors"), b"not safetensors").unwrap();
        let index = r#"{
            "metadata": {"total_size": 36},
            "weight_map": {
                "a": "model-00001-of-00002.safetensors",
                "b": "model-00001-of-00002.safetensors",
                "c": "model-00002-of-00002.safetensors"
            }
        }"#;
        fs::write(dir.path().join(INDEX_FILE), index).unwrap();
        let w = Weights::load_dir(dir.path()).unwrap();
        assert_eq!(w.len(), 3);
        assert_eq!(
            (w.get("a"), w.get("b"), w.get("c")),
            (Some(&a), Some(&b), Some(&c))
        );

        // A tensor mapped to a shard that lacks it.
        let wrong = index.replace(r#""c": "model-00002"#, r#""c": "model-00001"#);
        fs::write(dir.path().join(INDEX_FILE), wrong).unwrap();
        let err = Weights::load_dir(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("tensor `c`") && err.contains("model-00001-of-00002.safetensors"),
            "{err}"
        );
    }

    #[test]
    fn missing_shard_is_named() {
        let dir = tempfile::tempdir().unwrap();
        save_safetensors(
            &dir.path().join("model-00001-of-00002.safetensors"),
            [("a", &ramp(&[2]))],
        )
        .unwrap();
        let index = r#"{"weight_map": {"a": "model-00001-of-00002.safetensors",
                                       "c": "model-00002-of-00002.safetensors"}}"#;
        fs::write(dir.path().join(INDEX_FILE), index).unwrap();
        let err = Weights::load_dir(dir.path()).unwrap_err();
        assert!(matches!(err, WeightsError::MissingShards { .. }));
        let msg = err.to_string();
        assert!(msg.contains("model-00002-of-00002.safetensors"), "{msg}");
        assert!(!msg.contains("model-00001"), "{msg}");

        fs::write(dir.path().join(INDEX_FILE), "{\"weights\": {}}").unwrap();
        let msg = Weights::load_dir(dir.path()).unwrap_err().to_string();
        assert!(
            msg.contains(INDEX_FILE) && msg.contains("weight_map"),
            "{msg}"
        );
    }

    #[test]
    fn loose_files_load_in_name_order_and_duplicates_are_named() {
        let dir = tempfile::tempdir().unwrap();
        save_safetensors(
            &dir.path().join("b.safetensors"),
            [("x", &ramp(&[2])), ("y", &ramp(&[1]))],
        )
        .unwrap();
        save_safetensors(&dir.path().join("a.safetensors"), [("z", &ramp(&[3]))]).unwrap();
        fs::write(dir.path().join("notes.txt"), "ignored").unwrap();
        let w = Weights::load_dir(dir.path()).unwrap();
        assert_eq!(w.names().collect::<Vec<_>>(), ["x", "y", "z"]);

        save_safetensors(&dir.path().join("c.safetensors"), [("x", &ramp(&[2]))]).unwrap();
        let err = Weights::load_dir(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("`x` is in both")
                && err.contains("b.safetensors")
                && err.contains("c.safetensors"),
            "{err}"
        );

        // model.safetensors, when present, is the checkpoint: the other files are not read.
        save_safetensors(&dir.path().join(SINGLE_FILE), [("only", &ramp(&[1]))]).unwrap();
        let w = Weights::load_dir(dir.path()).unwrap();
        assert_eq!(w.names().collect::<Vec<_>>(), ["only"]);
    }

    #[test]
    fn empty_directory_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let err = Weights::load_dir(dir.path()).unwrap_err();
        assert!(matches!(err, WeightsError::NoCheckpoint { .. }));
        assert!(err.to_string().contains(&dir.path().display().to_string()));
        let missing = dir.path().join("nope");
        let err = Weights::load_dir(&missing).unwrap_err().to_string();
        assert!(err.contains("nope"), "{err}");
    }

    #[test]
    fn unsupported_dtypes_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(SINGLE_FILE);
        write_raw(
            &path,
            &[
                ("a", Dtype::F32, &[1], vec![0; 4]),
                ("x", Dtype::F8_E4M3, &[2], vec![0x38, 0x40]),
            ],
        );
        let err = Weights::load_dir(dir.path()).unwrap_err().to_string();
        assert_eq!(
            err,
            format!(
                "unsupported dtype F8_E4M3 for tensor `x` in {}; Fathom loads f32, bf16 and f16",
                path.display()
            )
        );
        write_raw(&path, &[("ids", Dtype::I64, &[1], vec![0; 8])]);
        let err = Weights::load_dir(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("unsupported dtype I64 for tensor `ids`"),
            "{err}"
        );
        write_raw(&path, &[("u", Dtype::U8, &[1], vec![0])]);
        let err = read_safetensors(&path).unwrap_err().to_string();
        assert!(err.contains("unsupported dtype U8 for tensor `u`"), "{err}");
    }

    #[test]
    fn truncated_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(SINGLE_FILE);
        save_safetensors(&path, [("a", &ramp(&[4, 4]))]).unwrap();
        let bytes = fs::read(&path).unwrap();
        fs::write(&path, &bytes[..bytes.len() - 10]).unwrap();
        let err = Weights::load_dir(dir.path()).unwrap_err();
        assert!(matches!(err, WeightsError::Corrupt { .. }));
        let msg = err.to_string();
        assert!(msg.starts_with(&path.display().to_string()), "{msg}");
        assert!(msg.contains("is not a valid safetensors file: "), "{msg}");

        fs::write(&path, b"abc").unwrap();
        let msg = Weights::load_dir(dir.path()).unwrap_err().to_string();
        assert!(msg.contains(&path.display().to_string()), "{msg}");
    }

    #[test]
    fn check_against_reports_every_problem_at_once() {
        let g = graph(&[
            ("model.layers.0.self_attn.q_a_proj.weight", &[24, 32]),
            ("model.norm.weight", &[32]),
            ("lm_head.weight", &[8, 32]),
        ]);
        let dir = tempfile::tempdir().unwrap();
        save_safetensors(
            &dir.path().join(SINGLE_FILE),
            [
                ("model.norm.weight", &ramp(&[16])),
                ("lm_head.weight", &ramp(&[8, 32])),
                ("foo.bar", &ramp(&[1])),
                ("model.layers.1.enorm.weight", &ramp(&[32])),
            ],
        )
        .unwrap();
        let w = Weights::load_dir(dir.path()).unwrap();
        let err = w
            .check_against(&g, |n| is_layer_at_or_above(n, 1))
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "checkpoint {} does not match the model:\n  \
                 missing: model.layers.0.self_attn.q_a_proj.weight (f32[24,32])\n  \
                 wrong shape: model.norm.weight is [16] in the checkpoint, the model expects [32]\n  \
                 unexpected: foo.bar",
                dir.path().display()
            )
        );
        let WeightsError::Mismatch { report, .. } = err else {
            panic!("not a mismatch")
        };
        assert_eq!(report.ignored, ["model.layers.1.enorm.weight"]);
        assert_eq!(report.unexpected, ["foo.bar"]);

        // Without the allowance the MTP tensor is unexpected too.
        let report = w.compare(&g);
        assert_eq!(
            report.unexpected,
            ["foo.bar", "model.layers.1.enorm.weight"]
        );
        assert!(!report.is_ok());
    }

    #[test]
    fn check_against_accepts_a_matching_checkpoint() {
        let g = graph(&[("a", &[2, 3]), ("model.layers.2.eh_proj.weight", &[2, 4])]);
        let mut w = Weights::new();
        w.insert("a", ramp(&[2, 3]));
        w.insert("model.layers.2.eh_proj.weight", ramp(&[2, 4]));
        w.insert("model.layers.3.hnorm.weight", ramp(&[2]));
        let report = w.check_against(&g, |n| is_layer_at_or_above(n, 3)).unwrap();
        assert!(report.is_ok());
        assert_eq!(report.ignored, ["model.layers.3.hnorm.weight"]);
        let err = w.check_against(&g, |_| false).unwrap_err().to_string();
        assert_eq!(
            err,
            "the weights do not match the model:\n  unexpected: model.layers.3.hnorm.weight"
        );
    }

    #[test]
    fn layer_filter() {
        assert!(is_layer_at_or_above("model.layers.61.enorm.weight", 61));
        assert!(is_layer_at_or_above("model.layers.62.mlp.gate.weight", 61));
        assert!(!is_layer_at_or_above("model.layers.60.mlp.gate.weight", 61));
        assert!(!is_layer_at_or_above("model.norm.weight", 0));
        assert!(!is_layer_at_or_above("model.layers.x.y", 0));
    }

    #[test]
    fn hf_fixtures_load() {
        let root = fixtures();
        if !root.is_dir() {
            return;
        }
        // Unsharded f32, written by transformers.
        let yarn = root.join("yarn");
        if yarn.join(SINGLE_FILE).is_file() {
            let w = Weights::load_dir(&yarn).unwrap();
            assert_eq!(w.get("model.norm.weight").unwrap().dims(), [32]);
            assert_eq!(w.get("lm_head.weight").unwrap().dims(), [64, 32]);
        }
        // Sharded bf16: every value loads as f32 holding a bf16.
        let sharded = root.join("bf16_sharded");
        if sharded.join(INDEX_FILE).is_file() {
            let w = Weights::load_dir(&sharded).unwrap();
            let index: serde_json::Value =
                serde_json::from_str(&fs::read_to_string(sharded.join(INDEX_FILE)).unwrap())
                    .unwrap();
            assert_eq!(w.len(), index["weight_map"].as_object().unwrap().len());
            for (name, t) in w.iter() {
                assert_eq!(t.ty.dtype, DType::F32, "{name}");
                for &v in t.as_f32().unwrap() {
                    assert_eq!(bf16::from_f32(v).to_f32().to_bits(), v.to_bits(), "{name}");
                }
            }
            let refs = read_safetensors(&sharded.join("reference.safetensors")).unwrap();
            assert_eq!(refs.get("input_ids").unwrap().ty.dtype, DType::I64);
        }
    }
}
