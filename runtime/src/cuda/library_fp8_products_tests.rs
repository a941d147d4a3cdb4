//! Products computed where the FP8 quantisations read them (`library_fp8_products`), on the CPU
//! emulator of the FP8 plans.

use super::sources::assert_alive_where_named;
use fathom_kernels::QuantizeInput;

use super::*;
use crate::cuda::library_fp8_products::PRODUCT_QUANTIZED_WHERE_READ;

/// On a real training step, the backward's products that only FP8 quantisations read (the
/// experts' combine gradient broadcast over each token's slots, the MLPs' gated gradients)
/// launch nothing: no step names them, they hold no storage, their factors are alive where
/// the quantisations read them, and every product of the step is still the product of its
/// rounded operands (the emulator multiplies the factors as the quantisations do).
#[test]
fn products_read_only_by_quantisations_are_never_stored() {
    let program = small_fp8_training_program();
    for target in TARGETS {
        let plan = LibraryPlan::of(&program, Some(target)).unwrap();
        let memory = plan.memory_plan(&program);
        assert_alive_where_named(&program, &plan, &memory);
        let mut broadcast = 0;
        for (position, kernel) in program.kernels.iter().enumerate() {
            let Some(call) = plan.calls[position].as_ref() else {
                continue;
            };
            if call.skipped != Some(PRODUCT_QUANTIZED_WHERE_READ) {
                continue;
            }
            assert!(
                matches!(kernel.body, KernelBody::Loop(_)),
                "{}",
                kernel.name
            );
            let (reads, writes) = kernel.reads_and_writes();
            let [out] = writes.as_slice() else {
                panic!("{} stores more than its product", kernel.name)
            };
            let named = plan
                .steps()
                .any(|(_, s)| s.args.iter().any(|a| a.buffer() == Some(*out)));
            assert!(!named, "{} is read", kernel.name);
            assert_eq!(memory.slot_of[out.index()], None, "{}", kernel.name);
            // Its factors are what the quantisations read.
            let readers: Vec<&LibraryStep> = plan
                .steps()
                .map(|(_, s)| s)
                .filter(|s| {
                    matches!(s.kernel, LibraryKernel::Quantize(p) if p.input == QuantizeInput::F32Product)
                })
                .filter(|s| reads.iter().all(|f| s.args.contains(&StepArg::Buffer(*f, 0))))
                .collect();
            assert!(
                !readers.is_empty(),
                "{}: no quantisation reads its factors",
                kernel.name
            );
            // The experts' combine gradient: one factor broadcast over the slots (div > 1).
            broadcast += usize::from(readers.iter().any(|s| s.args[2] != StepArg::I32(1)));
        }
        let (count, elements, bytes) = plan.products_not_stored(&program);
        assert!(count >= 6, "{target:?}: {count} products never stored");
        // Each reads two factors and writes its product, f32.
        assert!(elements > 0 && bytes > 4 * elements);
        assert!(broadcast >= 2, "{target:?}: {broadcast} broadcast products");
        let (checked, grouped) = check_fp8_products(&program, target);
        assert!(checked >= 20 && grouped >= 3);
    }
}

/// A product something else reads as values (here the rounding of it, made a program output)
/// is stored as before.
#[test]
fn a_product_read_as_values_is_stored() {
    let program = small_fp8_program_with_rounded_outputs();
    let plan = LibraryPlan::of(&program, Some(Fp8Target::Hopper)).unwrap();
    assert_eq!(plan.products_not_stored(&program), (0, 0, 0));
}
