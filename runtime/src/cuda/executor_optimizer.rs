//! The optimizer kept on the device by a [`GpuExecutor`] (`super::device_optimizer` says what
//! it launches and why): the trainable parameters stay where the program reads them, updated
//! in place; their moments live beside them; the gradient sums of the micro-batches
//! (`run_summing`) are the gradients. Nothing but the norm's chunk sums crosses to the host in
//! a step; the parameters and moments come back only when asked ([`GpuExecutor::optimizer_state`],
//! for a checkpoint or the end of a run).

use std::collections::BTreeMap;
use std::sync::PoisonError;
use std::sync::atomic::Ordering;

use fathom_compiler::kernel::BufferId;
use half::bf16;

use super::{GpuExecutor, SumOwner, Sums};
use crate::cpu::initial_contents;
use crate::cuda::CudaError;
use crate::cuda::alloc::Block;
use crate::cuda::device_optimizer::{OptimizerArg, OptimizerLaunch, OptimizerPlace, OptimizerPlan};
use crate::cuda::memory::{download, stream_id, upload};
use crate::cuda::modules::{Arg, launch};
use crate::interp::{Feeds, TensorSource};
use crate::optim::{AdamW, AdamWConfig, MomentPart, MomentPrecision, UpdateScalars};
use crate::tensor::HostTensor;

/// A kept optimizer's state brought back to the host.
#[derive(Debug)]
pub struct KeptState {
    /// The whole optimizer, at the device's step count.
    pub optimizer: AdamW,
    /// The parameters it trains, by name.
    pub params: BTreeMap<String, HostTensor>,
}

/// The optimizer's state in device memory.
pub(super) struct DeviceOptimizer {
    pub(super) plan: OptimizerPlan,
    config: AdamWConfig,
    /// Steps taken (the `t` of the last bias correction).
    step: u64,
    /// Per parameter of the plan, its first and second moments.
    moments: Vec<[Block; 2]>,
    /// The f64 sums of squares of every gradient chunk.
    chunk_sums: Block,
}

impl DeviceOptimizer {
    pub(super) fn blocks(self) -> impl Iterator<Item = Block> {
        self.moments.into_iter().flatten().chain([self.chunk_sums])
    }
}

impl GpuExecutor {
    /// Takes over `optimizer` (a whole one, at any step) for the parameters it trains, each
    /// paired with the output summing its gradient (`run_summing`, as `owner` 0 or any):
    /// uploads the parameters from `weights` and the moments, and from then on never uploads
    /// those parameters again (runs read them as the device's steps leave them); the other
    /// parameters (the balancing biases) are uploaded as before. Refuses, changing nothing, an
    /// optimizer whose parameters the program does not hold as the plan needs
    /// ([`OptimizerPlan::of`]) or that is a shard.
    pub fn keep_optimizer(
        &mut self,
        optimizer: &AdamW,
        gradients: &[(String, String)],
        weights: &dyn TensorSource,
    ) -> Result<(), CudaError> {
        let refuse = |why: String| CudaError::Launch(format!("keeping the optimizer: {why}"));
        if !optimizer.is_whole() {
            return Err(refuse("it is a shard of one".into()));
        }
        if !self.parameters_read_only {
            return Err(refuse(format!(
                "a kernel of `{}` writes a parameter, which runs must then upload",
                self.program.name
            )));
        }
        let pairs = gradients.iter().map(|(p, g)| (p.as_str(), g.as_str()));
        let config = *optimizer.config();
        let plan = OptimizerPlan::of(&self.program, pairs, config.moments).map_err(refuse)?;
        let parts: BTreeMap<String, MomentPart> = (optimizer.parts().into_iter())
            .map(|p| (p.param.clone(), p))
            .collect();
        if parts.len() != plan.params.len() {
            return Err(refuse(format!(
                "it trains {} parameters, the gradients name {}",
                parts.len(),
                plan.params.len()
            )));
        }
        for param in &plan.params {
            match parts.get(&param.name) {
                Some(part) if part.dims == param.dims => {}
                Some(part) => {
                    return Err(refuse(format!(
                        "`{}` has moments of shape {:?}, the program {:?}",
                        param.name, part.dims, param.dims
                    )));
                }
                None => return Err(refuse(format!("no moments for `{}`", param.name))),
            }
        }

        let mut kept = Vec::with_capacity(plan.params.len());
        let result = self.upload_optimizer(&plan, &parts, weights, &mut kept);
        let chunk_sums = result.and_then(|()| self.alloc(8 * plan.chunk_count()));
        let chunk_sums = match chunk_sums {
            Ok(block) => block,
            Err(e) => {
                self.free_blocks(kept.into_iter().flatten());
                return Err(e);
            }
        };
        if let Some(previous) = self.optimizer.take() {
            self.free_blocks(previous.blocks());
        }
        self.optimizer = Some(DeviceOptimizer {
            plan,
            config,
            step: optimizer.step_count(),
            moments: kept,
            chunk_sums,
        });
        // The parameters just uploaded: their FP8 codes follow them in the next run.
        self.weight_codes_stale.store(true, Ordering::Release);
        Ok(())
    }

