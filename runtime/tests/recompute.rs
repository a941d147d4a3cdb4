//! The recompute pass (DeepSeek-V3's policy: RMSNorms and the MLA up-projections recomputed
//! in backward) changes where values are computed, not what: the loss and every gradient are
//! bit-identical to the graph without it, on the interpreter and on the compiled CPU path
//! (tolerance 0: the copies are the same ops on the same inputs, and the CPU backend is
//! deterministic).

#![allow(clippy::unwrap_used)]

mod common;

use common::FixtureStep;

use fathom_compiler::compile::{CompileOptions, compile};
use fathom_compiler::model::LossWeights;
use fathom_compiler::passes::{RecomputePolicy, recompute};
use fathom_runtime::HostTensor;
use fathom_runtime::cpu::CpuProgram;
use fathom_runtime::interp::{Feeds, evaluate};

#[test]
fn recomputed_training_steps_give_identical_losses_and_gradients() {
    for name in ["moe_grouped", "no_q_lora"] {
        let FixtureStep {
            model,
            train,
            inputs,
        } = FixtureStep::load(name, LossWeights::deepseek_v3());
        let feeds = Feeds::new(&inputs, &model.weights);

        let recomputed = recompute(&train.graph, RecomputePolicy::DeepSeekV3);
        assert!(
            recomputed.nodes.len() > train.graph.nodes.len(),
            "{name}: nothing recomputed"
        );
        let want = evaluate(&train.graph, &feeds).unwrap();
        let got = evaluate(&recomputed, &feeds).unwrap();
        assert_eq!(got, want, "{name}: interpreter");

        let run = |policy| {
            let options = CompileOptions {
                recompute: policy,
                ..CompileOptions::default()
            };
            let compiled = compile(&train.graph, &options).unwrap();
            let peak = compiled.plan.peak_bytes();
            let outputs: Vec<(String, HostTensor)> = CpuProgram::new(compiled.program)
                .run(&feeds)
                .unwrap()
                .into_iter()
                .collect();
            (outputs, peak)
        };
        let (mut plain, peak_plain) = run(RecomputePolicy::None);
        let (mut with, peak_with) = run(RecomputePolicy::DeepSeekV3);
        plain.sort_by(|a, b| a.0.cmp(&b.0));
        with.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(plain.len(), with.len());
        for ((name_a, a), (name_b, b)) in plain.iter().zip(&with) {
            assert_eq!(name_a, name_b);
            assert_eq!(a, b, "{name}: compiled {name_a}");
        }
        eprintln!("{name}: plan peak {peak_plain} -> {peak_with} bytes");
        assert!(
            peak_with < peak_plain,
            "{name}: {peak_plain} -> {peak_with}"
        );
    }
}
