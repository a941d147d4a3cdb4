//! Training end to end on the CPU: the loss falls on the synthetic task, and a resumed run is
//! bit-identical to an uninterrupted one.

#![allow(clippy::unwrap_used)] // test helpers fail loudly by design

use fathom_compiler::model::{LossWeights, parameter_graph};
use fathom_compiler::spec::ModelSpec;
use fathom_runtime::data::{SyntheticBatches, SyntheticKind, SyntheticTask};
use fathom_runtime::exec::Backend;
use fathom_runtime::init::init_parameters;
use fathom_runtime::optim::{AdamWConfig, LrSchedule, MomentPrecision};
use fathom_runtime::train::{Checkpoint, StepReport, TrainSettings, Trainer, latest_checkpoint};
use fathom_runtime::weights::Weights;

fn tiny_spec() -> ModelSpec {
    fathom_compiler::spec::examples::small()
}

fn settings(steps: u64) -> TrainSettings {
    TrainSettings {
        batch: 8,
        seq: 16,
        micro_batches: 2,
        steps,
        optimizer: AdamWConfig {
            weight_decay: 0.01,
            moments: MomentPrecision::Bf16,
            ..AdamWConfig::default()
        },
        schedule: LrSchedule {
            peak_lr: 1e-2,
            warmup_steps: 10,
            hold_steps: 1000,
            decay_steps: 0,
            final_lr: 1e-2,
        },
        clip_norm: Some(1.0),
        losses: LossWeights::deepseek_v3(),
        bias_update_speed: 0.001,
        backend: Backend::default(),
        precision: Default::default(),
        pipeline: Default::default(),
    }
}

fn trainer(steps: u64) -> Trainer {
    let spec = tiny_spec();
    let weights = Weights::from(init_parameters(&parameter_graph(&spec).unwrap(), 0.1, 5));
    let task = SyntheticTask::new(SyntheticKind::default(), spec.vocab_size, 11).unwrap();
    let data = SyntheticBatches::new(task, 8, 16).unwrap();
    Trainer::new(spec, settings(steps), weights, Box::new(data)).unwrap()
}

fn run(trainer: &mut Trainer, steps: u64) -> Vec<StepReport> {
    (0..steps).map(|_| trainer.step().unwrap()).collect()
}

#[test]
fn the_loss_falls_on_the_synthetic_task() {
    let mut t = trainer(60);
    let reports = run(&mut t, 60);
    let first = reports[0].loss_next_token;
    let last = reports[reports.len() - 5..]
        .iter()
        .map(|r| r.loss_next_token)
        .sum::<f64>()
        / 5.0;
    eprintln!("next-token loss {first:.3} -> {last:.3} over 60 steps");
    // ln 16 = 2.77 at the start; a model that learned the step of each row gets near
    // ln 4 / 15 = 0.09 (the task's floor). Falling below 1.5 means it uses the previous tokens.
    assert!(
        (first - 16f64.ln()).abs() < 0.5,
        "starts near uniform: {first}"
    );
    assert!(
        last < 1.5,
        "the loss fell from {first:.3} to only {last:.3}"
    );
    assert!(
        reports
            .iter()
            .all(|r| r.loss_mtp.is_some() && r.loss_balance.is_some())
    );
}

#[test]
fn a_resumed_run_is_bit_identical() {
    let dir = tempfile::tempdir().unwrap();
    let mut straight = trainer(6);
    let expected = run(&mut straight, 6);

    let mut first_half = trainer(6);
    run(&mut first_half, 3);
    let saved = first_half.save_checkpoint(dir.path()).unwrap();
    assert_eq!(latest_checkpoint(dir.path()).unwrap(), Some(saved.clone()));
    drop(first_half);

    let checkpoint = Checkpoint::load(&saved).unwrap();
    let task = SyntheticTask::new(SyntheticKind::default(), 16, 11).unwrap();
    let data = SyntheticBatches::new(task, 8, 16).unwrap();
    let mut resumed = Trainer::resume(checkpoint, Box::new(data)).unwrap();
    assert_eq!(resumed.step_count(), 3);
    let rest = run(&mut resumed, 3);
    for (a, b) in expected[3..].iter().zip(&rest) {
        assert_eq!(a.loss.to_bits(), b.loss.to_bits(), "step {}", a.step);
        assert_eq!(
            a.grad_norm.to_bits(),
            b.grad_norm.to_bits(),
            "step {}",
            a.step
        );
    }
    for (name, tensor) in straight.weights().unwrap().iter() {
        assert_eq!(Some(tensor), resumed.weights().unwrap().get(name), "{name}");
    }
}

