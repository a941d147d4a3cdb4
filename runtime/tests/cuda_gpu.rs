//! The CUDA runtime on a real GPU. Each test is skipped, saying why, where there is no CUDA
//! driver or device (CI); `scripts/gpu-check.sh` runs the wider checks on a lent GPU.
//!
//! Tolerance against the CPU for the loop nests: 1e-5 relative to the output's largest magnitude. The GPU sums rows
//! in f32 in a tree order (the CPU in f64) and libdevice's exp is within 2 ulp; over rows of 96
//! elements that is below 1e-6. A wrong kernel is off by O(1).

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;

use fathom_compiler::compile::{CompileOptions, compile};
use fathom_compiler::{DType, GraphBuilder, TensorType};
use fathom_kernels::nvrtc::nvrtc_unless_skipped;
use fathom_kernels::{Fp8GemmParams, TileSchedule};
use fathom_runtime::HostTensor;
use fathom_runtime::cpu::CpuProgram;
use fathom_runtime::cuda::fp8_gemm::{Fp8Gemm, HostFp8Operands};
use fathom_runtime::cuda::library_samples::{library_samples, run_sample};
use fathom_runtime::cuda::memory::{DriverMemory, download, stream_id, upload};
use fathom_runtime::cuda::{CachingAllocator, GpuDevice, GpuExecutor, GpuOptions, KernelCache};
use fathom_runtime::fp8::calc_diff;
use fathom_runtime::interp::Feeds;

/// The device and a kernel cache in `dir`, or `None` (with the reason printed) without a GPU.
fn gpu(dir: &std::path::Path) -> Option<(GpuDevice, KernelCache)> {
    let device = match GpuDevice::probe(0) {
        Ok(device) => device,
        Err(reason) => {
            eprintln!("skipped: {reason}");
            return None;
        }
    };
    let nvrtc = nvrtc_unless_skipped().unwrap()?;
    Some((device, KernelCache::new(dir, nvrtc)))
}

/// Softmax, SiLU and an RMS-style normalisation of a [4, 96] input: loop nests only.
fn loop_only_program() -> fathom_compiler::kernel::Program {
    let mut b = GraphBuilder::new("loop_only");
    let x = b
        .input("x", TensorType::new(DType::F32, vec![4, 96]))
        .unwrap();
    let soft = b.softmax(x).unwrap();
    let act = b.silu(x).unwrap();
    let y = b.mul(soft, act).unwrap();
    b.output("y", y).unwrap();
    compile(&b.finish(), &CompileOptions::default())
        .unwrap()
        .program
}

#[test]
fn a_loop_nest_program_matches_the_cpu_with_and_without_a_cuda_graph() {
    let dir = tempfile::tempdir().unwrap();
    let Some((device, cache)) = gpu(dir.path()) else {
        return;
    };
    let program = loop_only_program();
    let x: Vec<f32> = (0..4 * 96)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.1)
        .collect();
    let inputs = HashMap::from([("x", HostTensor::f32([4, 96], x))]);
    let feeds = Feeds::new(&inputs, &());
    let want = CpuProgram::new(program.clone()).run(&feeds).unwrap();
    let want = want.get("y").unwrap().as_f32().unwrap().to_vec();
    let max = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    for cuda_graph in [false, true] {
        let executor = GpuExecutor::new(
            &device,
            &cache,
            program.clone(),
            GpuOptions {
                cuda_graph,
                ..GpuOptions::default()
            },
        )
        .unwrap();
        // Twice: the second run replays the captured graph.
        for _ in 0..2 {
            let run = executor.run(&feeds).unwrap();
            let got = run.outputs.iter().find(|(n, _)| n == "y").unwrap();
            let got = got.1.as_f32().unwrap();
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() <= 1e-5 * max, "GPU {g}, CPU {w}");
            }
        }
    }
    // The second executor found every kernel in the cache.
    assert!(cache.counters().hits > 0);
}

