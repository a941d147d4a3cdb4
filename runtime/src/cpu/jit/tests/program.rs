//! A whole training program: every loop kernel compiles, and the compiled program's outputs are
//! the row evaluator's bit for bit.

use std::collections::HashMap;

use fathom_compiler::lower::lower;
use fathom_compiler::model::{LossWeights, parameter_graph};
use fathom_compiler::spec::ModelSpec;
use fathom_compiler::training::training_graph;

use crate::cpu::CpuProgram;
use crate::init::init_parameters;
use crate::interp::Feeds;
use crate::tensor::HostTensor;

/// MLA with low-rank queries, a dense block then an MoE block with group-limited routing and a
/// shared expert, and an MTP module: every kind of kernel the lowering makes.
fn spec() -> ModelSpec {
    fathom_compiler::spec::examples::small()
}

#[test]
fn a_training_program_compiles_whole_and_runs_bit_for_bit_like_the_row_evaluator() {
    let spec = spec();
    let (batch, seq) = (2, 8);
    let train = training_graph(&spec, batch, seq, LossWeights::deepseek_v3()).unwrap();
    let program = lower(&train.graph).unwrap();
    let weights = init_parameters(&parameter_graph(&spec).unwrap(), 0.1, 7);
    let ids: Vec<i64> = (0..batch * seq)
        .map(|i| (i * 5 % spec.vocab_size) as i64)
        .collect();
    let inputs = HashMap::from([("input_ids".to_owned(), HostTensor::i64([batch, seq], ids))]);
    let feeds = Feeds::new(&inputs, &weights);

    let compiled = CpuProgram::new(program.clone());
    let report = compiled.jit_report().unwrap();
    let loops = program
        .kernels
        .iter()
        .filter(|k| matches!(k.body, fathom_compiler::kernel::KernelBody::Loop(_)))
        .count();
    assert!(report.fallbacks.is_empty(), "{:?}", report.fallbacks);
    assert_eq!(report.compiled, loops);
    eprintln!(
        "{loops} loop kernels compiled in {:.1} ms",
        report.compile_time.as_secs_f64() * 1e3
    );

    let got = compiled.run(&feeds).unwrap();
    let want = CpuProgram::without_jit(program).run(&feeds).unwrap();
    let mut count = 0;
    for (name, want) in want.iter() {
        let got = got.get(name).unwrap();
        match (got.as_f32(), want.as_f32()) {
            (Some(g), Some(w)) => {
                let same = g
                    .iter()
                    .zip(w)
                    .all(|(a, b)| a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()));
                assert!(same, "{name} differs");
            }
            _ => assert_eq!(got, want, "{name}"),
        }
        count += 1;
    }
    assert!(count > 10);
}
