//! The tuner's timings on the device (`gemm_tuning` decides what to time and keeps the
//! results): each form's operands (random E4M3 codes, unit scales, experts owning equal runs of
//! row blocks) allocated once, each candidate loaded through the kernel cache and launched a
//! few times between two events. A candidate that does not load or launch is skipped with a
//! line saying why; the others still compete.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

use cudarc::driver::CudaStream;
use fathom_kernels::{Fp8GemmParams, TileSchedule};

use super::CudaError;
use super::alloc::{Block, CachingAllocator};
use super::cache::KernelCache;
use super::device::GpuDevice;
use super::fp8_gemm::{Fp8Gemm, Fp8GemmOperands};
use super::gemm_choice::{GemmChoice, GemmForm};
use super::gemm_tuning::{GemmTuning, TimingOperands, TuningPolicy, choose};
use super::library::LibraryPlan;
use super::memory::{DriverMemory, mean_launch_ms, stream_id, upload};

/// Launches per timing, after [`WARMUP`] untimed ones.
const ITERS: u32 = 10;
const WARMUP: u32 = 2;

/// The choices for `plan`'s sm_90a FP8 GEMMs on `device` (kernels compiled for `arch`) under
/// `policy`: read from the tuning file beside the kernel cache, the missing ones timed now and
/// written there.
pub fn tuned_choices(
    device: &GpuDevice,
    cache: &KernelCache,
    (arch, policy): (&str, TuningPolicy),
    plan: &LibraryPlan,
) -> Result<HashMap<GemmForm, GemmChoice>, CudaError> {
    let forms = plan.fp8_gemm_forms();
    if !forms.iter().any(|f| policy.takes(f)) {
        return Ok(HashMap::new());
    }
    let path = GemmTuning::path_in(cache.root(), arch);
    let mut tuning = GemmTuning::open(&path, &device.name);
    precompile_candidates(cache, &forms, policy, &tuning);
    let stream = device
        .ctx
        .new_stream()
        .map_err(|e| CudaError::driver("creating the tuning stream".into(), e))?;
    let bench = RefCell::new(Bench::new(device, cache, &stream));
    let time = |form: &GemmForm, params: &Fp8GemmParams, band: Option<u32>| {
        let timed = bench.borrow_mut().time(form, params, band);
        timed.map(Some).unwrap_or_else(|e| {
            eprintln!(
                "fathom: FP8 GEMM {}: {} not timed ({e})",
                form.key(),
                params.name()
            );
            None
        })
    };
    let blocks = |params: &Fp8GemmParams| bench.borrow_mut().persistent_blocks(params);
    let choices = choose(&forms, policy, &mut tuning, time, blocks);
    bench.into_inner().free()?;
    if let Err(e) = tuning.save() {
        eprintln!(
            "fathom: could not write the GEMM tuning file {} ({e}); the next run times again",
            path.display()
        );
    }
    Ok(choices)
}

/// Compiles every candidate the timings will load, on all the machine's threads (a first run
/// compiles tens of them, a second or more each); a candidate that does not compile is said so
/// again when it is loaded, and skipped.
fn precompile_candidates(
    cache: &KernelCache,
    forms: &[GemmForm],
    policy: TuningPolicy,
    tuning: &GemmTuning,
) {
    let mut params: Vec<Fp8GemmParams> = Vec::new();
    let untimed = forms
        .iter()
        .filter(|f| policy.takes(f) && tuning.get(f).is_none());
    for candidate in untimed.flat_map(GemmForm::candidates) {
        if !params.contains(&candidate) {
            params.push(candidate);
        }
    }
    let sources: Vec<_> = params.iter().filter_map(|p| p.instantiate().ok()).collect();
    if let Some(first) = sources.first() {
        let arch = first.arch_requirement.compile_arch();
        drop(cache.get_or_compile_many(&sources, arch));
    }
}

/// The loaded candidates and the current form's operands.
struct Bench<'a> {
    device: &'a GpuDevice,
    cache: &'a KernelCache,
    stream: &'a Arc<CudaStream>,
    allocator: CachingAllocator<DriverMemory>,
    gemms: HashMap<Fp8GemmParams, Fp8Gemm>,
    operands: Option<(GemmForm, Fp8GemmOperands, Vec<Block>)>,
}

