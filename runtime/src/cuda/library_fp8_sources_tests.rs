//! Activations' roundings skipped, their sources quantised where the FP8 GEMMs read them
//! (`quantize_activations_directly`), and the GPU's memory plan that keeps those sources alive
//! (`LibraryPlan::memory_plan`).

use fathom_compiler::kernel::MemoryPlan;

use super::*;

/// The E4M3 roundings of `program`: (position, source, output).
fn roundings(program: &Program) -> Vec<(usize, BufferId, BufferId)> {
    (program.kernels.iter().enumerate())
        .filter_map(|(position, kernel)| match &kernel.body {
            KernelBody::Library(Library::QuantizeDequantize { x, out, .. }) => {
                Some((position, *x, *out))
            }
            _ => None,
        })
        .collect()
}

/// The positions of the calls whose steps name `buffer`.
fn step_readers(plan: &LibraryPlan, buffer: BufferId) -> Vec<usize> {
    (plan.calls.iter().enumerate())
        .filter(|(_, call)| {
            let steps = call.iter().flat_map(|c| &c.steps);
            let args = steps.flat_map(|s| &s.args).collect::<Vec<_>>();
            args.iter().any(|a| a.buffer() == Some(buffer))
        })
        .map(|(position, _)| position)
        .collect()
}

/// Every temporary a step names is alive, in `memory`'s plan, when its call runs; and a skipped
/// call's output holds no storage.
pub(super) fn assert_alive_where_named(program: &Program, plan: &LibraryPlan, memory: &MemoryPlan) {
    for (position, call) in plan.calls.iter().enumerate() {
        let Some(call) = call else { continue };
        for arg in call.steps.iter().flat_map(|s| &s.args) {
            let Some(b) = arg.buffer() else {
                continue;
            };
            let (holder, _) = program.holder(b);
            if !matches!(program.buffer(holder).role, BufferRole::Temporary) {
                continue;
            }
            let life = memory.lifetimes[holder.index()];
            assert!(
                life.is_some_and(|(first, last)| first <= position && position <= last),
                "{} names {b}, alive {life:?} only",
                call.name
            );
        }
    }
}

/// On a real training step, most activations' roundings launch nothing: the products'
/// `quantize` steps read their sources, and every buffer a step names, those sources
/// included, is alive in the executor's memory plan when the step runs (the kernel IR's plan
/// ends a source at its rounding, which the GPU no longer runs).
#[test]
fn activations_roundings_read_only_by_fp8_gemms_quantise_their_sources_kept_alive() {
    let program = small_fp8_training_program();
    let ir_plan = MemoryPlan::of(&program);
    for target in TARGETS {
        let plan = LibraryPlan::of(&program, Some(target)).unwrap();
        let memory = plan.memory_plan(&program);
        assert_alive_where_named(&program, &plan, &memory);
        let mut skipped = 0;
        let mut outlived = 0;
        for (position, x, out) in roundings(&program) {
            let call = plan.calls[position].as_ref().unwrap();
            if call.skipped != Some(SOURCE_QUANTIZED_WHERE_READ) {
                continue;
            }
            skipped += 1;
            assert!(call.steps.is_empty());
            // Nothing reads the rounding, nothing holds it.
            assert!(step_readers(&plan, out).is_empty(), "{}", call.name);
            assert_eq!(memory.slot_of[out.index()], None, "{}", call.name);
            // A source no kernel stores (a product its readers compute, `library_fp8_products`)
            // holds nothing either; its factors live instead.
            let writer = (program.kernels.iter())
                .position(|k| k.reads_and_writes().1.contains(&x))
                .unwrap();
            if plan.skips(writer) {
                assert!(step_readers(&plan, x).is_empty(), "{}", call.name);
                assert_eq!(memory.slot_of[x.index()], None, "{}", call.name);
                continue;
            }
            let readers = step_readers(&plan, x);
            assert!(readers.iter().any(|&r| r > position), "{}", call.name);
            let last = *readers.iter().max().unwrap();
            let ir_last = ir_plan.lifetimes[x.index()].map(|(_, last)| last);
            outlived += usize::from(ir_last.is_some_and(|l| l < last));
        }
        // What `fathom inspect` reports: every rounding launched or skipped (the weights' and
        // the activations'), the launched ones over their outputs' elements.
        let count = plan.roundings(&program);
        let all = roundings(&program);
        assert_eq!(
            count.launched + count.skipped + count.kept_as_codes,
            all.len()
        );
        assert!(
            count.skipped > skipped,
            "the weights' roundings are skipped too"
        );
        let launched = all.iter().filter(|(p, ..)| {
            let call = plan.calls[*p].as_ref().unwrap();
            call.skipped.is_none() && call.keeps_codes.is_none() && !call.steps.is_empty()
        });
        let elements = launched.map(|(_, _, out)| program.buffer(*out).ty.numel() as u64);
        assert_eq!(count.elements, elements.sum::<u64>());
        // The small model's step: the forward's and the backward's products' activations.
        assert!(skipped >= 40, "{target:?}: {skipped} roundings skipped");
        assert!(
            outlived >= 20,
            "{target:?}: {outlived} sources outlive their rounding"
        );
        // The products still give the product of the rounded operands.
        let (checked, _) = check_fp8_products(&program, target);
        assert!(checked >= 20);
    }
}

