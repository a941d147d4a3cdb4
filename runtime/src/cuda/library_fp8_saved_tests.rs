//! Saved FP8 activations kept as E4M3 codes in their rounding's buffer
//! (`library_fp8_saved`), on the CPU emulator of the FP8 plans.

use fathom_compiler::kernel::MemoryPlan;

use super::*;
use crate::cuda::quantize_samples::tile_values;

/// The E4M3 roundings of `program` that keep codes in `plan`: (position, source, output).
fn kept(program: &Program, plan: &LibraryPlan) -> Vec<(usize, BufferId, BufferId)> {
    (program.kernels.iter().enumerate())
        .filter_map(|(position, kernel)| {
            let KernelBody::Library(Library::QuantizeDequantize { x, out, .. }) = &kernel.body
            else {
                return None;
            };
            let keeps = plan.calls[position].as_ref()?.keeps_codes?;
            assert_eq!(keeps.buffer, *out);
            Some((position, *x, *out))
        })
        .collect()
}

/// On a real training step, the activations' 1×128 roundings that only FP8 quantisations read
/// (the saved inputs of the forward's products, re-tiled by the weight gradients) write codes
/// and scales whose values are the CPU's rounding bit for bit, pow2 scales included; no step
/// reads those buffers as f32 any more; and their storage shrinks to the codes' bytes.
#[test]
fn kept_codes_hold_the_rounded_values_bit_for_bit() {
    let program = small_fp8_training_program();
    for target in TARGETS {
        let plan = LibraryPlan::of(&program, Some(target)).unwrap();
        let kept = kept(&program, &plan);
        assert!(
            kept.len() >= 10,
            "{target:?}: {} roundings keep codes",
            kept.len()
        );
        let mut pow2 = 0;
        for &(position, x, out) in &kept {
            let call = plan.calls[position].as_ref().unwrap();
            let codes = call.keeps_codes.unwrap();
            let KernelBody::Library(Library::QuantizeDequantize { pow2_scales, .. }) =
                &program.kernels[position].body
            else {
                unreachable!()
            };
            pow2 += usize::from(*pow2_scales);
            // The rounding's source, with every case its scales meet (tiny, zero, large).
            let n = program.buffer(x).ty.numel();
            let source: Vec<f32> = (0..n)
                .map(|i| match i % 97 {
                    0 => 0.0,
                    1 => 1e-9,
                    _ => ((i * 2_654_435_761) % 10_007) as f32 / 100.0 - 50.0,
                })
                .collect();
            let buffers = (program.buffers.iter())
                .map(|b| vec![f32::NAN; b.ty.numel()])
                .collect();
            let mut memory = Memory::new(buffers, 0, 0);
            memory.buffers[x.index()] = source.clone();
            for step in &call.steps {
                memory.run(step);
            }
            let (rows, cols) = (codes.rows, codes.cols);
            let stride = cols.next_multiple_of(16);
            let code_bytes: Vec<u8> = (0..rows * stride)
                .map(|i| memory.byte(StepArg::BufferBytes(out, 0), i))
                .collect();
            let scales: Vec<f32> = (0..cols.div_ceil(128) * rows.next_multiple_of(4))
                .map(|i| memory.get_f32(StepArg::BufferBytes(out, codes.scales_at), i))
                .collect();
            let values = tile_values(&code_bytes, &scales, rows, cols);
            let rounding = scale_rounding(*pow2_scales);
            let expected = fake_quantize(&source, &[rows, cols], 1, 128, rounding).unwrap();
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&values), bits(&expected), "{}", call.name);
            // Read as codes only, by the products' quantisations and GEMMs.
            for (reader, step) in plan.steps() {
                assert!(
                    !step.args.contains(&StepArg::Buffer(out, 0)),
                    "{reader} reads {out} as f32"
                );
            }
        }
        assert!(
            pow2 >= 2,
            "{target:?}: the experts' inputs round to powers of two"
        );
        // Storage for the codes alone: the executor's temporaries shrink.
        let memory = plan.memory_plan(&program);
        for &(position, _, out) in &kept {
            let bytes = plan.calls[position]
                .as_ref()
                .unwrap()
                .keeps_codes
                .unwrap()
                .bytes;
            let slot = memory.slot_of[out.index()].unwrap();
            assert!(4 * memory.slot_elements[slot] >= bytes);
            assert!(
                bytes < 2 * program.buffer(out).ty.numel(),
                "{bytes} bytes for {out}"
            );
        }
        let kept_values: usize = kept
            .iter()
            .map(|(_, _, o)| program.buffer(*o).ty.numel())
            .sum();
        let whole = MemoryPlan::with_touches(&program, &plan.touches(&program));
        assert!(
            memory.unshared_bytes + 2 * kept_values <= whole.unshared_bytes,
            "{} bytes unshared, {} with every buffer whole",
            memory.unshared_bytes,
            whole.unshared_bytes
        );
        let count = plan.roundings(&program);
        assert_eq!(count.kept_as_codes, kept.len());
    }
}

/// A rounding the program outputs (or a loop nest reads) writes its values: nothing keeps codes.
#[test]
fn a_rounding_read_as_values_keeps_them() {
    let program = small_fp8_program_with_rounded_outputs();
    let plan = LibraryPlan::of(&program, Some(Fp8Target::Hopper)).unwrap();
    assert!(kept(&program, &plan).is_empty());
    assert_eq!(plan.roundings(&program).kept_as_codes, 0);
}
