#![allow(clippy::unwrap_used)]

//! The device optimizer's plan, run by an emulator that gives each kernel the host's
//! arithmetic (the contract `fathom gpu-check` holds the kernels to, bit for bit), against the
//! host's own step: global norm, clipping and AdamW of the micro model's parameters, stacked
//! experts included, over steps that clip and steps that do not.

use std::collections::{BTreeMap, HashMap};

use fathom_compiler::compile::{CompileOptions, compile};
use fathom_compiler::kernel::{BufferId, BufferRole, Program};
use fathom_compiler::model::LossWeights;
use fathom_compiler::training::{TrainingGraph, training_graph};
use half::bf16;

use super::*;
use crate::cpu::initial_contents;
use crate::interp::Feeds;
use crate::optim::{
    AdamW, AdamWConfig, Grads, clip_coefficient, clip_to_norm, global_norm, norm_of_square_sums,
    square_sums, update_with_bf16_moments, update_with_f32_moments,
};
use crate::tensor::HostTensor;

/// One parameter's moments on the emulated device, at the plan's precision.
enum Moments {
    F32(Vec<f32>, Vec<f32>),
    Bf16(Vec<bf16>, Vec<bf16>),
}

impl Moments {
    fn as_f32(&self) -> (Vec<f32>, Vec<f32>) {
        match self {
            Moments::F32(m, v) => (m.clone(), v.clone()),
            Moments::Bf16(m, v) => (
                m.iter().map(|x| x.to_f32()).collect(),
                v.iter().map(|x| x.to_f32()).collect(),
            ),
        }
    }
}

/// What the optimizer's launches read and write, held on the host.
struct Emulated<'p> {
    plan: &'p OptimizerPlan,
    /// The buffers holding the trainable parameters (stacks whole), by buffer.
    buffers: HashMap<BufferId, Vec<f32>>,
    gradient_sums: Vec<Vec<f32>>,
    moments: Vec<Moments>,
    chunk_sums: Vec<f64>,
}

impl<'p> Emulated<'p> {
    /// The device after the executor took the optimizer: the owned buffers as uploaded from
    /// `weights`, zero moments.
    fn new(
        plan: &'p OptimizerPlan,
        program: &Program,
        weights: &HashMap<String, HostTensor>,
    ) -> Self {
        let feeds = Feeds::new(&(), weights);
        let mut buffers = HashMap::new();
        for (index, buffer) in program.buffers.iter().enumerate() {
            let id = BufferId(index as u32);
            if plan.owns(id) {
                let values = initial_contents(&buffer.ty, &buffer.role, &feeds).unwrap();
                buffers.insert(id, values.to_vec());
            }
        }
        let moments = (plan.params.iter())
            .map(|p| match plan.moments {
                MomentPrecision::F32 => {
                    Moments::F32(vec![0.0; p.elements()], vec![0.0; p.elements()])
                }
                MomentPrecision::Bf16 => {
                    let zeros = vec![bf16::ZERO; p.elements()];
                    Moments::Bf16(zeros.clone(), zeros)
                }
            })
            .collect();
        Emulated {
            plan,
            buffers,
            gradient_sums: vec![Vec::new(); plan.params.len()],
            moments,
            chunk_sums: vec![f64::NAN; plan.chunk_count()],
        }
    }

    fn run(&mut self, launches: &[OptimizerLaunch]) {
        launches.iter().for_each(|launch| self.launch(launch));
    }