/// A source some kernel writes between its rounding and a product that reads the rounding is
/// rounded as before, the product reading the rounding.
#[test]
fn a_source_written_before_its_product_is_rounded() {
    let program = small_fp8_training_program();
    let plan = LibraryPlan::of(&program, Some(Fp8Target::Hopper)).unwrap();
    // A skipped rounding whose source a product reads after a loop nest has run.
    let (position, x, out, reader) = roundings(&program)
        .into_iter()
        .filter(|(p, ..)| plan.calls[*p].as_ref().unwrap().skipped.is_some())
        .find_map(|(position, x, out)| {
            let reads_out = |k: &&Kernel| k.reads_and_writes().0.contains(&out);
            let last = program.kernels.iter().rposition(|k| reads_out(&k))?;
            let between = program.kernels[position + 1..last]
                .iter()
                .any(|k| matches!(k.body, KernelBody::Loop(_)));
            between.then_some((position, x, out, last))
        })
        .unwrap();
    let mut program = program;
    store_into(&mut program, position + 1..reader, x);
    let plan = LibraryPlan::of(&program, Some(Fp8Target::Hopper)).unwrap();
    let rounding = plan.calls[position].as_ref().unwrap();
    assert_eq!(rounding.skipped, None, "{}", plan.table());
    assert!(!rounding.steps.is_empty());
    assert!(step_readers(&plan, out).contains(&reader));
}

/// The experts' weight gradient rounds its operands itself, in 128 gathered rows per expert:
/// an operand rounded before (the cotangent, in 1×128 tiles for the input gradient) is read as
/// rounded, so its rounding runs.
#[test]
fn the_experts_weight_gradient_reads_the_rounding_it_is_given() {
    let program = small_fp8_training_program();
    let plan = LibraryPlan::of(&program, Some(Fp8Target::Hopper)).unwrap();
    let mut seen = 0;
    for (position, _, out) in roundings(&program) {
        let read_by_wgrad = program.kernels.iter().any(|k| {
            matches!(&k.body, KernelBody::Library(call @ Library::GroupedMatMulWeightGrad { .. })
                if call.operands().0.contains(&out))
        });
        if read_by_wgrad {
            let call = plan.calls[position].as_ref().unwrap();
            assert_eq!(call.skipped, None, "{}", call.name);
            seen += 1;
        }
    }
    assert!(
        seen >= 2,
        "{seen} roundings read by the experts' weight gradients"
    );
}