    /// Uploads the moments of `parts` into new blocks (pushed to `kept`, for the caller to
    /// free on error) and the trained parameters' buffers from `weights`.
    fn upload_optimizer(
        &self,
        plan: &OptimizerPlan,
        parts: &BTreeMap<String, MomentPart>,
        weights: &dyn TensorSource,
        kept: &mut Vec<[Block; 2]>,
    ) -> Result<(), CudaError> {
        let driver = |what: &str| {
            let what = what.to_owned();
            move |e| CudaError::driver(what, e)
        };
        for param in &plan.params {
            let part = &parts[&param.name];
            let bytes = param.elements() * plan.moments.bytes();
            let pair = [self.alloc(bytes)?, self.alloc(bytes)?];
            let [m, v] = [pair[0].ptr, pair[1].ptr];
            kept.push(pair);
            let what = format!("uploading the moments of `{}`", param.name);
            match plan.moments {
                MomentPrecision::F32 => {
                    upload(&self.stream, m, &part.m).map_err(driver(&what))?;
                    upload(&self.stream, v, &part.v).map_err(driver(&what))?;
                }
                MomentPrecision::Bf16 => {
                    let bits = |x: &[f32]| {
                        x.iter()
                            .map(|&x| bf16::from_f32(x).to_bits())
                            .collect::<Vec<_>>()
                    };
                    upload(&self.stream, m, &bits(&part.m)).map_err(driver(&what))?;
                    upload(&self.stream, v, &bits(&part.v)).map_err(driver(&what))?;
                }
            }
        }
        let feeds = Feeds::new(&(), weights);
        for (index, buffer) in self.program.buffers.iter().enumerate() {
            if plan.owns(BufferId(index as u32)) {
                let values = initial_contents(&buffer.ty, &buffer.role, &feeds)?;
                upload(&self.stream, self.address[index], &values)
                    .map_err(driver("uploading the trained parameters"))?;
            }
        }
        Ok(())
    }

    /// Per trained parameter (by name), the sums of squares of its gradient's chunks, from
    /// `owner`'s gradient sums of the micro-batches since the last step: what
    /// [`crate::optim::norm_of_square_sums`] makes the global norm of, to the bit of the
    /// host's [`crate::optim::global_norm`]. Nothing changes.
    pub fn gradient_square_sums(
        &self,
        owner: SumOwner,
    ) -> Result<BTreeMap<String, Vec<f64>>, CudaError> {
        let optimizer = self.kept_optimizer()?;
        let sums = self.lock_sums()?;
        self.launch_optimizer(optimizer, &sums, owner, &optimizer.plan.square_sums())?;
        let mut chunk_sums = vec![0f64; optimizer.plan.chunk_count()];
        download(&self.stream, optimizer.chunk_sums.ptr, &mut chunk_sums).map_err(|e| {
            CudaError::driver("downloading the gradients' sums of squares".into(), e)
        })?;
        Ok(optimizer.plan.sums_by_param(&chunk_sums))
    }

