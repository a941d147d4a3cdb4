//! NVRTC compilation with a disk cache keyed by content.
//!
//! An entry is a folder `<cache>/<arch>/<key>/` holding `kernel.cu` (the source), `kernel.cubin`
//! (or `kernel.ptx` for a virtual architecture), `meta.json` (what was compiled, how, and a
//! checksum of the code) and `nvrtc.log`. The key hashes the source, the complete NVRTC option
//! list, the architecture and NVRTC's version, so any change that could change the code gives a
//! new entry and a stale entry is never used.
//!
//! Many ranks start at once and compile the same kernels, so writes are atomic: an entry is
//! written into a private temporary folder beside its final place and renamed into place. A rename
//! onto an existing folder fails; the loser of such a race checks the winner's entry and uses it.
//! Readers validate every entry (meta parses and matches, the source is the same text, the code
//! has the recorded length and checksum), so a damaged entry is detected and rebuilt.
//!
//! With an override folder ([`KernelOverrides`]), a kernel whose entry point has a hand-edited
//! `<entry>.cu` there is compiled from that file (and cached under its own key).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use fathom_compiler::codegen::fnv1a64;
use fathom_kernels::KernelSource;
use fathom_kernels::nvrtc::{Nvrtc, NvrtcError};
use serde::{Deserialize, Serialize};

use super::overrides::{KernelOverrides, OverrideError};

/// Bumped whenever the layout of an entry changes: part of the key.
const FORMAT: u32 = 1;

/// Errors of the kernel cache.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error(
        "NVRTC could not compile {kernel} for {arch}; the full source is in {} \
         (NVRTC's log beside it):\n{log}{excerpt}",
        source_file.display()
    )]
    Compile {
        kernel: String,
        arch: String,
        log: String,
        /// The failing source lines with line numbers.
        excerpt: String,
        /// Where the full source was written.
        source_file: PathBuf,
    },
    #[error(transparent)]
    Nvrtc(#[from] NvrtcError),
    #[error("kernel cache: {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no kernel cache folder: set FATHOM_CACHE_DIR (or HOME, for ~/.cache/fathom/cuda)")]
    NoCacheDir,
    #[error(transparent)]
    Override(#[from] OverrideError),
}

fn io<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> CacheError + 'a {
    move |source| CacheError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// Machine code for one kernel, ready for `cuModuleLoadData`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModuleImage {
    Cubin(Vec<u8>),
    /// PTX for the driver to JIT-compile (when NVRTC cannot target the device directly).
    Ptx(String),
}

impl ModuleImage {
    fn file_name(&self) -> &'static str {
        match self {
            ModuleImage::Cubin(_) => "kernel.cubin",
            ModuleImage::Ptx(_) => "kernel.ptx",
        }
    }

    fn bytes(&self) -> &[u8] {
        match self {
            ModuleImage::Cubin(bytes) => bytes,
            ModuleImage::Ptx(text) => text.as_bytes(),
        }
    }
}

/// What `meta.json` records.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EntryMeta {
    pub format: u32,
    pub name: String,
    pub entry: String,
    pub arch: String,
    /// `cubin` or `ptx`.
    pub code: String,
    pub nvrtc_version: (i32, i32),
    pub options: Vec<String>,
    /// FNV-1a 64 of the source, hex.
    pub source_hash: String,
    pub code_bytes: u64,
    /// FNV-1a 64 of the code file, hex: detects truncated or damaged entries.
    pub code_hash: String,
    pub registers: Option<u32>,
    pub spill_bytes: Option<u32>,
    /// Time NVRTC took, in microseconds (an integer, so meta.json round-trips exactly).
    pub compile_us: u64,
}

/// A kernel from the cache (or just compiled into it).
#[derive(Clone, Debug)]
pub struct CachedKernel {
    /// The entry's folder.
    pub dir: PathBuf,
    pub meta: EntryMeta,
    pub image: ModuleImage,
    /// Whether it was found in the cache (no compile happened).
    pub hit: bool,
    /// The hand-edited file it was compiled from, in place of the generated source.
    pub overridden_by: Option<PathBuf>,
}

/// Counts of what the cache did, since it was opened.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheCounters {
    pub hits: u64,
    /// NVRTC compiles (misses, rebuilds, and compiles that lost a race).
    pub compiles: u64,
    /// Entries found damaged and rebuilt.
    pub rebuilt: u64,
    /// Compiles whose rename lost to another writer of the same entry (whose entry was used).
    pub lost_races: u64,
}

/// Compiles kernels with NVRTC through a disk cache. Safe to share between threads and between
/// processes using the same folder.
#[derive(Debug)]
pub struct KernelCache {
    root: PathBuf,
    nvrtc: Nvrtc,
    hits: AtomicU64,
    compiles: AtomicU64,
    rebuilt: AtomicU64,
    lost_races: AtomicU64,
    overrides: Option<KernelOverrides>,
}