impl<'a> Bench<'a> {
    fn new(device: &'a GpuDevice, cache: &'a KernelCache, stream: &'a Arc<CudaStream>) -> Self {
        Bench {
            device,
            cache,
            stream,
            allocator: CachingAllocator::new(DriverMemory::new(Arc::clone(&device.ctx))),
            gemms: HashMap::new(),
            operands: None,
        }
    }

    fn gemm(&mut self, params: &Fp8GemmParams) -> Result<&Fp8Gemm, CudaError> {
        if !self.gemms.contains_key(params) {
            let gemm = Fp8Gemm::load(&self.device.ctx, self.cache, *params)?;
            self.gemms.insert(*params, gemm);
        }
        Ok(&self.gemms[params])
    }

    /// One block per SM, or as many whole clusters as fit at once (the SM count when the
    /// kernel cannot say).
    fn persistent_blocks(&mut self, params: &Fp8GemmParams) -> u32 {
        let (stream, sms) = (Arc::clone(self.stream), self.device.multiprocessors);
        self.gemm(params)
            .and_then(|g| g.persistent_schedule(&stream, sms, 1))
            .ok()
            .and_then(|s| s.max_blocks)
            .unwrap_or(sms)
    }

    /// Milliseconds per launch of `params` on `form`'s operands, persistent in bands of `band`
    /// or one block per tile.
    fn time(
        &mut self,
        form: &GemmForm,
        params: &Fp8GemmParams,
        band: Option<u32>,
    ) -> Result<f64, CudaError> {
        let operands = self.operands_for(form)?;
        let (stream, sms) = (Arc::clone(self.stream), self.device.multiprocessors);
        let gemm = self.gemm(params)?;
        let schedule = match band {
            None => TileSchedule::ONE_TILE_PER_BLOCK,
            Some(band) => gemm.persistent_schedule(&stream, sms, band)?,
        };
        mean_launch_ms(
            &stream,
            (WARMUP, ITERS),
            || gemm.launch(&stream, &form.problem, &operands, &schedule),
            || {
                stream
                    .synchronize()
                    .map_err(|e| CudaError::driver("warming up".into(), e))
            },
        )
    }

    /// `form`'s operands, allocated when the form changes (the previous form's freed).
    fn operands_for(&mut self, form: &GemmForm) -> Result<Fp8GemmOperands, CudaError> {
        if let Some((current, operands, _)) = &self.operands
            && current == form
        {
            return Ok(*operands);
        }
        self.free_operands()?;
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let host = TimingOperands::of(form, &mut seed);
        let mut blocks = Vec::new();
        let mut optional = |bench: &mut Self, v: &[i32]| -> Result<Option<u64>, CudaError> {
            Ok(match v.is_empty() {
                true => None,
                false => Some(bench.put(&mut blocks, v)?),
            })
        };
        let (block_expert, out_rows, k_offsets) = (
            optional(self, &host.block_expert)?,
            optional(self, &host.out_rows)?,
            optional(self, &host.k_offsets)?,
        );
        let operands = Fp8GemmOperands {
            a: self.put(&mut blocks, &host.a)?,
            b: self.put(&mut blocks, &host.b)?,
            scale_a: self.put(&mut blocks, &host.scale_a)?,
            scale_b: self.put(&mut blocks, &host.scale_b)?,
            out: self.put(&mut blocks, &vec![0u8; host.out_bytes])?,
            block_expert,
            out_rows,
            k_offsets,
        };
        self.operands = Some((*form, operands, blocks));
        Ok(operands)
    }

    /// A device copy of `host`, its block added to `blocks`; its address.
    fn put<T: Copy>(&mut self, blocks: &mut Vec<Block>, host: &[T]) -> Result<u64, CudaError> {
        let bytes = size_of_val(host).max(1);
        let block = self.allocator.alloc(bytes, stream_id(self.stream))?;
        let ptr = block.ptr;
        blocks.push(block);
        upload(self.stream, ptr, host)
            .map_err(|e| CudaError::driver("uploading timing operands".into(), e))?;
        Ok(ptr)
    }

    fn free_operands(&mut self) -> Result<(), CudaError> {
        if let Some((_, _, blocks)) = self.operands.take() {
            self.stream
                .synchronize()
                .map_err(|e| CudaError::driver("finishing the timings".into(), e))?;
            for block in blocks {
                self.allocator.free(block)?;
            }
        }
        Ok(())
    }

    fn free(mut self) -> Result<(), CudaError> {
        self.free_operands()?;
        self.allocator.streams_synchronized();
        self.allocator.empty_cache()?;
        Ok(())
    }
}