    /// One optimizer step from `owner`'s gradient sums: each multiplied by `clip` first when
    /// given ([`crate::optim::clip_coefficient`]), then AdamW at learning rate `lr`, as
    /// [`AdamW::step`] computes it. The sums start again with the next micro-batch, and the
    /// next run makes the weights' FP8 codes again from the new parameters (ahead of its
    /// program, where the status words it checks cover them).
    pub fn step_optimizer(
        &mut self,
        owner: SumOwner,
        clip: Option<f64>,
        lr: f64,
    ) -> Result<(), CudaError> {
        if !(lr.is_finite() && lr >= 0.0) {
            return Err(CudaError::Launch(format!(
                "the learning rate {lr} is not finite and non-negative"
            )));
        }
        {
            let optimizer = self.kept_optimizer()?;
            let mut sums = self.lock_sums()?;
            let plan = &optimizer.plan;
            if let Some(coef) = clip {
                self.launch_optimizer(optimizer, &sums, owner, &plan.clip(coef))?;
            }
            let scalars = UpdateScalars::for_step(&optimizer.config, optimizer.step + 1, lr);
            self.launch_optimizer(optimizer, &sums, owner, &plan.update(&scalars))?;
            for param in &plan.params {
                if let Some(sum) = sums.get_mut(&(owner, param.gradient.clone())) {
                    sum.runs = 0;
                }
            }
        }
        if let Some(optimizer) = self.optimizer.as_mut() {
            optimizer.step += 1;
        }
        self.weight_codes_stale.store(true, Ordering::Release);
        self.stream
            .synchronize()
            .map_err(|e| CudaError::driver("the optimizer step (a kernel failed)".into(), e))
    }

    /// The kept optimizer and the parameters it trains, downloaded: what a checkpoint saves.
    /// `None` when the executor keeps no optimizer.
    pub fn optimizer_state(&self) -> Result<Option<KeptState>, CudaError> {
        let Some(optimizer) = &self.optimizer else {
            return Ok(None);
        };
        let plan = &optimizer.plan;
        let mut parts = Vec::with_capacity(plan.params.len());
        let mut params = BTreeMap::new();
        for (param, [m, v]) in plan.params.iter().zip(&optimizer.moments) {
            let what = format!("downloading the state of `{}`", param.name);
            let driver = |e| CudaError::driver(what.clone(), e);
            let n = param.elements();
            let mut values = vec![0f32; n];
            let at = self.address[param.buffer.index()] + 4 * param.offset as u64;
            download(&self.stream, at, &mut values).map_err(driver)?;
            params.insert(
                param.name.clone(),
                HostTensor::f32(param.dims.clone(), values),
            );
            let moment = |block: &Block| -> Result<Vec<f32>, CudaError> {
                Ok(match plan.moments {
                    MomentPrecision::F32 => {
                        let mut x = vec![0f32; n];
                        download(&self.stream, block.ptr, &mut x).map_err(driver)?;
                        x
                    }
                    MomentPrecision::Bf16 => {
                        let mut bits = vec![0u16; n];
                        download(&self.stream, block.ptr, &mut bits).map_err(driver)?;
                        bits.into_iter()
                            .map(|b| bf16::from_bits(b).to_f32())
                            .collect()
                    }
                })
            };
            parts.push(MomentPart {
                param: param.name.clone(),
                dims: param.dims.clone(),
                range: 0..n,
                m: moment(m)?,
                v: moment(v)?,
            });
        }
        let optimizer = AdamW::from_parts(optimizer.config, optimizer.step, parts)
            .map_err(|e| CudaError::Launch(format!("the device optimizer's state: {e}")))?;
        Ok(Some(KeptState { optimizer, params }))
    }