/// Distinguishes temporary folders of one process.
static TEMP_SERIAL: AtomicU64 = AtomicU64::new(0);

impl KernelCache {
    /// The default folder: `$FATHOM_CACHE_DIR`, else `~/.cache/fathom/cuda`.
    pub fn default_dir() -> Result<PathBuf, CacheError> {
        if let Some(dir) = std::env::var_os("FATHOM_CACHE_DIR").filter(|d| !d.is_empty()) {
            return Ok(PathBuf::from(dir));
        }
        std::env::var_os("HOME")
            .filter(|h| !h.is_empty())
            .map(|home| PathBuf::from(home).join(".cache/fathom/cuda"))
            .ok_or(CacheError::NoCacheDir)
    }

    /// A cache in `root` (created when first written).
    pub fn new(root: impl Into<PathBuf>, nvrtc: Nvrtc) -> Self {
        KernelCache {
            root: root.into(),
            nvrtc,
            hits: AtomicU64::new(0),
            compiles: AtomicU64::new(0),
            rebuilt: AtomicU64::new(0),
            lost_races: AtomicU64::new(0),
            overrides: None,
        }
    }

    /// The cache a run uses: in [`default_dir`](Self::default_dir), with the override folder
    /// `$FATHOM_KERNEL_OVERRIDE_DIR` names, if any.
    pub fn from_env(nvrtc: Nvrtc) -> Result<Self, CacheError> {
        Ok(Self::new(Self::default_dir()?, nvrtc).with_overrides(KernelOverrides::from_env()))
    }

