//! The attention plans' steps run on the CPU, each kernel replaced by what its contract says it
//! computes (`convert.cuh`, `mla_attention_fwd.cuh`, `mla_attention_bwd.cuh`), reading and
//! writing where the step's arguments point, against the interpreter's attention of the same
//! operands: a planner that points a kernel at the wrong place, in the wrong layout, or forgets
//! to zero what the backward accumulates, fails.

use std::collections::HashMap;

use fathom_compiler::Graph;
use fathom_compiler::compile::{CompileOptions, compile};
use fathom_compiler::kernel::{BufferRole, KernelBody, Library, Program};
use fathom_kernels::{ConvertKind, MlaHeadDims};

use super::{LibraryKernel, LibraryPlan, LibraryStep, StepArg};
use crate::cuda::attention_samples::{attention_call_feeds, attention_call_graph};
use crate::fp8::{bf16_to_f32, f32_to_bf16};
use crate::interp::{Feeds, evaluate};
use crate::tensor::HostTensor;

const BATCH: usize = 2;
const TOKENS: usize = 5;
const HEADS: usize = 2;
const SCALE: f64 = 0.3;

/// Head widths the templates take as they are.
const TEMPLATE_WIDTHS: MlaHeadDims = MlaHeadDims {
    nope: 16,
    rope: 16,
    v: 64,
};

fn attention_graph(dims: MlaHeadDims) -> Graph {
    attention_call_graph(dims, (BATCH, TOKENS, HEADS), SCALE).unwrap()
}

/// The templates' head widths, as `usize`.
fn widths(dims: MlaHeadDims) -> (usize, usize, usize) {
    (dims.nope as usize, dims.rope as usize, dims.v as usize)
}

/// The host memory the steps touch: the program's buffers and the byte scratch.
struct Memory {
    buffers: Vec<Vec<f32>>,
    bytes: Vec<u8>,
}

impl Memory {
    fn f32(&self, at: StepArg, i: usize) -> f32 {
        match at {
            StepArg::Buffer(b, offset) => self.buffers[b.index()][offset + i],
            StepArg::Bytes(offset) => {
                let at = offset + 4 * i;
                f32::from_le_bytes(self.bytes[at..at + 4].try_into().unwrap())
            }
            other => panic!("{other:?} does not point at f32s"),
        }
    }

    fn set_f32(&mut self, at: StepArg, i: usize, value: f32) {
        match at {
            StepArg::Buffer(b, offset) => self.buffers[b.index()][offset + i] = value,
            StepArg::Bytes(offset) => {
                let at = offset + 4 * i;
                self.bytes[at..at + 4].copy_from_slice(&value.to_le_bytes());
            }
            other => panic!("{other:?} does not point at f32s"),
        }
    }

    fn bf16(&self, at: StepArg, i: usize) -> f64 {
        let StepArg::Bytes(offset) = at else {
            panic!("{at:?}: the bf16 operands live in the byte scratch")
        };
        assert_eq!(offset % 16, 0, "16-byte loads");
        let at = offset + 2 * i;
        f64::from(bf16_to_f32(u16::from_le_bytes([
            self.bytes[at],
            self.bytes[at + 1],
        ])))
    }

    fn set_bf16(&mut self, at: StepArg, i: usize, value: f32) {
        let StepArg::Bytes(offset) = at else {
            panic!("{at:?}: bf16 goes to the byte scratch")
        };
        let at = offset + 2 * i;
        self.bytes[at..at + 2].copy_from_slice(&f32_to_bf16(value).to_le_bytes());
    }

