//! The experts' weight gradient that rounds its operands along each expert's token-slots
//! (`library_expert_wgrad`): its plans run on the CPU by the kernels' contracts, as the FP8
//! products' are (`library_fp8_tests`), against the rows rounded in each expert's tiles.

use super::*;

/// The f64 weight gradient `out[e] = Σ round(cotangent[t, s])ᵀ · round(x[t, s or 0])` over the
/// token-slots routed to e, each expert's rows rounded in its own tiles (`ExpertTiles`), and
/// the sum of the products' magnitudes of each element.
pub(super) fn weight_grad_reference(
    program: &Program,
    call: &Library,
    buffers: &[Vec<f32>],
) -> (Vec<f64>, Vec<f64>) {
    let Library::GroupedMatMulWeightGrad {
        cotangent,
        x,
        expert_ids,
        out: ExpertOutputs::Stacked(out),
        rounding: Some(tiles),
        ..
    } = call
    else {
        panic!("not a rounding grouped weight gradient of stacked experts")
    };
    let dims = |b: &BufferId| program.buffer(*b).ty.dims().to_vec();
    let (ids, od) = (dims(expert_ids), dims(out));
    let (experts, n) = (od[0], od[1]);
    let (x_slots, k) = fathom_compiler::kernel::grouped_rows(&dims(x), ids[0]);
    let round = |rows: Vec<f32>, width: usize| {
        let count = rows.len() / width;
        let rounding = scale_rounding(tiles.pow2_scales);
        fake_quantize(&rows, &[count, width], tiles.tile_rows, 1, rounding).unwrap()
    };
    let (mut result, mut magnitude) = (Vec::new(), Vec::new());
    for e in 0..experts {
        let members: Vec<usize> = (0..ids[0] * ids[1])
            .filter(|&ts| buffers[expert_ids.index()][ts] as usize == e)
            .collect();
        let g = round(
            members
                .iter()
                .flat_map(|&ts| buffers[cotangent.index()][ts * n..][..n].to_vec())
                .collect(),
            n,
        );
        let xe = round(
            members
                .iter()
                .flat_map(|&ts| {
                    let row = if x_slots == 1 { ts / ids[1] } else { ts };
                    buffers[x.index()][row * k..][..k].to_vec()
                })
                .collect(),
            k,
        );
        for i in 0..n {
            for j in 0..k {
                let products: Vec<f64> = (0..members.len())
                    .map(|r| f64::from(g[r * n + i]) * f64::from(xe[r * k + j]))
                    .collect();
                result.push(products.iter().sum());
                magnitude.push(products.iter().map(|v| v.abs()).sum());
            }
        }
    }
    (result, magnitude)
}

/// A program of one grouped weight gradient over `experts` experts that rounds its operands in
/// 128×1 tiles along each expert's token-slots: cotangent `[tokens][slots][n]`, x
/// `[tokens][x_slots][k]`, out `[experts][n][k]`.
fn one_rounded_weight_grad(
    (tokens, slots, x_slots): (usize, usize, usize),
    (experts, n, k): (usize, usize, usize),
    accumulation: Accumulation,
) -> Program {
    let ty = |dtype, dims: &[usize]| TensorType::new(dtype, dims.to_vec());
    let buffer = |dims: &[usize], role| Buffer {
        ty: ty(DType::F32, dims),
        role,
    };
    Program {
        name: "one_rounded_weight_grad".to_owned(),
        buffers: vec![
            buffer(&[tokens, slots, n], BufferRole::Input("dy".to_owned())),
            buffer(&[tokens, x_slots, k], BufferRole::Input("x".to_owned())),
            Buffer {
                ty: ty(DType::I64, &[tokens, slots]),
                role: BufferRole::Input("expert_ids".to_owned()),
            },
            buffer(&[experts, n, k], BufferRole::Temporary),
        ],
        kernels: vec![Kernel {
            name: "k0_grouped_matmul_weight_grad".to_owned(),
            nodes: Vec::new(),
            origin: String::new(),
            body: KernelBody::Library(Library::GroupedMatMulWeightGrad {
                cotangent: BufferId(0),
                x: BufferId(1),
                expert_ids: BufferId(2),
                out: ExpertOutputs::Stacked(BufferId(3)),
                accumulation,
                exact_in: None,
                rounds: false,
                rounding: Some(ExpertTiles {
                    format: QuantFormat::E4M3,
                    tile_rows: 128,
                    pow2_scales: false,
                }),
            }),
        }],
        outputs: vec![("dw".to_owned(), BufferId(3))],
    }
}

/// The experts' weight gradient that rounds its operands along each expert's token-slots, on
/// 150 tokens over 5 experts (one without tokens, the others' segments several 128-tiles with
/// ragged ends), x per token or per slot: with Hopper's accumulation as the K-grouped FP8 GEMM
/// on both targets, and with exact accumulation (or on a GPU without FP8) as the f32 grouped
/// GEMM over the rounded rows. Each gives the products of the rows rounded in each expert's
/// tiles.
#[test]
fn the_experts_weight_gradient_rounds_in_each_experts_tiles() {
    for (slots, x_slots) in [(2, 1), (3, 3)] {
        let sizes = ((150, slots, x_slots), (5, 48, 144));
        let fp8 = one_rounded_weight_grad(sizes.0, sizes.1, Accumulation::HOPPER);
        for target in TARGETS {
            let plan = LibraryPlan::of(&fp8, Some(target)).unwrap();
            let call = plan.calls[0].as_ref().unwrap();
            assert_eq!(call.note, None, "{}", plan.table());
            assert!(call.runs_fp8_gemm(), "{}", plan.table());
            assert_eq!(check_fp8_products(&fp8, target), (1, 1));
        }
        let exact = one_rounded_weight_grad(sizes.0, sizes.1, Accumulation::Exact);
        for (program, target) in [(&exact, Some(Fp8Target::Hopper)), (&fp8, None)] {
            let plan = LibraryPlan::of(program, target).unwrap();
            let call = plan.calls[0].as_ref().unwrap();
            assert!(!call.runs_fp8_gemm(), "{}", plan.table());
            assert_eq!(check_products(program, &plan, |_| true), (1, 1));
        }
    }
}

/// A K-grouped FP8 GEMM's N is x's width, a multiple of 8 (the epilogue stores column pairs
/// of 8-wide fragments): x 20 wide runs as the f32 GEMM over the rounded rows, and says why; a
/// tile that is not 128 token-slots is refused with the reason.
#[test]
fn an_expert_weight_gradient_the_fp8_gemm_cannot_take_runs_in_f32() {
    let program = one_rounded_weight_grad((40, 2, 1), (3, 16, 20), Accumulation::HOPPER);
    let plan = LibraryPlan::of(&program, Some(Fp8Target::Hopper)).unwrap();
    let call = plan.calls[0].as_ref().unwrap();
    assert!(!call.runs_fp8_gemm());
    let note = call.note.as_deref().unwrap();
    assert!(note.contains("20"), "{note}");
    assert_eq!(check_products(&program, &plan, |_| true), (1, 1));

    let mut program = program;
    let KernelBody::Library(Library::GroupedMatMulWeightGrad {
        rounding: Some(tiles),
        ..
    }) = &mut program.kernels[0].body
    else {
        unreachable!()
    };
    tiles.tile_rows = 64;
    let err = LibraryPlan::of(&program, Some(Fp8Target::Hopper))
        .unwrap_err()
        .to_string();
    assert!(err.contains("tiles of 64") && err.contains("128"), "{err}");
}
