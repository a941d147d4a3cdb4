//! Choosing each FP8 GEMM's tile and schedule by timing them on the device. A plan picks tiles
//! by a shape heuristic and one thread block per tile; which candidate (tile width, stages, a
//! cluster pair multicasting B) under which schedule (one block per tile, or persistent blocks
//! in raster bands of 1, 8 or 16 row blocks) is fastest depends on the shape and the GPU, and
//! only timing tells. With tuning on, the first run on a device times every candidate of each
//! large GEMM form of its plan (the candidates `gpu-check` sweeps) and writes the fastest to
//! `<kernel cache>/<arch>/gemm-tuning.json`; later runs read it. Small GEMMs, where the choice
//! matters little and timing would cost more than it saves, keep the heuristic's tile. A
//! candidate's timing counts only if its product on the timing operands is the heuristic
//! tile's (checked on the device, `gemm_tuning_device`), and a launch that hangs stops the
//! tuning with an error naming it, so a faulty configuration is never chosen silently.
//!
//! `FATHOM_GEMM_TUNING`: `large` (forms of at least 2³³ FLOPs, 8.6 GFLOP), `all`, or `off`
//! (every GEMM as the heuristic plans it; the file is not read). `off` is the default until the
//! candidates have run on a GPU: the heuristic's tile under one block per tile is the
//! configuration measured correct on an H200 (session 12), while the cluster pairs and the
//! persistent schedules have only been checked on the CPU (their tile walks, the pipeline
//! protocol's model, NVRTC). `gpu-check` checks every candidate under every schedule (check 3)
//! and runs a tuned product against the CPU; once it passes on a GPU, `large` is the default to
//! choose.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use fathom_kernels::{BScaling, Fp8GemmParams, GemmGrouping, GemmOutput, TileSchedule};
use serde::{Deserialize, Serialize};

use super::gemm_choice::{GemmChoice, GemmForm};

/// The environment variable that sets the [`TuningPolicy`].
pub const TUNING_VAR: &str = "FATHOM_GEMM_TUNING";
/// FLOPs from which the default policy times a GEMM form.
pub const LARGE_FLOPS: f64 = 8_589_934_592.0;
/// The raster bands a persistent schedule is timed with.
pub const PERSISTENT_BANDS: [u32; 3] = [1, 8, 16];

/// Which GEMM forms are timed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TuningPolicy {
    Off,
    Large,
    All,
}

impl TuningPolicy {
    /// `FATHOM_GEMM_TUNING`'s value (`off` when unset, see the module docs); an unknown value
    /// is an error naming the ones it takes.
    pub fn parse(value: Option<&str>) -> Result<Self, String> {
        match value.map(str::trim) {
            None | Some("") | Some("off") | Some("0") => Ok(TuningPolicy::Off),
            Some("large") => Ok(TuningPolicy::Large),
            Some("all") => Ok(TuningPolicy::All),
            Some(other) => Err(format!(
                "{TUNING_VAR}={other}: expected `large`, `all` or `off` (the default)"
            )),
        }
    }

    pub fn from_env() -> Result<Self, String> {
        Self::parse(std::env::var(TUNING_VAR).ok().as_deref())
    }

    /// Whether `form` is timed under this policy.
    pub fn takes(&self, form: &GemmForm) -> bool {
        match self {
            TuningPolicy::Off => false,
            TuningPolicy::Large => form.flops() >= LARGE_FLOPS,
            TuningPolicy::All => true,
        }
    }
}

/// The fastest candidate found for one form.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TunedGemm {
    /// The kernel's name (`Fp8GemmParams::name`), which names its tile configuration.
    pub kernel: String,
    /// The raster band of a persistent schedule; `None`: one block per tile.
    pub persistent_band: Option<u32>,
    pub tflops: f64,
    /// The heuristic's tile with one block per tile, timed in the same run.
    pub default_tflops: f64,
}

impl TunedGemm {
    /// The choice it names among `form`'s candidates, with the persistent schedule's blocks
    /// (`persistent_blocks` of the kernel on this device); `None` when no candidate has that
    /// name (the candidates changed since it was timed: time again).
    pub fn choice(
        &self,
        form: &GemmForm,
        persistent_blocks: impl FnOnce(&Fp8GemmParams) -> u32,
    ) -> Option<GemmChoice> {
        let params = form
            .candidates()
            .into_iter()
            .find(|p| p.name() == self.kernel)?;
        let schedule = match self.persistent_band {
            None => TileSchedule::ONE_TILE_PER_BLOCK,
            Some(band) => TileSchedule::persistent(persistent_blocks(&params), band),
        };
        Some(GemmChoice { params, schedule })
    }
}