    /// Drops the kept optimizer (its state is lost: take it with [`GpuExecutor::optimizer_state`]
    /// first); the next run uploads every parameter again.
    pub fn release_optimizer(&mut self) {
        if let Some(optimizer) = self.optimizer.take() {
            self.free_blocks(optimizer.blocks());
            let on_device = self.parameters_on_device.get_mut();
            *on_device.unwrap_or_else(PoisonError::into_inner) = None;
        }
    }

    /// Whether the kept optimizer owns `buffer` (its parameters are never uploaded).
    pub(super) fn optimizer_owns(&self, buffer: BufferId) -> bool {
        self.optimizer.as_ref().is_some_and(|o| o.plan.owns(buffer))
    }

    fn kept_optimizer(&self) -> Result<&DeviceOptimizer, CudaError> {
        self.optimizer.as_ref().ok_or_else(|| {
            CudaError::Launch("no optimizer is kept on the device (keep_optimizer)".into())
        })
    }

    /// Queues `launches` with their places resolved in device memory, `owner`'s gradient
    /// sums as the gradients. Refuses a gradient no micro-batch summed since the last step.
    fn launch_optimizer(
        &self,
        optimizer: &DeviceOptimizer,
        sums: &Sums,
        owner: SumOwner,
        launches: &[OptimizerLaunch],
    ) -> Result<(), CudaError> {
        let params = &optimizer.plan.params;
        let resolve = |place: OptimizerPlace| -> Result<u64, CudaError> {
            Ok(match place {
                OptimizerPlace::Parameter(i) => {
                    self.address[params[i].buffer.index()] + 4 * params[i].offset as u64
                }
                OptimizerPlace::GradientSum(i) => {
                    let gradient = &params[i].gradient;
                    match sums.get(&(owner, gradient.clone())) {
                        Some(sum) if sum.runs > 0 => sum.block.ptr,
                        _ => {
                            return Err(CudaError::Launch(format!(
                                "no micro-batch summed `{gradient}` since the last step"
                            )));
                        }
                    }
                }
                OptimizerPlace::FirstMoment(i) => optimizer.moments[i][0].ptr,
                OptimizerPlace::SecondMoment(i) => optimizer.moments[i][1].ptr,
                OptimizerPlace::ChunkSums(c) => optimizer.chunk_sums.ptr + 8 * c as u64,
            })
        };
        for step in launches {
            let name = step.kernel.name();
            let function = self.kernels.function(&name)?;
            let mut args = (step.args.iter())
                .map(|arg| {
                    Ok(match *arg {
                        OptimizerArg::At(place) => Arg::Ptr(resolve(place)?),
                        OptimizerArg::I64(v) => Arg::I64(v),
                        OptimizerArg::F32(v) => Arg::F32(v),
                        OptimizerArg::F64(v) => Arg::F64(v),
                    })
                })
                .collect::<Result<Vec<_>, CudaError>>()?;
            let [x, y, z] = step.kernel.grid(step.elements as u64);
            launch(
                &self.stream,
                function,
                (x, y, z),
                (step.kernel.block_threads(), 1, 1),
                0,
                &mut args,
            )
            .map_err(|e| e.in_kernel(&format!("the optimizer's {name}")))?;
        }
        Ok(())
    }

    /// A block of at least `bytes` on the executor's stream.
    fn alloc(&self, bytes: usize) -> Result<Block, CudaError> {
        let mut allocator = self.lock_allocator();
        Ok(allocator.alloc(bytes.max(8), stream_id(&self.stream))?)
    }

    fn free_blocks(&self, blocks: impl IntoIterator<Item = Block>) {
        let mut allocator = self.lock_allocator();
        for block in blocks {
            let _ = allocator.free(block);
        }
    }
}