#[test]
fn the_fp8_gemm_template_matches_the_quantized_product() {
    let dir = tempfile::tempdir().unwrap();
    let Some((device, cache)) = gpu(dir.path()) else {
        return;
    };
    if device.compute_capability != (9, 0) {
        eprintln!(
            "skipped: the FP8 GEMM template needs sm_90a, this is {}",
            device.arch()
        );
        return;
    }
    let (m, n, k) = (192usize, 256usize, 640usize);
    let a: Vec<f32> = (0..m * k)
        .map(|i| ((i * 13 % 29) as f32 - 14.0) * 0.3)
        .collect();
    let b: Vec<f32> = (0..n * k)
        .map(|i| ((i * 7 % 31) as f32 - 15.0) * 0.01)
        .collect();
    let ops = HostFp8Operands::quantize(&a, &b, m, n, k).unwrap();
    let stream = device.ctx.new_stream().unwrap();
    let mut allocator = CachingAllocator::new(DriverMemory::new(device.ctx.clone()));
    let mut put = |bytes: Vec<u8>| {
        let block = allocator.alloc(bytes.len(), stream_id(&stream)).unwrap();
        upload(&stream, block.ptr, &bytes).unwrap();
        block
    };
    let f32_bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let blocks = [
        put(ops.a.clone()),
        put(ops.b.clone()),
        put(f32_bytes(&ops.scale_a)),
        put(f32_bytes(&ops.scale_b)),
        put(vec![0u8; m * n * 4]),
    ];
    let operands = fathom_runtime::cuda::fp8_gemm::Fp8GemmOperands {
        a: blocks[0].ptr,
        b: blocks[1].ptr,
        scale_a: blocks[2].ptr,
        scale_b: blocks[3].ptr,
        out: blocks[4].ptr,
        block_expert: None,
        out_rows: None,
        k_offsets: None,
    };
    // Alone and in a cluster of two sharing B; one block per tile, and two blocks looping over
    // the four tiles (the ring of stages runs on from one tile into the next).
    let clustered = Fp8GemmParams {
        cluster_m: 2,
        ..ops.params()
    };
    for params in [ops.params(), clustered] {
        let gemm = Fp8Gemm::load(&device.ctx, &cache, params).unwrap();
        for schedule in [
            TileSchedule::ONE_TILE_PER_BLOCK,
            TileSchedule::persistent(2, 2),
        ] {
            upload(&stream, operands.out, &vec![0u8; m * n * 4]).unwrap();
            gemm.launch(&stream, &ops.problem, &operands, &schedule)
                .unwrap();
            let mut got = vec![0f32; m * n];
            download(&stream, operands.out, &mut got).unwrap();
            let diff = calc_diff(&got, &ops.reference()).unwrap();
            assert!(
                diff < 1e-3,
                "{}: DeepGEMM diff {diff} with {schedule}",
                params.name()
            );
        }
    }
    for block in blocks {
        allocator.free(block).unwrap();
    }
}

/// Every f32 library template against the CPU backend on random inputs at awkward shapes
/// (`fathom_runtime::cuda::library_samples`): GEMMs within 2·K·2⁻²⁴·Σ|a·b| per element (both
/// sides are within γ_K·Σ|a·b| of the exact sum), everything else bit for bit.
#[test]
fn every_library_template_matches_the_cpu() {
    let dir = tempfile::tempdir().unwrap();
    let Some((device, cache)) = gpu(dir.path()) else {
        return;
    };
    let mut failures = Vec::new();
    for sample in library_samples().unwrap() {
        let result = run_sample(&device, &cache, &sample).unwrap();
        println!(
            "{:<30} {:?}: worst error {:.3} of the bound",
            sample.name, sample.tolerance, result.worst_ratio
        );
        if let Some((i, g, c, bound)) = result.mismatch {
            failures.push(format!(
                "{}: y[{i}] = {g} on the GPU, {c} on the CPU (bound {bound:e})",
                sample.name
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn an_invalid_index_fails_the_gpu_run_naming_the_call() {
    let dir = tempfile::tempdir().unwrap();
    let Some((device, cache)) = gpu(dir.path()) else {
        return;
    };
    let sample = library_samples()
        .unwrap()
        .into_iter()
        .find(|s| s.name == "gather")
        .unwrap();
    let mut inputs = sample.inputs.clone();
    let indices = inputs.get_mut("x1").unwrap();
    let mut values = indices.as_i64().unwrap().to_vec();
    values[3] = 50;
    *indices = HostTensor::i64(indices.dims().to_vec(), values);
    let executor = GpuExecutor::new(
        &device,
        &cache,
        sample.program.clone(),
        GpuOptions::default(),
    )
    .unwrap();
    let error = executor
        .run(&Feeds::new(&inputs, &()))
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("gather") && error.contains("index 50 out of range 0..50"),
        "{error}"
    );
}

/// The FP8 products' plans (quantize steps, TMA descriptors over the byte scratch, the FP8 GEMM)
/// give the same bits replayed from a CUDA graph as launched one by one: every descriptor and
/// scratch address is fixed when the executor is made.
#[test]
fn fp8_products_replay_from_a_cuda_graph_bit_for_bit() {
    use fathom_runtime::cuda::library_samples::Tolerance;
    let dir = tempfile::tempdir().unwrap();
    let Some((device, cache)) = gpu(dir.path()) else {
        return;
    };
    let samples = library_samples().unwrap();
    let fp8 = samples
        .iter()
        .filter(|s| matches!(s.tolerance, Tolerance::Similarity { .. }));
    for sample in fp8 {
        let inputs: HashMap<&str, HostTensor> = sample
            .inputs
            .iter()
            .map(|(k, v)| (k.as_str(), v.clone()))
            .collect();
        let feeds = Feeds::new(&inputs, &());
        let mut outputs = Vec::new();
        for cuda_graph in [false, true] {
            let options = GpuOptions {
                cuda_graph,
                ..GpuOptions::default()
            };
            let executor = GpuExecutor::new(&device, &cache, sample.program.clone(), options)
                .unwrap_or_else(|e| panic!("{}: {e}", sample.name));
            assert!(executor.library().fp8_summary().0 > 0, "{}", sample.name);
            // Twice: with a graph, the second run replays it.
            for _ in 0..2 {
                let run = executor.run(&feeds).unwrap();
                let y = run.outputs.iter().find(|(n, _)| n == "y").unwrap();
                outputs.push(y.1.as_f32().unwrap().to_vec());
            }
        }
        for other in &outputs[1..] {
            let same = other
                .iter()
                .zip(&outputs[0])
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "{}: runs differ", sample.name);
        }
    }
}