    /// One launch, each kernel as the host computes it.
    fn launch(&mut self, launch: &OptimizerLaunch) {
        let arg = |name: &str| {
            let params = launch.kernel.kernel_params();
            let at = params.iter().position(|p| p.name == name);
            launch.args[at.unwrap_or_else(|| panic!("{}: no `{name}`", launch.kernel.name()))]
        };
        let place = |name: &str| match arg(name) {
            OptimizerArg::At(place) => place,
            other => panic!("`{name}` is {other:?}, not a place"),
        };
        let n = match arg("n") {
            OptimizerArg::I64(n) => n as usize,
            other => panic!("`n` is {other:?}"),
        };
        assert_eq!(n, launch.elements);
        let gradient = |name| match place(name) {
            OptimizerPlace::GradientSum(i) => i,
            other => panic!("`{name}` points at {other:?}, not a gradient sum"),
        };
        match launch.kernel {
            OptimizerKernel::SquareSums { chunk } => {
                assert_eq!(chunk as usize, NORM_CHUNK, "the host's chunks");
                let g = &self.gradient_sums[gradient("g")][..n];
                let OptimizerPlace::ChunkSums(first) = place("sums") else {
                    panic!("the sums go to the chunk sums");
                };
                let sums = square_sums(&Grads::from([("g".to_owned(), g.to_vec())]));
                let sums = &sums["g"];
                self.chunk_sums[first..first + sums.len()].copy_from_slice(sums);
            }
            OptimizerKernel::Scale => {
                let OptimizerArg::F64(coef) = arg("coef") else {
                    panic!("the coefficient is an f64");
                };
                let x = &mut self.gradient_sums[gradient("x")][..n];
                x.iter_mut()
                    .for_each(|x| *x = (f64::from(*x) * coef) as f32);
            }
            OptimizerKernel::AdamW {
                bf16_moments,
                decay,
            } => {
                let scalar = |name| match arg(name) {
                    OptimizerArg::F32(v) => v,
                    other => panic!("`{name}` is {other:?}"),
                };
                let scalars = UpdateScalars {
                    decay: scalar("decay"),
                    one_minus_beta1: scalar("one_minus_beta1"),
                    beta2: scalar("beta2"),
                    one_minus_beta2: scalar("one_minus_beta2"),
                    bc2_sqrt: scalar("bc2_sqrt"),
                    eps: scalar("eps"),
                    neg_step_size: scalar("neg_step_size"),
                };
                let OptimizerPlace::Parameter(index) = place("p") else {
                    panic!("`p` is a parameter");
                };
                assert_eq!(place("m"), OptimizerPlace::FirstMoment(index));
                assert_eq!(place("v"), OptimizerPlace::SecondMoment(index));
                let param = &self.plan.params[index];
                let buffer = self
                    .buffers
                    .get_mut(&param.buffer)
                    .expect("an owned buffer");
                let p = &mut buffer[param.offset..param.offset + n];
                let g = &self.gradient_sums[gradient("g")][..n];
                match &mut self.moments[index] {
                    Moments::F32(m, v) => {
                        assert!(!bf16_moments);
                        update_with_f32_moments(p, g, m, v, &scalars, decay);
                    }
                    Moments::Bf16(m, v) => {
                        assert!(bf16_moments);
                        update_with_bf16_moments(p, g, m, v, &scalars, decay);
                    }
                }
            }
        }
    }

    /// A parameter's values where the device holds them.
    fn param(&self, param: &DeviceParam) -> &[f32] {
        &self.buffers[&param.buffer][param.offset..param.offset + param.elements()]
    }
}

/// The micro model's training step lowered for CUDA, and its trainable parameters.
fn micro_training() -> (TrainingGraph, Program) {
    let spec = fathom_compiler::spec::examples::micro();
    let train = training_graph(&spec, 1, 4, LossWeights::deepseek_v3()).unwrap();
    let options = CompileOptions {
        lower: crate::cuda::lower_options(),
        ..CompileOptions::default()
    };
    let program = compile(&train.graph, &options).unwrap().program;
    (train, program)
}

fn gradient_names(train: &TrainingGraph) -> Vec<(String, String)> {
    (train.parameters.iter())
        .map(|p| (p.clone(), format!("grad.{p}")))
        .collect()
}

fn plan_of(
    program: &Program,
    pairs: &[(String, String)],
    moments: MomentPrecision,
) -> OptimizerPlan {
    let pairs = pairs.iter().map(|(p, g)| (p.as_str(), g.as_str()));
    OptimizerPlan::of(program, pairs, moments).unwrap()
}

/// Deterministic gradient values over several magnitudes, a few exact zeros.
fn gradient(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|i| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let unit = (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
            if i % 97 == 0 {
                0.0
            } else {
                scale * unit * 10f32.powi((i % 5) as i32 - 2)
            }
        })
        .collect()
}

fn bits(values: &[f32]) -> Vec<u32> {
    values.iter().map(|v| v.to_bits()).collect()
}