#[test]
fn every_step_reports_the_expert_loads() {
    let mut t = trainer(1);
    let report = t.step().unwrap();
    // Two MoE blocks (layer 1 and the MTP block, layer 2), 4 experts each; every token goes
    // to 2 experts: 2 micro-batches x 8 x 16 tokens (the MTP block sees 15 per row).
    let names: Vec<&String> = report.expert_loads.keys().collect();
    assert_eq!(
        names,
        [
            "model.layers.1.mlp.gate.e_score_correction_bias",
            "model.layers.2.mlp.gate.e_score_correction_bias"
        ]
    );
    let main: f64 = report.expert_loads[names[0]].iter().sum();
    let mtp: f64 = report.expert_loads[names[1]].iter().sum();
    assert_eq!(
        (main, mtp),
        (2.0 * 2.0 * 8.0 * 16.0, 2.0 * 2.0 * 8.0 * 15.0)
    );
    assert!(report.max_load_violation.unwrap() >= 0.0);
}

#[test]
fn damaged_checkpoints_are_refused_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let mut t = trainer(2);
    run(&mut t, 1);
    let saved = t.save_checkpoint(dir.path()).unwrap();

    let model = saved.join("model.safetensors");
    let bytes = std::fs::read(&model).unwrap();
    std::fs::write(&model, &bytes[..bytes.len() / 2]).unwrap();
    let error = Checkpoint::load(&saved).unwrap_err().to_string();
    assert!(error.contains("model.safetensors"), "{error}");
    std::fs::write(&model, &bytes).unwrap();

    let trainer_json = saved.join("trainer.json");
    let text = std::fs::read_to_string(&trainer_json).unwrap();
    std::fs::write(&trainer_json, &text[..text.len() / 2]).unwrap();
    let error = Checkpoint::load(&saved).unwrap_err().to_string();
    assert!(
        error.contains("trainer.json is not a Fathom trainer state"),
        "{error}"
    );
    std::fs::write(&trainer_json, &text).unwrap();

    // Optimizer state that does not fit the model.
    let optimizer = saved.join("optimizer.safetensors");
    let state = fathom_runtime::weights::read_safetensors(&optimizer).unwrap();
    let kept: Vec<(&str, &fathom_runtime::HostTensor)> = state
        .iter()
        .filter(|(n, _)| !n.contains("o_proj"))
        .collect();
    fathom_runtime::weights::save_safetensors(&optimizer, kept).unwrap();
    let checkpoint = Checkpoint::load(&saved).unwrap();
    let task = SyntheticTask::new(SyntheticKind::default(), 16, 11).unwrap();
    let data = SyntheticBatches::new(task, 8, 16).unwrap();
    let error = Trainer::resume(checkpoint, Box::new(data))
        .unwrap_err()
        .to_string();
    assert!(error.contains("o_proj"), "{error}");
}

#[test]
fn the_loss_falls_on_text() {
    use fathom_runtime::data::TextDataset;
    let dir = tempfile::tempdir().unwrap();
    let corpus = dir.path().join("corpus.txt");
    let text = "the quick brown fox jumps over the lazy dog. ".repeat(40);
    std::fs::write(&corpus, text).unwrap();
    let spec = ModelSpec {
        vocab_size: 256,
        ..tiny_spec()
    };
    let weights = Weights::from(init_parameters(&parameter_graph(&spec).unwrap(), 0.1, 5));
    let data = TextDataset::open(&corpus, 8, 16).unwrap();
    let mut t = Trainer::new(spec, settings(40), weights, Box::new(data)).unwrap();
    let reports = run(&mut t, 40);
    let first = reports[0].loss_next_token;
    let last = reports[35..].iter().map(|r| r.loss_next_token).sum::<f64>() / 5.0;
    eprintln!("text: next-token loss {first:.3} -> {last:.3} over 40 steps");
    // ln 256 = 5.55 at the start; the sentence uses 28 distinct bytes (ln 28 = 3.3), and a
    // model that learned the repetition goes far lower.
    assert!(
        last < first - 2.5,
        "the loss fell from {first:.3} to only {last:.3}"
    );
}