/// How a schedule reads in a line: `one block per tile`, `persistent blocks in bands of 8`.
pub fn schedule_words(band: Option<u32>) -> String {
    band.map_or("one block per tile".to_owned(), |b| {
        format!("persistent blocks in bands of {b}")
    })
}

/// One timing of a candidate.
#[derive(Clone, Debug, PartialEq)]
pub struct Timing {
    pub params: Fp8GemmParams,
    pub persistent_band: Option<u32>,
    pub tflops: f64,
}

/// The fastest of `timings` (the first of equals), with the default's TFLOPS: the first
/// timing of `default` under one block per tile (0 when it was not timed).
pub fn fastest(timings: &[Timing], default: &Fp8GemmParams) -> Option<TunedGemm> {
    let best = timings.iter().filter(|t| t.tflops.is_finite()).fold(
        None::<&Timing>,
        |best, t| match best {
            Some(b) if b.tflops >= t.tflops => Some(b),
            _ => Some(t),
        },
    )?;
    let default_tflops = timings
        .iter()
        .find(|t| t.params == *default && t.persistent_band.is_none())
        .map_or(0.0, |t| t.tflops);
    Some(TunedGemm {
        kernel: best.params.name(),
        persistent_band: best.persistent_band,
        tflops: best.tflops,
        default_tflops,
    })
}

/// The tuning file's contents.
#[derive(Debug, Default, Serialize, Deserialize)]
struct TuningFile {
    /// The device the timings were made on; another device's are not used.
    device: String,
    /// By [`GemmForm::key`].
    gemms: BTreeMap<String, TunedGemm>,
}

/// The tuned forms of one device, read from and written to `path`.
#[derive(Debug)]
pub struct GemmTuning {
    path: PathBuf,
    file: TuningFile,
    changed: bool,
}

impl GemmTuning {
    /// `<cache root>/<arch>/gemm-tuning.json`.
    pub fn path_in(cache_root: &Path, arch: &str) -> PathBuf {
        cache_root.join(arch).join("gemm-tuning.json")
    }

    /// The timings at `path` made on `device`. A missing file, or one of another device, gives
    /// none; an unreadable one is reported in one line and replaced when saved (timing again
    /// costs a little time, never a wrong result).
    pub fn open(path: &Path, device: &str) -> Self {
        let file = match std::fs::read_to_string(path) {
            Err(_) => None,
            Ok(text) => match serde_json::from_str::<TuningFile>(&text) {
                Ok(file) => Some(file),
                Err(e) => {
                    eprintln!(
                        "fathom: ignoring the GEMM tuning file {} ({e}); timing again",
                        path.display()
                    );
                    None
                }
            },
        };
        let file = file
            .filter(|f| f.device == device)
            .unwrap_or_else(|| TuningFile {
                device: device.to_owned(),
                gemms: BTreeMap::new(),
            });
        GemmTuning {
            path: path.to_path_buf(),
            file,
            changed: false,
        }
    }

    pub fn get(&self, form: &GemmForm) -> Option<&TunedGemm> {
        self.file.gemms.get(&form.key())
    }

    pub fn insert(&mut self, form: &GemmForm, tuned: TunedGemm) {
        self.file.gemms.insert(form.key(), tuned);
        self.changed = true;
    }

    /// Writes the file if something was inserted: into a temporary file beside it, renamed into
    /// place, so that ranks starting at once never read a half-written file.
    pub fn save(&mut self) -> std::io::Result<()> {
        if !self.changed {
            return Ok(());
        }
        let dir = self.path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir)?;
        // Unique per process and per save: ranks may be threads of one process.
        static SERIAL: AtomicU64 = AtomicU64::new(0);
        let temp = dir.join(format!(
            ".gemm-tuning-{}-{}.json",
            std::process::id(),
            SERIAL.fetch_add(1, Ordering::Relaxed)
        ));
        let text = serde_json::to_string_pretty(&self.file).map_err(std::io::Error::other)?;
        let written = (|| {
            let mut out = std::fs::File::create(&temp)?;
            out.write_all(text.as_bytes())?;
            out.sync_all()?;
            drop(out);
            std::fs::rename(&temp, &self.path)
        })();
        if written.is_err() {
            let _ = std::fs::remove_file(&temp);
        }
        written?;
        self.changed = false;
        Ok(())
    }
}

