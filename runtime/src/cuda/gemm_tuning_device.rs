//! The tuner's timings on the device (`gemm_tuning` decides what to time and keeps the
//! results): each form's operands (random E4M3 codes, unit scales, experts owning equal runs of
//! row blocks) allocated once, each candidate loaded through the kernel cache and launched a
//! few times between two events. A candidate that does not load or launch is skipped with a
//! line saying why; the others still compete.
//!
//! Before a candidate's timing counts, its product must be the default tile's: the heuristic's
//! tile under one block per tile (the configuration checked against the CPU on an H200) runs
//! once per form as the reference, and each candidate under each schedule runs once on a
//! cleared output and is compared on the device (`fathom_kernels::Agreement`). Candidates sum
//! the same K blocks of the same codes with the same scales, so a correct one agrees to
//! rounding (DeepGEMM's diff ~1e-14 in f32, a few bf16 ulps at most); one wrong tile among
//! F tiles gives a diff of about 1/(2F), above [`AGREEMENT_BOUND`] for any F under 500 000.
//! A candidate that disagrees is skipped, said in a line; a launch that does not finish within
//! [`HANG_LIMIT`] stops the tuning with [`CudaError::Hung`] (a hung context cannot go on).

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

use cudarc::driver::CudaStream;
use fathom_kernels::{Agreement, AgreementParams, Elem, Fp8GemmParams, GemmOutput, TileSchedule};

use super::CudaError;
use super::alloc::{Block, CachingAllocator};
use super::cache::KernelCache;
use super::device::GpuDevice;
use super::fp8_gemm::{Fp8Gemm, Fp8GemmOperands};
use super::gemm_choice::{GemmChoice, GemmForm};
use super::gemm_tuning::{
    GemmTuning, TUNING_VAR, TimingOperands, TuningPolicy, choose, schedule_words,
};
use super::library::LibraryPlan;
use super::memory::{
    DriverMemory, HANG_LIMIT, download, finish_within, mean_launch_ms, stream_id, upload,
    zero_bytes,
};
use super::modules::{Arg, LoadedKernel, args_by_name, launch, load_kernel};

/// Launches per timing, after [`WARMUP`] untimed ones.
const ITERS: u32 = 10;
const WARMUP: u32 = 2;
/// The largest diff (`Σ(x − y)² / Σ(x² + y²)`) from the default tile's product that a candidate
/// may have (see the module docs).
pub const AGREEMENT_BOUND: f64 = 1e-6;

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
    let bench = RefCell::new(Bench::new(device, cache, arch, &stream));
    // A hang ends the tuning: nothing more can run in the context.
    let hung = RefCell::new(None);
    let time = |form: &GemmForm, params: &Fp8GemmParams, band: Option<u32>| {
        if hung.borrow().is_some() {
            return None;
        }
        match bench.borrow_mut().time(form, params, band) {
            Ok(ms) => Some(ms),
            Err(e @ CudaError::Hung { .. }) => {
                *hung.borrow_mut() = Some(e);
                None
            }
            Err(e) => {
                eprintln!(
                    "fathom: FP8 GEMM {}: {} under {} not timed ({e})",
                    form.key(),
                    params.name(),
                    schedule_words(band)
                );
                None
            }
        }
    };
    let blocks = |params: &Fp8GemmParams| bench.borrow_mut().persistent_blocks(params);
    let choices = choose(&forms, policy, &mut tuning, time, blocks);
    if let Some(hang) = hung.into_inner() {
        return Err(CudaError::Launch(format!(
            "tuning the FP8 GEMMs: {hang}; `{}=off` runs the untuned tiles",
            TUNING_VAR
        )));
    }
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

/// The current form's operands on the device.
struct FormOperands {
    form: GemmForm,
    operands: Fp8GemmOperands,
    /// Bytes of the output (`TimingOperands::out_bytes`).
    out_bytes: usize,
    /// The default tile's product (one block per tile), or why there is none.
    reference: Result<u64, String>,
    /// The agreement kernel's three f64 sums.
    sums: u64,
    blocks: Vec<Block>,
}

impl FormOperands {
    /// The output's element type and element count.
    fn output(&self) -> (Elem, usize) {
        let elem = match self.form.output {
            GemmOutput::Bf16 => Elem::Bf16,
            _ => Elem::F32,
        };
        (elem, self.out_bytes / elem.bytes())
    }
}

/// The loaded candidates and the current form's operands.
struct Bench<'a> {
    device: &'a GpuDevice,
    cache: &'a KernelCache,
    /// What the agreement kernels are compiled for.
    arch: &'a str,
    stream: &'a Arc<CudaStream>,
    allocator: CachingAllocator<DriverMemory>,
    gemms: HashMap<Fp8GemmParams, Fp8Gemm>,
    agreements: HashMap<Elem, LoadedKernel>,
    operands: Option<FormOperands>,
}

