//! The optimizer kept on the device: what a [`super::GpuExecutor`] launches so that a training
//! step's gradients never leave the GPU and its parameters never come back to it.
//!
//! The host's step (`crate::optim`) downloads every gradient sum, computes the global norm,
//! clips, runs AdamW and uploads every parameter again: 8 bytes per parameter over PCIe per
//! step, and the host's memory bandwidth for the update. Kept on the device, the step is:
//! [`OptimizerPlan::square_sums`] (each gradient sum's squares per chunk of
//! [`NORM_CHUNK`] values, in f64, in the host's order), a download of those chunk sums only
//! (8 bytes per 16 384 values), the host adding them in name and chunk order (the very bits
//! of [`crate::optim::global_norm`]) and deciding divergence and the clipping coefficient,
//! then [`OptimizerPlan::clip`] and [`OptimizerPlan::update`]: every launch element-wise and
//! rounded as the host rounds (`fathom_kernels::optimizer`, checked bit for bit against the
//! host by `fathom gpu-check`), so the run is the host optimizer's to the bit.
//!
//! The plan is the launches with their arguments named by [`OptimizerPlace`], resolved to
//! device addresses by the executor, or to host vectors by the test emulator, which runs them
//! with the host's arithmetic and compares a whole step with [`crate::optim::AdamW::step`].

use std::collections::BTreeMap;

use fathom_compiler::DType;
use fathom_compiler::kernel::{BufferId, BufferRole, Program};
use fathom_kernels::OptimizerKernel;
use fathom_kernels::optimizer::ADAMW_SCALARS;

use super::CudaError;
use super::modules::args_by_name;
use crate::optim::{MomentPrecision, NORM_CHUNK, UpdateScalars, decays};

/// A trainable parameter as the device optimizer holds it.
#[derive(Clone, Debug, PartialEq)]
pub struct DeviceParam {
    pub name: String,
    /// The program output whose sum over the micro-batches is its gradient.
    pub gradient: String,
    pub dims: Vec<usize>,
    /// The buffer holding it (its own, or a stack of parameters) and its first element there.
    pub buffer: BufferId,
    pub offset: usize,
    /// Whether AdamW decays it ([`decays`], by its own shape, not its stack's).
    pub decay: bool,
    /// Its first chunk among all gradients' chunk sums.
    pub first_chunk: usize,
}

impl DeviceParam {
    pub fn elements(&self) -> usize {
        self.dims.iter().product()
    }

    /// Its gradient's chunks of [`NORM_CHUNK`] values (the last one ragged).
    pub fn chunks(&self) -> usize {
        self.elements().div_ceil(NORM_CHUNK)
    }
}

/// What an argument of an optimizer launch points at; `usize`s index [`OptimizerPlan::params`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OptimizerPlace {
    /// The parameter's values where the program reads them.
    Parameter(usize),
    /// The sum of its gradient over the micro-batches (the executor's device sum).
    GradientSum(usize),
    FirstMoment(usize),
    SecondMoment(usize),
    /// The f64 chunk sums from this chunk on.
    ChunkSums(usize),
}

/// One argument of an optimizer launch.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum OptimizerArg {
    At(OptimizerPlace),
    I64(i64),
    F32(f32),
    F64(f64),
}

/// One launch of an optimizer kernel over `elements` values, its arguments in the kernel's
/// parameter order.
#[derive(Clone, Debug, PartialEq)]
pub struct OptimizerLaunch {
    pub kernel: OptimizerKernel,
    pub elements: usize,
    pub args: Vec<OptimizerArg>,
}

/// The device optimizer of a program's trainable parameters.
#[derive(Clone, Debug, PartialEq)]
pub struct OptimizerPlan {
    /// In name order: the order the host's norm adds their chunk sums in.
    pub params: Vec<DeviceParam>,
    pub moments: MomentPrecision,
    /// By buffer: whether it holds trainable parameters, which the device then owns.
    owned: Vec<bool>,
}