/// Operands to time a form on: random E4M3 codes (the exponent's top bit clear: no NaN
/// codes), unit scales, the experts owning equal runs of row blocks, the K groups equal runs of
/// whole 128-blocks, scattered rows written in place. Timing does not depend on the values.
#[derive(Clone, Debug, PartialEq)]
pub struct TimingOperands {
    /// `[M][K]` codes.
    pub a: Vec<u8>,
    /// `[groups · N][K]` codes (one `[N][K]` for a K-grouped form).
    pub b: Vec<u8>,
    pub scale_a: Vec<f32>,
    pub scale_b: Vec<f32>,
    /// Bytes of the output (an `[M][N]` per K group).
    pub out_bytes: usize,
    /// Empty where the form has none.
    pub block_expert: Vec<i32>,
    pub out_rows: Vec<i32>,
    pub k_offsets: Vec<i32>,
}

impl TimingOperands {
    pub fn of(form: &GemmForm, seed: &mut u64) -> Self {
        let p = form.problem;
        let (m, n, k, groups) = (
            p.m as usize,
            p.n as usize,
            p.k as usize,
            p.groups.max(1) as usize,
        );
        let mut code = || {
            *seed ^= *seed << 13;
            *seed ^= *seed >> 7;
            *seed ^= *seed << 17;
            ((*seed >> 32) as u8) & 0xb7
        };
        let k_blocks = k.div_ceil(128);
        let k_grouped = form.grouping == GemmGrouping::KGrouped;
        let b_matrices = if k_grouped { 1 } else { groups };
        let scale_b = match form.b_scaling {
            BScaling::Block128x128 => b_matrices * n.div_ceil(128) * k_blocks,
            BScaling::Row1x128 => k_blocks * n.next_multiple_of(4),
        };
        let outputs = if k_grouped { groups } else { 1 };
        let out_elem = if form.output == GemmOutput::Bf16 {
            2
        } else {
            4
        };
        let row_blocks = m.div_ceil(128);
        TimingOperands {
            a: (0..m * k).map(|_| code()).collect(),
            b: (0..b_matrices * n * k).map(|_| code()).collect(),
            scale_a: vec![1.0; k_blocks * m.next_multiple_of(4)],
            scale_b: vec![1.0; scale_b],
            out_bytes: outputs * m * n * out_elem,
            block_expert: match form.grouping {
                GemmGrouping::Contiguous => (0..row_blocks)
                    .map(|i| (i * groups / row_blocks) as i32)
                    .collect(),
                _ => Vec::new(),
            },
            out_rows: match form.output {
                GemmOutput::F32Scattered => (0..m as i32).collect(),
                _ => Vec::new(),
            },
            k_offsets: match form.grouping {
                GemmGrouping::KGrouped => (0..=groups)
                    .map(|g| match g == groups {
                        true => k as i32,
                        false => (g * (k / 128) / groups * 128) as i32,
                    })
                    .collect(),
                _ => Vec::new(),
            },
        }
    }
}

/// The choices for `forms` from `tuning`, timing those `policy` takes that it lacks with
/// `time` (every candidate under every schedule; `None` for a candidate that could not run).
/// `persistent_blocks` gives a kernel's persistent block count on this device.
pub fn choose(
    forms: &[GemmForm],
    policy: TuningPolicy,
    tuning: &mut GemmTuning,
    mut time: impl FnMut(&GemmForm, &Fp8GemmParams, Option<u32>) -> Option<f64>,
    mut persistent_blocks: impl FnMut(&Fp8GemmParams) -> u32,
) -> HashMap<GemmForm, GemmChoice> {
    let mut choices = HashMap::new();
    for form in forms.iter().filter(|f| policy.takes(f)) {
        let known = tuning
            .get(form)
            .and_then(|t| t.choice(form, &mut persistent_blocks));
        let choice = match known {
            Some(choice) => Some(choice),
            None => {
                let mut timings = Vec::new();
                for params in form.candidates() {
                    for band in std::iter::once(None).chain(PERSISTENT_BANDS.map(Some)) {
                        if let Some(ms) = time(form, &params, band) {
                            let tflops = form.flops() / (ms * 1e-3) / 1e12;
                            timings.push(Timing {
                                params,
                                persistent_band: band,
                                tflops,
                            });
                        }
                    }
                }
                fastest(&timings, &form.default_params()).and_then(|tuned| {
                    eprintln!(
                        "fathom: FP8 GEMM {}: {} under {} at {:.0} TFLOPS (the default tile: {:.0})",
                        form.key(),
                        tuned.kernel,
                        schedule_words(tuned.persistent_band),
                        tuned.tflops,
                        tuned.default_tflops
                    );
                    let choice = tuned.choice(form, &mut persistent_blocks);
                    tuning.insert(form, tuned);
                    choice
                })
            }
        };
        if let Some(choice) = choice {
            choices.insert(*form, choice);
        }
    }
    choices
}

#[cfg(test)]
#[path = "gemm_tuning_tests.rs"]
mod tests;