impl<'a> Bench<'a> {
    fn new(
        device: &'a GpuDevice,
        cache: &'a KernelCache,
        arch: &'a str,
        stream: &'a Arc<CudaStream>,
    ) -> Self {
        Bench {
            device,
            cache,
            arch,
            stream,
            allocator: CachingAllocator::new(DriverMemory::new(Arc::clone(&device.ctx))),
            gemms: HashMap::new(),
            agreements: HashMap::new(),
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
        let schedule = match band {
            None => TileSchedule::ONE_TILE_PER_BLOCK,
            Some(band) => self.gemm(params)?.persistent_schedule(&stream, sms, band)?,
        };
        let what = || format!("{} under {}", params.name(), schedule_words(band));
        let agreement = self.agreement(params, &schedule, what)?;
        if !agreement.within(AGREEMENT_BOUND) {
            return Err(CudaError::Launch(format!(
                "its product is not the default tile's: diff {:.1e} (bound {AGREEMENT_BOUND:.0e}), \
                 {} elements not finite",
                agreement.diff, agreement.not_finite
            )));
        }
        let gemm = self.gemm(params)?;
        mean_launch_ms(
            &stream,
            (WARMUP, ITERS),
            || gemm.launch(&stream, &form.problem, &operands, &schedule),
            || finish_within(&stream, HANG_LIMIT, what),
        )
    }

    /// How far `params`' product under `schedule`, on a cleared output, lies from the current
    /// form's reference.
    fn agreement(
        &mut self,
        params: &Fp8GemmParams,
        schedule: &TileSchedule,
        what: impl FnOnce() -> String,
    ) -> Result<Agreement, CudaError> {
        let stream = Arc::clone(self.stream);
        let current = self
            .operands
            .as_ref()
            .ok_or_else(|| CudaError::Launch("no operands to check the product on".into()))?;
        let reference = current.reference.clone().map_err(|e| {
            CudaError::Launch(format!("no reference product to check it against ({e})"))
        })?;
        let (form, operands, sums) = (current.form, current.operands, current.sums);
        let (elem, elements) = current.output();
        let driver = |what: &'static str| move |e| CudaError::driver(what.to_owned(), e);
        zero_bytes(&stream, operands.out, current.out_bytes)
            .map_err(driver("clearing the output"))?;
        zero_bytes(&stream, sums, 3 * 8).map_err(driver("clearing the sums"))?;
        self.gemm(params)?
            .launch(&stream, &form.problem, &operands, schedule)?;
        let agreement = AgreementParams { elem };
        let kernel = self.agreement_kernel(agreement)?;
        let named = [
            ("x", Arg::Ptr(operands.out)),
            ("y", Arg::Ptr(reference)),
            ("n", Arg::I64(elements as i64)),
            ("sums", Arg::Ptr(sums)),
        ];
        let mut args = args_by_name(&agreement.name(), &agreement.kernel_params(), &named)?;
        let [gx, gy, gz] = agreement.grid(elements as u64);
        launch(
            &stream,
            &kernel.function,
            (gx, gy, gz),
            (agreement.block_threads(), 1, 1),
            0,
            &mut args,
        )?;
        finish_within(&stream, HANG_LIMIT, what)?;
        let mut totals = [0f64; 3];
        download(&stream, sums, &mut totals).map_err(driver("reading the sums"))?;
        Ok(Agreement::from_sums(totals))
    }

    fn agreement_kernel(&mut self, params: AgreementParams) -> Result<&LoadedKernel, CudaError> {
        if !self.agreements.contains_key(&params.elem) {
            let source = params.instantiate()?;
            let kernel = load_kernel(&self.device.ctx, self.cache, &source, self.arch)?;
            self.agreements.insert(params.elem, kernel);
        }
        Ok(&self.agreements[&params.elem])
    }

    /// `form`'s operands, allocated when the form changes (the previous form's freed).
    fn operands_for(&mut self, form: &GemmForm) -> Result<Fp8GemmOperands, CudaError> {
        if let Some(current) = &self.operands
            && current.form == *form
        {
            return Ok(current.operands);
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
        let reference = self.put(&mut blocks, &vec![0u8; host.out_bytes])?;
        let sums = self.put(&mut blocks, &[0f64; 3])?;
        let reference = match self.reference_product(form, &operands, reference) {
            Ok(()) => Ok(reference),
            Err(e @ CudaError::Hung { .. }) => return Err(e),
            Err(e) => Err(format!("the default tile did not run: {e}")),
        };
        self.operands = Some(FormOperands {
            form: *form,
            operands,
            out_bytes: host.out_bytes,
            reference,
            sums,
            blocks,
        });
        Ok(operands)
    }

    /// The default tile's product, one block per tile, written to `reference`.
    fn reference_product(
        &mut self,
        form: &GemmForm,
        operands: &Fp8GemmOperands,
        reference: u64,
    ) -> Result<(), CudaError> {
        let stream = Arc::clone(self.stream);
        let default = form.default_params();
        let into_reference = Fp8GemmOperands {
            out: reference,
            ..*operands
        };
        self.gemm(&default)?.launch(
            &stream,
            &form.problem,
            &into_reference,
            &TileSchedule::ONE_TILE_PER_BLOCK,
        )?;
        finish_within(&stream, HANG_LIMIT, || {
            format!("{} (the reference product)", default.name())
        })
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
        if let Some(FormOperands { blocks, .. }) = self.operands.take() {
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
