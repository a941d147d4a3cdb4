//! Which kernels run together: two adjacent matmul kernels that share no written buffer, each
//! a GEMM the `gemm` crate would split across the threads, run at once, one on each side of a
//! `rayon::join`. On two cores the crate splits a small GEMM poorly (at the small model's
//! shapes, 120–200 GFLOP/s on two threads where one thread alone reaches 120–160), and a layer's
//! first projections are independent GEMMs of the same input next to each other (MLA's
//! `q_b_proj` and `kv_a_proj`, SwiGLU's gate and up). Measured alone, pairs of such GEMMs ran
//! 1.05–1.24× faster together than in turn when their work was within a factor of two, but
//! 0.84–0.93× when one had 4.5× the other's (the larger then runs mostly alone, on one thread
//! until the other joins it by work stealing), so only pairs within [`MAX_IMBALANCE`] are
//! formed. Matmuls spread over the threads by other means are left alone: a linear layer's
//! input gradient paired with its weight gradient (column blocks, one thread each) made the
//! small model's `q_b_proj` backward slower (3.8 → 4.5 ms a step).
use fathom_compiler::kernel::{BufferId, Kernel, KernelBody, Program};

use super::library::{Threading, matmul_threading};

/// The most one paired kernel's FLOPs may exceed the other's.
const MAX_IMBALANCE: u64 = 2;

/// One step of a run: a kernel alone, or two adjacent kernels at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Step {
    One(usize),
    Two(usize, usize),
}

/// The program's kernels as steps, in order: every kernel once.
pub(super) fn steps(program: &Program) -> Vec<Step> {
    let kernels = program.kernels.len();
    let mut steps = Vec::with_capacity(kernels);
    let mut i = 0;
    while i < kernels {
        if i + 1 < kernels && pairable(program, i, i + 1) {
            steps.push(Step::Two(i, i + 1));
            i += 2;
        } else {
            steps.push(Step::One(i));
            i += 1;
        }
    }
    steps
}