    /// Compiles kernels from the hand-edited files in `overrides` where it has one (see
    /// [`KernelOverrides`]); `None` keeps the generated sources.
    pub fn with_overrides(mut self, overrides: Option<KernelOverrides>) -> Self {
        self.overrides = overrides;
        self
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn nvrtc(&self) -> &Nvrtc {
        &self.nvrtc
    }

    pub fn counters(&self) -> CacheCounters {
        CacheCounters {
            hits: self.hits.load(Ordering::Relaxed),
            compiles: self.compiles.load(Ordering::Relaxed),
            rebuilt: self.rebuilt.load(Ordering::Relaxed),
            lost_races: self.lost_races.load(Ordering::Relaxed),
        }
    }

    /// The entry key of `kernel` compiled for `arch` with `extra` options (16 hex digits).
    pub fn key(&self, kernel: &KernelSource, arch: &str, extra: &[String]) -> String {
        let options = self.nvrtc.options(arch, extra);
        let (major, minor) = self.nvrtc.version();
        let mut text = format!("fathom-kernel-cache {FORMAT}\0{arch}\0nvrtc {major}.{minor}\0");
        for option in &options {
            text.push_str(option);
            text.push('\0');
        }
        text.push_str(&kernel.entry);
        text.push('\0');
        text.push_str(&kernel.source);
        format!("{:016x}", fnv1a64(text.as_bytes()))
    }

    /// The folder of an entry.
    pub fn entry_dir(&self, arch: &str, key: &str) -> PathBuf {
        self.root.join(arch).join(key)
    }

    /// The compiled kernel: from the cache when a valid entry exists, otherwise compiled by
    /// NVRTC and stored. `arch` is a real (`sm_90a`: CUBIN) or virtual (`compute_90`: PTX)
    /// architecture. A hand-edited override of the kernel is compiled in its place, and said so
    /// on stderr.
    pub fn get_or_compile(
        &self,
        kernel: &KernelSource,
        arch: &str,
        extra: &[String],
    ) -> Result<CachedKernel, CacheError> {
        let overridden = match &self.overrides {
            Some(overrides) => overrides.apply(kernel)?,
            None => None,
        };
        let Some(overridden) = overridden else {
            return self.get_or_compile_source(kernel, arch, extra);
        };
        eprintln!(
            "fathom: kernel {} is compiled from the hand-edited {}",
            kernel.entry,
            overridden.path.display()
        );
        let mut cached = self.get_or_compile_source(&overridden.kernel, arch, extra)?;
        cached.overridden_by = Some(overridden.path);
        Ok(cached)
    }

    /// [`get_or_compile`](Self::get_or_compile) for every kernel of `kernels`, on rayon's
    /// threads (NVRTC compiles separate programs concurrently; a first run compiles tens of
    /// templates of a second or more each). The results come in `kernels`' order; a kernel that
    /// does not compile gives its error and the others still compile.
    pub fn get_or_compile_many(
        &self,
        kernels: &[KernelSource],
        arch: &str,
    ) -> Vec<Result<CachedKernel, CacheError>> {
        use rayon::prelude::*;
        kernels
            .par_iter()
            .map(|kernel| self.get_or_compile(kernel, arch, &[]))
            .collect()
    }

    fn get_or_compile_source(
        &self,
        kernel: &KernelSource,
        arch: &str,
        extra: &[String],
    ) -> Result<CachedKernel, CacheError> {
        let key = self.key(kernel, arch, extra);
        let dir = self.entry_dir(arch, &key);
        let expected = Expected {
            kernel,
            arch,
            options: self.nvrtc.options(arch, extra),
            nvrtc_version: self.nvrtc.version(),
        };
        match load_entry(&dir, &expected) {
            Ok(Some(found)) => {
                self.hits.fetch_add(1, Ordering::Relaxed);
                return Ok(found);
            }
            Ok(None) => {}
            Err(reason) => {
                eprintln!(
                    "fathom: kernel cache entry {} is invalid ({reason}); rebuilding it",
                    dir.display()
                );
                self.rebuilt.fetch_add(1, Ordering::Relaxed);
                discard(&dir);
            }
        }
        let (meta, image, log) = self.compile(kernel, arch, extra, &key)?;
        self.store(&dir, &expected, kernel, meta, image, &log)
    }

    fn compile(
        &self,
        kernel: &KernelSource,
        arch: &str,
        extra: &[String],
        key: &str,
    ) -> Result<(EntryMeta, ModuleImage, String), CacheError> {
        self.compiles.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let compiled = match self.nvrtc.compile_with(kernel, arch, extra) {
            Ok(compiled) => compiled,
            Err(NvrtcError::Compile {
                kernel: name,
                arch,
                log,
                excerpt,
            }) => {
                let failed = self.root.join(&arch).join("failed").join(key);
                std::fs::create_dir_all(&failed).map_err(io("create", &failed))?;
                let source_file = failed.join("kernel.cu");
                std::fs::write(&source_file, &kernel.source).map_err(io("write", &source_file))?;
                let log_file = failed.join("nvrtc.log");
                std::fs::write(&log_file, &log).map_err(io("write", &log_file))?;
                return Err(CacheError::Compile {
                    kernel: name,
                    arch,
                    log,
                    excerpt,
                    source_file,
                });
            }
            Err(other) => return Err(other.into()),
        };
        let compile_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        let image = match compiled.ptx {
            Some(ptx) if compiled.cubin.is_empty() => ModuleImage::Ptx(ptx),
            _ => ModuleImage::Cubin(compiled.cubin),
        };
        let bytes = image.bytes();
        let meta = EntryMeta {
            format: FORMAT,
            name: kernel.name.clone(),
            entry: kernel.entry.clone(),
            arch: arch.to_owned(),
            code: match image {
                ModuleImage::Cubin(_) => "cubin".to_owned(),
                ModuleImage::Ptx(_) => "ptx".to_owned(),
            },
            nvrtc_version: self.nvrtc.version(),
            options: compiled.options,
            source_hash: format!("{:016x}", fnv1a64(kernel.source.as_bytes())),
            code_bytes: bytes.len() as u64,
            code_hash: format!("{:016x}", fnv1a64(bytes)),
            registers: compiled.resources.map(|r| r.registers),
            spill_bytes: compiled
                .resources
                .map(|r| r.spill_load_bytes + r.spill_store_bytes),
            compile_us,
        };
        Ok((meta, image, compiled.log))
    }

    /// Writes an entry into a temporary folder and renames it into place; when another writer
    /// got there first, uses its entry if valid, else replaces it.
    fn store(
        &self,
        dir: &Path,
        expected: &Expected<'_>,
        kernel: &KernelSource,
        meta: EntryMeta,
        image: ModuleImage,
        log: &str,
    ) -> Result<CachedKernel, CacheError> {
        let parent = dir.parent().unwrap_or(&self.root);
        std::fs::create_dir_all(parent).map_err(io("create", parent))?;
        let temp = parent.join(format!(
            ".tmp-{}-{}-{}",
            dir.file_name().and_then(|n| n.to_str()).unwrap_or("entry"),
            std::process::id(),
            TEMP_SERIAL.fetch_add(1, Ordering::Relaxed)
        ));
        let written = write_entry(&temp, kernel, &meta, &image, log);
        if let Err(e) = written {
            let _ = std::fs::remove_dir_all(&temp);
            return Err(e);
        }
        let ours = CachedKernel {
            dir: dir.to_path_buf(),
            meta,
            image,
            hit: false,
            overridden_by: None,
        };
        // Two attempts: a damaged entry in the way is discarded once, then the rename retried.
        for _ in 0..2 {
            if std::fs::rename(&temp, dir).is_ok() {
                return Ok(ours);
            }
            match load_entry(dir, expected) {
                Ok(Some(theirs)) => {
                    self.lost_races.fetch_add(1, Ordering::Relaxed);
                    let _ = std::fs::remove_dir_all(&temp);
                    return Ok(CachedKernel {
                        hit: false,
                        overridden_by: None,
                        ..theirs
                    });
                }
                Ok(None) => {} // vanished in between: retry the rename
                Err(_) => discard(dir),
            }
        }
        let _ = std::fs::remove_dir_all(&temp);
        // Still no entry of ours: the compiled code is right, only caching failed.
        eprintln!(
            "fathom: could not store kernel cache entry {}; using the compiled kernel uncached",
            dir.display()
        );
        Ok(ours)
    }
}

/// What an entry must match.
struct Expected<'a> {
    kernel: &'a KernelSource,
    arch: &'a str,
    options: Vec<String>,
    nvrtc_version: (i32, i32),
}