impl OptimizerPlan {
    /// The plan for `trainable` (parameter name, the output summing its gradient) of `program`.
    /// Refuses, naming it, a parameter no f32 buffer of the program holds, a gradient that is
    /// not an output of the parameter's size, and a stack holding both trainable and other
    /// parameters (it could be neither owned by the device nor uploaded whole).
    pub fn of<'a>(
        program: &Program,
        trainable: impl IntoIterator<Item = (&'a str, &'a str)>,
        moments: MomentPrecision,
    ) -> Result<Self, String> {
        let trainable: BTreeMap<&str, &str> = trainable.into_iter().collect();
        let mut params = Vec::with_capacity(trainable.len());
        let mut owned = vec![false; program.buffers.len()];
        let mut first_chunk = 0;
        for (&name, &gradient) in &trainable {
            let (buffer, offset, dims) = held_where(program, name)?;
            let param = DeviceParam {
                name: name.to_owned(),
                gradient: gradient.to_owned(),
                decay: decays(name, &dims),
                dims,
                buffer,
                offset,
                first_chunk,
            };
            let output = (program.outputs.iter()).find(|(output, _)| output == gradient);
            match output.map(|(_, id)| program.buffer(*id).ty.numel()) {
                Some(n) if n == param.elements() => {}
                Some(n) => {
                    return Err(format!(
                        "the gradient `{gradient}` of `{name}` has {n} values, the parameter {}",
                        param.elements()
                    ));
                }
                None => return Err(format!("no output `{gradient}` (the gradient of `{name}`)")),
            }
            first_chunk += param.chunks();
            owned[buffer.index()] = true;
            params.push(param);
        }
        for (index, buffer) in program.buffers.iter().enumerate() {
            if let BufferRole::StackedParameters(names) = &buffer.role
                && owned[index]
                && let Some(other) = names.iter().find(|n| !trainable.contains_key(n.as_str()))
            {
                return Err(format!(
                    "the stack {} holds `{other}`, which is not trained, beside trained parameters",
                    BufferId(index as u32)
                ));
            }
        }
        Ok(OptimizerPlan {
            params,
            moments,
            owned,
        })
    }

    /// Whether `buffer` holds trainable parameters: the device's to update, never uploaded
    /// again once the optimizer holds them.
    pub fn owns(&self, buffer: BufferId) -> bool {
        self.owned.get(buffer.index()).copied().unwrap_or(false)
    }

    /// The chunk sums of all gradients.
    pub fn chunk_count(&self) -> usize {
        self.params.iter().map(DeviceParam::chunks).sum()
    }

    /// Every kernel the plan may launch (both moment types', so that they load up front).
    pub fn kernels() -> Vec<OptimizerKernel> {
        let mut kernels = vec![Self::square_sums_kernel(), OptimizerKernel::Scale];
        for bf16_moments in [false, true] {
            for decay in [false, true] {
                kernels.push(OptimizerKernel::AdamW {
                    bf16_moments,
                    decay,
                });
            }
        }
        kernels
    }

    fn square_sums_kernel() -> OptimizerKernel {
        OptimizerKernel::SquareSums {
            chunk: NORM_CHUNK as u32,
        }
    }

    /// Each gradient sum's squares per chunk into the chunk sums.
    pub fn square_sums(&self) -> Vec<OptimizerLaunch> {
        let kernel = Self::square_sums_kernel();
        self.each_param(kernel, |index, param| {
            vec![
                ("g", OptimizerArg::At(OptimizerPlace::GradientSum(index))),
                ("n", OptimizerArg::I64(param.elements() as i64)),
                (
                    "sums",
                    OptimizerArg::At(OptimizerPlace::ChunkSums(param.first_chunk)),
                ),
            ]
        })
    }

    /// The chunk sums (all of them, downloaded) by parameter name, for
    /// [`crate::optim::norm_of_square_sums`] in name order.
    pub fn sums_by_param(&self, chunk_sums: &[f64]) -> BTreeMap<String, Vec<f64>> {
        (self.params.iter())
            .map(|p| {
                let chunks = chunk_sums.get(p.first_chunk..p.first_chunk + p.chunks());
                (p.name.clone(), chunks.unwrap_or_default().to_vec())
            })
            .collect()
    }

    /// Every gradient sum times `coef` (the clipping, as [`crate::optim::clip_to_norm`]).
    pub fn clip(&self, coef: f64) -> Vec<OptimizerLaunch> {
        self.each_param(OptimizerKernel::Scale, |index, param| {
            vec![
                ("x", OptimizerArg::At(OptimizerPlace::GradientSum(index))),
                ("n", OptimizerArg::I64(param.elements() as i64)),
                ("coef", OptimizerArg::F64(coef)),
            ]
        })
    }

    /// One AdamW step of every parameter from its gradient sum, with `scalars`.
    pub fn update(&self, scalars: &UpdateScalars) -> Vec<OptimizerLaunch> {
        let bf16_moments = self.moments == MomentPrecision::Bf16;
        let per_step: Vec<(&'static str, OptimizerArg)> = (ADAMW_SCALARS.iter())
            .zip(scalars.in_kernel_order())
            .map(|(&name, value)| (name, OptimizerArg::F32(value)))
            .collect();
        (self.params.iter().enumerate())
            .map(|(index, param)| {
                let kernel = OptimizerKernel::AdamW {
                    bf16_moments,
                    decay: param.decay,
                };
                let at = |place| OptimizerArg::At(place);
                let mut named = vec![
                    ("p", at(OptimizerPlace::Parameter(index))),
                    ("g", at(OptimizerPlace::GradientSum(index))),
                    ("m", at(OptimizerPlace::FirstMoment(index))),
                    ("v", at(OptimizerPlace::SecondMoment(index))),
                    ("n", OptimizerArg::I64(param.elements() as i64)),
                ];
                named.extend(per_step.iter().copied());
                launch_of(kernel, param.elements(), &named)
            })
            .collect()
    }

    /// A launch of `kernel` per parameter, with the arguments `named` gives it.
    fn each_param(
        &self,
        kernel: OptimizerKernel,
        named: impl Fn(usize, &DeviceParam) -> Vec<(&'static str, OptimizerArg)>,
    ) -> Vec<OptimizerLaunch> {
        (self.params.iter().enumerate())
            .map(|(index, param)| launch_of(kernel, param.elements(), &named(index, param)))
            .collect()
    }
}

/// `kernel`'s launch with its arguments in its parameters' order. The plan names every
/// parameter, so a missing one is a bug here, caught by the tests.
fn launch_of(
    kernel: OptimizerKernel,
    elements: usize,
    named: &[(&str, OptimizerArg)],
) -> OptimizerLaunch {
    let args = args_by_name(&kernel.name(), &kernel.kernel_params(), named)
        .unwrap_or_else(|e: CudaError| panic!("the optimizer plan names every argument: {e}"));
    OptimizerLaunch {
        kernel,
        elements,
        args,
    }
}

/// The f32 buffer holding parameter `name`, its first element there and the parameter's shape.
fn held_where(program: &Program, name: &str) -> Result<(BufferId, usize, Vec<usize>), String> {
    for (index, buffer) in program.buffers.iter().enumerate() {
        let (offset, dims) = match &buffer.role {
            BufferRole::Parameter(n) if n == name => (0, buffer.ty.dims().to_vec()),
            BufferRole::StackedParameters(names) => {
                let Some(at) = names.iter().position(|n| n == name) else {
                    continue;
                };
                let dims = buffer.ty.dims().get(1..).unwrap_or_default().to_vec();
                (at * dims.iter().product::<usize>(), dims)
            }
            _ => continue,
        };
        if buffer.ty.dtype != DType::F32 {
            return Err(format!(
                "`{name}` is held as {}; the optimizer updates f32 master weights",
                buffer.ty
            ));
        }
        return Ok((BufferId(index as u32), offset, dims));
    }
    Err(format!("no buffer of the program holds `{name}`"))
}

#[cfg(test)]
#[path = "device_optimizer_tests.rs"]
mod tests;