    fn run(&mut self, step: &LibraryStep) {
        let params = step.kernel.instantiate().unwrap().params;
        assert_eq!(params.len(), step.args.len(), "{}", step.kernel.name());
        let named: HashMap<&str, StepArg> = params
            .iter()
            .map(|p| p.name)
            .zip(step.args.iter().copied())
            .collect();
        match step.kernel {
            LibraryKernel::Convert(p) => {
                let int = |name: &str| match named[name] {
                    StepArg::I64(n) => n as usize,
                    other => panic!("{name} = {other:?} is not an i64"),
                };
                if p.kind == ConvertKind::ZeroF32 {
                    for i in 0..int("n") {
                        self.set_f32(named["y"], i, 0.0);
                    }
                    return;
                }
                let (rows, width, padded) = (int("rows"), int("width"), int("padded_width"));
                let (x_stride, y_stride) = (int("x_stride"), int("y_stride"));
                for (r, c) in (0..rows).flat_map(|r| (0..padded).map(move |c| (r, c))) {
                    let (from, to) = (r * x_stride + c, r * y_stride + c);
                    match p.kind {
                        ConvertKind::F32ToBf16 => {
                            let value = if c < width {
                                self.f32(named["x"], from)
                            } else {
                                0.0
                            };
                            self.set_bf16(named["y"], to, value);
                        }
                        ConvertKind::Bf16ToF32 => {
                            self.set_f32(named["y"], to, self.bf16(named["x"], from) as f32)
                        }
                        ConvertKind::F32ToF32 => {
                            self.set_f32(named["y"], to, self.f32(named["x"], from))
                        }
                        ConvertKind::ZeroF32 => unreachable!("filled above"),
                    }
                }
            }
            LibraryKernel::AttentionForward(p) => self.forward(&named, widths(p.head_dims)),
            LibraryKernel::AttentionDelta(p) => self.delta(&named, widths(p.head_dims)),
            LibraryKernel::AttentionBackward(p) => self.backward(&named, widths(p.head_dims)),
            other => panic!("{} is not a kernel of the attention plans", other.name()),
        }
    }

    /// Scores of query `t` against keys `0..=t` of head `h`, scaled.
    fn scores(
        &self,
        named: &HashMap<&str, StepArg>,
        (nope, rope, _): (usize, usize, usize),
        (b, h, t): (usize, usize, usize),
    ) -> Vec<f64> {
        let qk = nope + rope;
        (0..=t)
            .map(|j| {
                let dot: f64 = (0..qk)
                    .map(|c| {
                        let q = self.bf16(named["q"], head_at(b, t, h, qk) + c);
                        let k = if c < nope {
                            self.bf16(named["k_nope"], head_at(b, j, h, nope) + c)
                        } else {
                            self.bf16(named["k_rope"], (b * TOKENS + j) * rope + c - nope)
                        };
                        q * k
                    })
                    .sum();
                SCALE * dot
            })
            .collect()
    }

    /// `mla_attention_fwd`: o (bf16) and lse per query.
    fn forward(&mut self, named: &HashMap<&str, StepArg>, dims: (usize, usize, usize)) {
        check_shape(named);
        let (_, _, dv) = dims;
        for (b, h, t) in queries() {
            let s = self.scores(named, dims, (b, h, t));
            let max = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let sum: f64 = s.iter().map(|x| (x - max).exp()).sum();
            for c in 0..dv {
                let o: f64 = (0..=t)
                    .map(|j| {
                        (s[j] - max).exp() / sum * self.bf16(named["v"], head_at(b, j, h, dv) + c)
                    })
                    .sum();
                self.set_bf16(named["o"], head_at(b, t, h, dv) + c, o as f32);
            }
            self.set_f32(named["lse"], stat_at(b, h, t), (max + sum.ln()) as f32);
        }
    }

    /// `mla_attention_bwd_delta`: Σ dO · O per query.
    fn delta(&mut self, named: &HashMap<&str, StepArg>, (_, _, dv): (usize, usize, usize)) {
        for (b, h, t) in queries() {
            let sum: f64 = (0..dv)
                .map(|c| {
                    let at = head_at(b, t, h, dv) + c;
                    self.bf16(named["o"], at) * self.bf16(named["d_o"], at)
                })
                .sum();
            self.set_f32(named["delta"], stat_at(b, h, t), sum as f32);
        }
    }