fn write_entry(
    dir: &Path,
    kernel: &KernelSource,
    meta: &EntryMeta,
    image: &ModuleImage,
    log: &str,
) -> Result<(), CacheError> {
    std::fs::create_dir_all(dir).map_err(io("create", dir))?;
    let write = |name: &str, bytes: &[u8]| {
        let path = dir.join(name);
        std::fs::write(&path, bytes).map_err(io("write", &path))
    };
    write("kernel.cu", kernel.source.as_bytes())?;
    write(image.file_name(), image.bytes())?;
    write("nvrtc.log", log.as_bytes())?;
    let json = serde_json::to_vec_pretty(meta).map_err(|e| CacheError::Io {
        action: "serialise",
        path: dir.join("meta.json"),
        source: std::io::Error::other(e),
    })?;
    write("meta.json", &json)
}

/// Loads and validates an entry: `Ok(None)` when there is none, `Err(reason)` when it is damaged
/// or does not match what was asked for.
fn load_entry(dir: &Path, expected: &Expected<'_>) -> Result<Option<CachedKernel>, String> {
    let meta_path = dir.join("meta.json");
    let meta_bytes = match std::fs::read(&meta_path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !dir.exists() => return Ok(None),
        Err(e) => return Err(format!("meta.json unreadable: {e}")),
    };
    let meta: EntryMeta =
        serde_json::from_slice(&meta_bytes).map_err(|e| format!("meta.json: {e}"))?;
    let mismatch = |what: &str| Err(format!("meta.json: {what} differs"));
    if meta.format != FORMAT {
        return mismatch("format");
    }
    if meta.arch != expected.arch {
        return mismatch("architecture");
    }
    if meta.options != expected.options {
        return mismatch("options");
    }
    if meta.nvrtc_version != expected.nvrtc_version {
        return mismatch("NVRTC version");
    }
    if meta.entry != expected.kernel.entry {
        return mismatch("entry point");
    }
    // The key is a 64-bit hash: comparing the text rules out a collision.
    let source = std::fs::read(dir.join("kernel.cu")).map_err(|e| format!("kernel.cu: {e}"))?;
    if source != expected.kernel.source.as_bytes() {
        return Err("kernel.cu differs from the source".to_owned());
    }
    let (file, ptx) = match meta.code.as_str() {
        "cubin" => ("kernel.cubin", false),
        "ptx" => ("kernel.ptx", true),
        other => return Err(format!("meta.json: unknown code kind `{other}`")),
    };
    let code = std::fs::read(dir.join(file)).map_err(|e| format!("{file}: {e}"))?;
    if code.len() as u64 != meta.code_bytes || format!("{:016x}", fnv1a64(&code)) != meta.code_hash
    {
        return Err(format!(
            "{file} has {} bytes with checksum {:016x}, meta.json says {} bytes, {}",
            code.len(),
            fnv1a64(&code),
            meta.code_bytes,
            meta.code_hash
        ));
    }
    let image = if ptx {
        ModuleImage::Ptx(String::from_utf8(code).map_err(|_| "kernel.ptx is not UTF-8")?)
    } else {
        ModuleImage::Cubin(code)
    };
    Ok(Some(CachedKernel {
        dir: dir.to_path_buf(),
        meta,
        image,
        hit: true,
        overridden_by: None,
    }))
}

/// Moves a damaged entry out of the way (rename first, so a concurrent reader never sees a
/// half-deleted folder under the entry's name), then deletes it.
fn discard(dir: &Path) {
    let trash = dir.with_extension(format!(
        "discarded-{}-{}",
        std::process::id(),
        TEMP_SERIAL.fetch_add(1, Ordering::Relaxed)
    ));
    if std::fs::rename(dir, &trash).is_ok() {
        let _ = std::fs::remove_dir_all(&trash);
    }
}

#[cfg(test)]
#[path = "cache_tests.rs"]
mod tests;
