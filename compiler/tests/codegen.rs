//! CUDA C++ generated from the kernel IR, pinned as snapshots (NVRTC compiles all of it in
//! `kernels/tests/generated.rs`): representative kernels of the tiny model's forward pass, the
//! launch table, the template calls, and a hand-built program covering every construct.

use fathom_compiler::codegen::sample::coverage_program;
use fathom_compiler::codegen::{CodegenError, CudaKernel, CudaProgram, Mapping, cuda_program};
use fathom_compiler::compile::{CompileOptions, compile};
use fathom_compiler::kernel::{BufferId, Expr, KernelBody, LoopNest, Stmt, View};
use fathom_compiler::model::{ForwardOptions, forward_graph};
use fathom_compiler::spec::ModelSpec;
use fathom_compiler::{DType, GraphBuilder, Tensor, TensorType};

/// The workspace's smallest full-featured spec (`fathom_compiler::spec::examples::micro`).
fn tiny() -> ModelSpec {
    fathom_compiler::spec::examples::micro()
}

fn tiny_forward() -> CudaProgram {
    let options = ForwardOptions {
        batch: 1,
        seq: 3,
        with_mtp: false,
    };
    let graph = forward_graph(&tiny(), options).expect("the graph builds");
    let compiled = compile(&graph, &CompileOptions::default()).expect("it compiles");
    cuda_program(&compiled.program).expect("CUDA is generated")
}

/// The first loop kernel of `origin` whose name has `word` (`k8_sub_…` has `_sub_`) and whose
/// source entry has `kind` (`map`, `row_mean`, …).
fn kernel<'a>(cuda: &'a CudaProgram, origin: &str, word: &str, kind: &str) -> &'a CudaKernel {
    cuda.kernels
        .iter()
        .find(|k| {
            k.origin == origin
                && k.name.contains(word)
                && k.entry().starts_with(&format!("fathom_{kind}_"))
        })
        .unwrap_or_else(|| panic!("no {kind} kernel `{word}` in {origin}"))
}

#[test]
fn rmsnorm_is_a_row_reduction_then_a_store() {
    let cuda = tiny_forward();
    let norm = kernel(&cuda, "model.layers.0.input_layernorm", "_", "row_mean");
    assert_eq!(norm.source.mapping, Mapping::RowsPerTeam { team: 8 });
    insta::assert_snapshot!(norm.annotated_source());
}

/// The max, the exponentials, their sum and the division: one row kernel (merged by the
/// lowering), whose sum and division read back the exponentials the same thread stored.
#[test]
fn softmax_is_one_row_kernel() {
    let cuda = tiny_forward();
    let softmax = kernel(
        &cuda,
        "model.layers.0.self_attn",
        "_exp_div_",
        "row_max_sum",
    );
    insta::assert_snapshot!(softmax.annotated_source());
}

#[test]
fn rope_rotation_is_elementwise() {
    let cuda = tiny_forward();
    let rotation = kernel(&cuda, "model.layers.0.self_attn", "_sub_", "map");
    assert_eq!(rotation.source.mapping, Mapping::Elementwise);
    insta::assert_snapshot!(rotation.annotated_source());
}

#[test]
fn swiglu_is_elementwise() {
    let cuda = tiny_forward();
    let dense = kernel(&cuda, "model.layers.0.mlp", "_mul_", "map");
    let experts = kernel(&cuda, "model.layers.1.mlp.experts", "_mul_", "map");
    insta::assert_snapshot!(format!(
        "{}\n{}",
        dense.annotated_source(),
        experts.annotated_source()
    ));
}

/// Every step with its entry point or template, launch and nodes; and how far sources dedupe.
#[test]
fn tiny_launch_table_and_unique_sources() {
    let cuda = tiny_forward();
    let summary = format!(
        "{} steps: {} generated kernels, {} template calls, {} unique sources\n\n{}",
        cuda.launches.len(),
        cuda.kernels.len(),
        cuda.library_calls().count(),
        cuda.sources.len(),
        cuda.launch_table()
    );
    insta::assert_snapshot!(summary);
}

#[test]
fn library_calls_name_their_templates_and_parameters() {
    let cuda = tiny_forward();
    let mut text = String::new();
    for call in cuda.library_calls() {
        let params: Vec<String> = call
            .params
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        text.push_str(&format!(
            "{} -> {} [{}]\n  {}\n",
            call.name,
            call.template,
            call.implemented_by.unwrap_or("no template yet"),
            params.join(", ")
        ));
    }
    insta::assert_snapshot!(text);
}