/// Three steps of the plan on the emulator and of the host optimizer from the same weights
/// and gradients: the same norm, parameters and moments to the bit, for both moment types.
/// The second step's gradients are small enough not to clip; the others clip.
#[test]
fn the_device_step_is_the_host_step_bit_for_bit() {
    let (train, program) = micro_training();
    let pairs = gradient_names(&train);
    let weights = crate::init::init_parameters(&train.graph, 0.02, 7);
    for moments in [MomentPrecision::F32, MomentPrecision::Bf16] {
        let plan = plan_of(&program, &pairs, moments);
        let config = AdamWConfig {
            moments,
            ..AdamWConfig::default()
        };
        let mut device = Emulated::new(&plan, &program, &weights);
        let mut host_params: BTreeMap<String, HostTensor> = (train.parameters.iter())
            .map(|p| (p.clone(), weights[p].clone()))
            .collect();
        let mut host =
            AdamW::new(config, host_params.iter().map(|(n, t)| (n.as_str(), t))).unwrap();
        let gradients = |step: u64, scale: f32| -> Grads {
            (train.parameters.iter().enumerate())
                .map(|(i, p)| {
                    let n = weights[p].ty.numel();
                    (p.clone(), gradient(n, 31 * step + i as u64, scale))
                })
                .collect()
        };
        // Half the first step's norm: steps of gradients 100 times smaller do not clip.
        let max_norm = Some(global_norm(&gradients(0, 1.0)) / 2.0);
        let mut clipped = 0;
        for (step, scale) in [(0u64, 1.0f32), (1, 1e-2), (2, 3.0)] {
            let mut grads = gradients(step, scale);
            let lr = 1e-3 * (step + 1) as f64;

            for (index, param) in plan.params.iter().enumerate() {
                device.gradient_sums[index] = grads[&param.name].clone();
            }
            device.run(&plan.square_sums());
            let sums = plan.sums_by_param(&device.chunk_sums);
            let device_norm = norm_of_square_sums(sums.values().flatten());
            let coef = clip_coefficient(device_norm, max_norm).unwrap();
            if let Some(coef) = coef {
                device.run(&plan.clip(coef));
                clipped += 1;
            }
            let scalars = UpdateScalars::for_step(&config, step + 1, lr);
            device.run(&plan.update(&scalars));

            let norm = global_norm(&grads);
            assert_eq!(device_norm.to_bits(), norm.to_bits(), "step {step}'s norm");
            clip_to_norm(&mut grads, norm, max_norm).unwrap();
            host.step(&mut host_params, &grads, lr).unwrap();
            let host_moments: BTreeMap<String, (Vec<f32>, Vec<f32>)> = (host.parts().into_iter())
                .map(|part| (part.param, (part.m, part.v)))
                .collect();
            for (index, param) in plan.params.iter().enumerate() {
                let name = &param.name;
                let host_values = host_params[name].as_f32().unwrap();
                assert_eq!(
                    bits(device.param(param)),
                    bits(host_values),
                    "{name} at {step}"
                );
                let (m, v) = device.moments[index].as_f32();
                assert_eq!(
                    bits(&m),
                    bits(&host_moments[name].0),
                    "m of {name} at {step}"
                );
                assert_eq!(
                    bits(&v),
                    bits(&host_moments[name].1),
                    "v of {name} at {step}"
                );
            }
        }
        assert_eq!(clipped, 2, "steps 1 and 3 clip, step 2 does not");
    }
}

/// The plan owns exactly the buffers of trained parameters (stacks of experts included, the
/// balancing biases not), decays by each parameter's own shape, and its chunk sums tile.
#[test]
fn the_plan_owns_the_trained_parameters_and_tiles_the_chunk_sums() {
    let (train, program) = micro_training();
    let plan = plan_of(&program, &gradient_names(&train), MomentPrecision::Bf16);
    assert_eq!(plan.params.len(), train.parameters.len());
    let mut stacked = 0;
    for (index, buffer) in program.buffers.iter().enumerate() {
        let owned = plan.owns(BufferId(index as u32));
        let trained = match &buffer.role {
            BufferRole::Parameter(name) => train.parameters.contains(name),
            BufferRole::StackedParameters(names) => {
                stacked += usize::from(owned);
                names.iter().all(|n| train.parameters.contains(n))
            }
            _ => false,
        };
        assert_eq!(
            owned,
            trained,
            "{} ({:?})",
            BufferId(index as u32),
            buffer.role
        );
    }
    assert!(stacked >= 3, "the experts' three stacks: {stacked}");
    for bias in &train.balancing_biases {
        assert!(!plan.params.iter().any(|p| &p.name == bias), "{bias}");
    }
    let mut next_chunk = 0;
    for param in &plan.params {
        assert_eq!(param.first_chunk, next_chunk, "{}", param.name);
        next_chunk += param.chunks();
        assert_eq!(param.decay, param.dims.len() >= 2, "{}", param.name);
    }
    assert_eq!(next_chunk, plan.chunk_count());
    let names: Vec<&str> = plan.params.iter().map(|p| p.name.as_str()).collect();
    assert!(
        names.is_sorted(),
        "the norm adds the chunk sums in name order"
    );
}

/// A stack that holds a parameter left untrained, and a gradient that is not an output, are
/// refused with their names.
#[test]
fn what_the_device_cannot_own_is_named() {
    let (train, program) = micro_training();
    let pairs = gradient_names(&train);
    let stack = (program.buffers.iter())
        .find_map(|b| match &b.role {
            BufferRole::StackedParameters(names) => Some(names.clone()),
            _ => None,
        })
        .expect("the micro model stacks its experts");
    let partial: Vec<(&str, &str)> = (pairs.iter())
        .filter(|(p, _)| *p != stack[1])
        .map(|(p, g)| (p.as_str(), g.as_str()))
        .collect();
    let refused = OptimizerPlan::of(&program, partial, MomentPrecision::F32).unwrap_err();
    assert!(
        refused.contains(&format!("`{}`, which is not trained", stack[1])),
        "{refused}"
    );

    let first = &train.parameters[0];
    let wrong = [(first.as_str(), "grad.nothing")];
    let refused = OptimizerPlan::of(&program, wrong, MomentPrecision::F32).unwrap_err();
    assert_eq!(
        refused,
        format!("no output `grad.nothing` (the gradient of `{first}`)")
    );

    let unknown = [("no.such.weight", "grad.no.such.weight")];
    let refused = OptimizerPlan::of(&program, unknown, MomentPrecision::F32).unwrap_err();
    assert_eq!(refused, "no buffer of the program holds `no.such.weight`");
}