/// Whether kernels `a` and `b` may run at once: both matmuls the gemm crate threads, of
/// comparable work, neither reading nor writing what the other writes.
fn pairable(program: &Program, a: usize, b: usize) -> bool {
    let (ka, kb) = (&program.kernels[a], &program.kernels[b]);
    let crate_threaded = |k: &Kernel| match &k.body {
        KernelBody::Library(call) => matmul_threading(call) == Some(Threading::Crate),
        KernelBody::Loop(_) => false,
    };
    if !crate_threaded(ka) || !crate_threaded(kb) {
        return false;
    }
    let (fa, fb) = (program.flops_of(ka), program.flops_of(kb));
    if fa.max(fb) > MAX_IMBALANCE * fa.min(fb) {
        return false;
    }
    let ((ra, wa), (rb, wb)) = (ka.reads_and_writes(), kb.reads_and_writes());
    let touches =
        |reads: &[BufferId], writes: &[BufferId], b| reads.contains(b) || writes.contains(b);
    !wa.iter().any(|w| touches(&rb, &wb, w)) && !wb.iter().any(|w| touches(&ra, &wa, w))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::collections::HashMap;

    use fathom_compiler::kernel::{
        Buffer, BufferId, BufferRole, Kernel, KernelBody, Library, Program, View,
    };
    use fathom_compiler::{DType, TensorType};

    use super::{Step, steps};
    use crate::cpu::CpuProgram;
    use crate::interp::Feeds;
    use crate::tensor::HostTensor;

    const ROWS: usize = 1024;

    /// Kernel `i`: `out = x · w` (`x` `[ROWS, k]`, `w` `[k, n]`), row-major.
    fn matmul(i: usize, (x, w, out): (u32, u32, u32), (n, k): (usize, usize)) -> Kernel {
        let view = |buffer, strides: [isize; 2]| View {
            buffer: BufferId(buffer),
            offset: 0,
            strides: strides.to_vec(),
        };
        Kernel {
            name: format!("k{i}_matmul"),
            nodes: Vec::new(),
            origin: String::new(),
            body: KernelBody::Library(Library::MatMul {
                batch: Vec::new(),
                m: ROWS,
                n,
                k,
                a: view(x, [k as isize, 1]),
                b: view(w, [n as isize, 1]),
                out: view(out, [n as isize, 1]),
                accumulation: Default::default(),
                exact_in: None,
                triangular: None,
            }),
        }
    }

    /// `a = x·w1`, `c = a·w3` (reads `a`), `b = x·w2` (independent of `c`, equal work),
    /// `d = x·w4` (five times the work), `e = x·w1`: only `c` and `b` pair.
    fn program() -> Program {
        let buffer = |dims: [usize; 2], role| Buffer {
            ty: TensorType::new(DType::F32, dims.to_vec()),
            role,
        };
        let param = |name: &str, dims| buffer(dims, BufferRole::Parameter(name.to_owned()));
        Program {
            name: "pairs".to_owned(),
            buffers: vec![
                buffer([ROWS, 64], BufferRole::Input("x".to_owned())),
                param("w1", [64, 64]),
                param("w2", [64, 64]),
                param("w3", [64, 64]),
                param("w4", [64, 320]),
                buffer([ROWS, 64], BufferRole::Temporary),
                buffer([ROWS, 64], BufferRole::Temporary),
                buffer([ROWS, 64], BufferRole::Temporary),
                buffer([ROWS, 320], BufferRole::Temporary),
                buffer([ROWS, 64], BufferRole::Temporary),
            ],
            kernels: vec![
                matmul(0, (0, 1, 5), (64, 64)),
                matmul(1, (5, 3, 7), (64, 64)),
                matmul(2, (0, 2, 6), (64, 64)),
                matmul(3, (0, 4, 8), (320, 64)),
                matmul(4, (0, 1, 9), (64, 64)),
            ],
            outputs: ["a", "b", "c", "d", "e"]
                .iter()
                .zip(5..)
                .map(|(name, b)| (name.to_string(), BufferId(b)))
                .collect(),
        }
    }

    #[test]
    fn independent_comparable_matmuls_pair_and_compute_what_they_compute_alone() {
        let program = program();
        assert_eq!(
            steps(&program),
            [Step::One(0), Step::Two(1, 2), Step::One(3), Step::One(4)]
        );
        let values = |n: usize, seed: usize| -> Vec<f32> {
            (0..n)
                .map(|i| ((i * 7 + seed) % 13) as f32 * 0.25 - 1.5)
                .collect()
        };
        let tensors = HashMap::from([
            (
                "x".to_owned(),
                HostTensor::f32([ROWS, 64], values(ROWS * 64, 0)),
            ),
            (
                "w1".to_owned(),
                HostTensor::f32([64, 64], values(64 * 64, 1)),
            ),
            (
                "w2".to_owned(),
                HostTensor::f32([64, 64], values(64 * 64, 2)),
            ),
            (
                "w3".to_owned(),
                HostTensor::f32([64, 64], values(64 * 64, 3)),
            ),
            (
                "w4".to_owned(),
                HostTensor::f32([64, 320], values(64 * 320, 4)),
            ),
        ]);
        let feeds = Feeds::new(&tensors, &tensors);
        let compiled = CpuProgram::new(program);
        let paired = compiled.run(&feeds).unwrap();
        // An observer sees every kernel alone: the same program run one kernel at a time.
        let alone = compiled.run_observed(&feeds, &mut |_, _, _| {}).unwrap();
        for name in ["a", "b", "c", "d", "e"] {
            let (p, a) = (paired.get(name).unwrap(), alone.get(name).unwrap());
            assert_eq!(p, a, "{name}");
        }
        // And what they compute: b = x·w2, row 3, column 5.
        let (x, w2) = (values(ROWS * 64, 0), values(64 * 64, 2));
        let want: f32 = (0..64).map(|p| x[3 * 64 + p] * w2[p * 64 + 5]).sum();
        let b = paired.get("b").unwrap().as_f32().unwrap();
        assert!((b[3 * 64 + 5] - want).abs() <= 1e-4 * want.abs().max(1.0));
    }
}