#[test]
fn layers_of_equal_shape_share_one_source_with_their_own_buffers() {
    let cuda = tiny_forward();
    let first = kernel(&cuda, "model.layers.0.input_layernorm", "_", "row_mean");
    let second = kernel(&cuda, "model.layers.1.input_layernorm", "_", "row_mean");
    assert_eq!(first.source.text, second.source.text);
    assert!(std::sync::Arc::ptr_eq(&first.source, &second.source));
    assert_ne!(first.args, second.args);
    assert_ne!(first.nodes, second.nodes);
    // Each source appears once, and every kernel's source is one of them.
    for kernel in &cuda.kernels {
        let matching = cuda
            .sources
            .iter()
            .filter(|s| s.entry == kernel.entry())
            .count();
        assert_eq!(matching, 1, "{}", kernel.name);
    }
    // Deterministic: the same program gives the same text.
    let again = tiny_forward();
    let texts = |c: &CudaProgram| c.sources.iter().map(|s| s.text.clone()).collect::<Vec<_>>();
    assert_eq!(texts(&cuda), texts(&again));
}

#[test]
fn pointer_offsets_let_copies_into_different_slots_share_a_source() {
    // Four matrices stacked into one buffer: four kernels, one source, four offsets. (The
    // experts' weights are fed into their stack in place, so no model stacks by copies.)
    let mut g = GraphBuilder::new("stacked");
    let ty = TensorType::new(DType::F32, [4, 8]);
    let parts: Vec<Tensor> = (0..4)
        .map(|i| g.input(&format!("x{i}"), ty.clone()).unwrap())
        .collect();
    let stacked = g.stack(&parts).unwrap();
    g.output("stacked", stacked).unwrap();
    let compiled = compile(&g.finish(), &CompileOptions::default()).expect("it compiles");
    let cuda = cuda_program(&compiled.program).expect("CUDA is generated");
    let stacks: Vec<&CudaKernel> = (cuda.kernels.iter())
        .filter(|k| k.name.contains("_stack"))
        .collect();
    assert_eq!(stacks.len(), 4);
    assert!(stacks.iter().all(|k| k.entry() == stacks[0].entry()));
    let offsets: Vec<usize> = stacks.iter().map(|k| k.args[1].offset).collect();
    assert_eq!(offsets, [0, 32, 64, 96]);
}

#[test]
fn every_construct_of_the_coverage_program() {
    let cuda = cuda_program(&coverage_program()).unwrap();
    let mut text = cuda.launch_table();
    for kernel in &cuda.kernels {
        text.push('\n');
        text.push_str(&kernel.annotated_source());
    }
    insta::assert_snapshot!(text);
    let wide = cuda
        .kernels
        .iter()
        .find(|k| k.name.ends_with("transpose_wide"))
        .unwrap();
    assert!(
        wide.source
            .text
            .contains("const long long points = 2147483648;")
    );
    let block = cuda
        .kernels
        .iter()
        .find(|k| k.name.ends_with("center_block"))
        .unwrap();
    assert!(block.source.text.contains("__syncthreads();\n    // out1"));
    let team = cuda
        .kernels
        .iter()
        .find(|k| k.name.ends_with("center_team"))
        .unwrap();
    assert!(team.source.text.contains("__syncwarp();"));
}

#[test]
fn a_row_reading_another_rows_output_is_an_error() {
    let mut program = coverage_program();
    // Row i reads element i + 1 of the buffer the kernel writes: rows would race on a GPU.
    let view = |offset| View {
        buffer: BufferId(1),
        offset,
        strides: vec![100, 1],
    };
    program.kernels.truncate(1);
    program.kernels[0].body = KernelBody::Loop(LoopNest {
        domain: vec![1, 99],
        body: vec![Stmt::Store {
            view: view(0),
            value: Expr::Load(view(1)),
        }],
    });
    let error = cuda_program(&program).unwrap_err();
    assert!(matches!(error, CodegenError::UnsupportedDependency { .. }));
    assert_eq!(
        error.to_string(),
        "kernel k0_softmax_block: statement 0 loads out0 through a view other than the one \
         statement 0 stores it through; such a kernel cannot run its rows in parallel"
    );
}

#[test]
fn a_store_that_repeats_an_element_is_an_error() {
    let mut program = coverage_program();
    program.kernels.truncate(1);
    program.kernels[0].body = KernelBody::Loop(LoopNest {
        domain: vec![2, 100],
        body: vec![Stmt::Store {
            view: View {
                buffer: BufferId(1),
                offset: 0,
                strides: vec![0, 1],
            },
            value: Expr::Constant(1.0),
        }],
    });
    let error = cuda_program(&program).unwrap_err();
    assert!(
        error
            .to_string()
            .contains("stores every index of axis 0 into the same element of out0"),
        "{error}"
    );
}