    /// `mla_attention_bwd`: P from lse, dS = P (dP − delta); dq and dk_rope accumulated onto
    /// what is there, dk_nope and dv written.
    fn backward(&mut self, named: &HashMap<&str, StepArg>, dims: (usize, usize, usize)) {
        check_shape(named);
        let (nope, rope, dv) = dims;
        let qk = nope + rope;
        let mut dk = vec![0f64; BATCH * TOKENS * HEADS * qk];
        let mut grad_v = vec![0f64; BATCH * TOKENS * HEADS * dv];
        for (b, h, t) in queries() {
            let s = self.scores(named, dims, (b, h, t));
            let lse = f64::from(self.f32(named["lse"], stat_at(b, h, t)));
            let delta = f64::from(self.f32(named["delta"], stat_at(b, h, t)));
            for (j, s) in s.iter().enumerate() {
                let p = (s - lse).exp();
                let d_o = |c| self.bf16(named["d_o"], head_at(b, t, h, dv) + c);
                let dp: f64 = (0..dv)
                    .map(|c| d_o(c) * self.bf16(named["v"], head_at(b, j, h, dv) + c))
                    .sum();
                let ds = p * (dp - delta) * SCALE;
                for c in 0..dv {
                    grad_v[head_at(b, j, h, dv) + c] += p * d_o(c);
                }
                for c in 0..qk {
                    let key = if c < nope {
                        self.bf16(named["k_nope"], head_at(b, j, h, nope) + c)
                    } else {
                        self.bf16(named["k_rope"], (b * TOKENS + j) * rope + c - nope)
                    };
                    let at = head_at(b, t, h, qk) + c;
                    let dq = self.f32(named["dq"], at) + (ds * key) as f32;
                    self.set_f32(named["dq"], at, dq);
                    dk[head_at(b, j, h, qk) + c] += ds * self.bf16(named["q"], at);
                }
            }
        }
        for (b, j, h) in (0..BATCH)
            .flat_map(|b| (0..TOKENS).flat_map(move |j| (0..HEADS).map(move |h| (b, j, h))))
        {
            for c in 0..qk {
                let grad = dk[head_at(b, j, h, qk) + c];
                if c < nope {
                    self.set_f32(named["dk_nope"], head_at(b, j, h, nope) + c, grad as f32);
                } else {
                    let at = (b * TOKENS + j) * rope + c - nope;
                    let sum = self.f32(named["dk_rope"], at) + grad as f32;
                    self.set_f32(named["dk_rope"], at, sum);
                }
            }
            for c in 0..dv {
                let at = head_at(b, j, h, dv) + c;
                self.set_f32(named["dv"], at, grad_v[at] as f32);
            }
        }
    }
}

fn check_shape(named: &HashMap<&str, StepArg>) {
    assert_eq!(named["seq_len"], StepArg::I32(TOKENS as i32));
    assert_eq!(named["heads"], StepArg::I32(HEADS as i32));
    assert_eq!(named["softmax_scale"], StepArg::F32(SCALE as f32));
}

fn queries() -> impl Iterator<Item = (usize, usize, usize)> {
    (0..BATCH).flat_map(|b| (0..HEADS).flat_map(move |h| (0..TOKENS).map(move |t| (b, h, t))))
}

/// Offset of token `t`, head `h` in a `[b, t, h, width]` array.
fn head_at(b: usize, t: usize, h: usize, width: usize) -> usize {
    ((b * TOKENS + t) * HEADS + h) * width
}

/// Offset of a per-query statistic in `[b, h, t]`.
fn stat_at(b: usize, h: usize, t: usize) -> usize {
    (b * HEADS + h) * TOKENS + t
}

fn cuda_program(graph: &Graph) -> Program {
    let options = CompileOptions {
        lower: super::super::lower_options(),
        ..CompileOptions::default()
    };
    compile(graph, &options).unwrap().program
}

/// The plan's steps, emulated, give the interpreter's attention: within 1e-2 of the largest
/// value (both round the same operands to bf16, but the templates also store the output in
/// bf16 and round the unnormalised probabilities; a value 1 f32 ulp from the other's may round
/// to the neighbouring bf16); a wiring mistake is off by the values themselves.
#[test]
fn the_attention_plans_compute_the_interpreters_attention() {
    let plan = emulate_against_the_interpreter(TEMPLATE_WIDTHS);
    insta::assert_snapshot!("attention_plan", plan.table());
}

/// Heads the templates do not take as they are run padded with zero channels: the tiny
/// model's 4 + 2 and 4 (every width padded, q in two halves), a padded rope key only (q's
/// channels in one run), a padded nope and value.
#[test]
fn padded_heads_give_the_interpreters_attention() {
    let dims = |nope, rope, v| MlaHeadDims { nope, rope, v };
    let plan = emulate_against_the_interpreter(dims(4, 2, 4));
    insta::assert_snapshot!("attention_plan_padded", plan.table());
    emulate_against_the_interpreter(dims(16, 8, 64));
    emulate_against_the_interpreter(dims(8, 16, 40));
}

/// Plans attention of head widths `dims` for the GPU, runs the steps emulated, and checks
/// every output against the interpreter's; the plan.
fn emulate_against_the_interpreter(dims: MlaHeadDims) -> LibraryPlan {
    let graph = attention_graph(dims);
    let program = cuda_program(&graph);
    let calls: Vec<&Library> = program
        .kernels
        .iter()
        .filter_map(|k| match &k.body {
            KernelBody::Library(call) => Some(call),
            KernelBody::Loop(_) => None,
        })
        .collect();
    assert!(
        matches!(
            calls[..],
            [
                Library::CausalAttention { .. },
                Library::CausalAttentionGrad { .. }
            ]
        ),
        "{program}"
    );
    let plan = LibraryPlan::of(&program, None).unwrap();
    let fed = attention_call_feeds(&graph);
    let mut memory = Memory {
        buffers: program
            .buffers
            .iter()
            .map(|buffer| match &buffer.role {
                BufferRole::Input(name) => fed[name].as_f32().unwrap().to_vec(),
                // Garbage where the steps must write.
                _ => vec![f32::NAN; buffer.ty.numel()],
            })
            .collect(),
        bytes: vec![0xa5; plan.scratch_bytes()],
    };
    for (kernel, call) in program.kernels.iter().zip(&plan.calls) {
        assert!(
            matches!(kernel.body, KernelBody::Library(_)),
            "{}: the emulation runs library calls only",
            kernel.name
        );
        for step in &call.as_ref().unwrap().steps {
            memory.run(step);
        }
    }
    let expected: HashMap<String, HostTensor> = evaluate(&graph, &Feeds::new(&fed, &()))
        .unwrap()
        .into_iter()
        .collect();
    for (name, buffer) in &program.outputs {
        let (got, want) = (
            &memory.buffers[buffer.index()],
            expected[name].as_f32().unwrap(),
        );
        let size = want.iter().fold(1f32, |m, x| m.max(x.abs()));
        let error = got
            .iter()
            .zip(want)
            .fold(0f32, |m, (g, w)| m.max((g - w).abs()))
            / size;
        assert!(error <= 1e-2, "{dims:?} {name}: {error:e} of {size}");
    }
    plan
}

/// The kernels the attention plans launch compile for both targets, without spills.
#[test]
fn the_attention_plans_kernels_compile_for_sm90a_and_sm80() {
    let Some(nvrtc) = fathom_kernels::nvrtc::nvrtc_unless_skipped().unwrap_or_else(|e| {
        panic!("{e}\n(set FATHOM_SKIP_NVRTC=1 to skip the CUDA compile checks explicitly)")
    }) else {
        return;
    };
    let plan = |dims| LibraryPlan::of(&cuda_program(&attention_graph(dims)), None).unwrap();
    let mut kernels = plan(TEMPLATE_WIDTHS).kernels();
    assert_eq!(kernels.len(), 6);
    // Padded: the same, and the gradients' copies out of the padding.
    let padded = plan(MlaHeadDims {
        nope: 4,
        rope: 2,
        v: 4,
    });
    for kernel in padded.kernels() {
        if !kernels.contains(&kernel) {
            kernels.push(kernel);
        }
    }
    assert_eq!(kernels.len(), 7, "{}", padded.table());
    for kernel in kernels {
        let source = kernel.instantiate().unwrap();
        for arch in ["sm_90a", "sm_80"] {
            let compiled = nvrtc
                .compile(&source, Some(arch))
                .unwrap_or_else(|e| panic!("{} ({arch}): {e}", source.name));
            let r = compiled.resources.unwrap_or_default();
            assert_eq!(
                r.spill_store_bytes + r.spill_load_bytes,
                0,
                "{} ({arch}) spills",
                source.name
            );
        }
    }
}
