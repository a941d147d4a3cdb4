//! Pipeline-parallel training on CPU ranks (threads) against single-rank training: the same
//! losses and gradients under every schedule, and failed or stalled ranks reported, not hung.

#![allow(clippy::unwrap_used)] // test helpers fail loudly by design

use std::collections::BTreeMap;
use std::time::Instant;

use fathom_compiler::model::{LossWeights, parameter_graph};
use fathom_compiler::partition::{Phase, StagePlan, layer_costs, split_phases, stage_graph};
use fathom_compiler::pipeline::{Method, ScheduleOp};
use fathom_compiler::spec::ModelSpec;
use fathom_compiler::training::training_graph;
use fathom_runtime::data::{SyntheticBatches, SyntheticKind, SyntheticTask};
use fathom_runtime::exec::Backend;
use fathom_runtime::exec::Executable;
use fathom_runtime::init::init_parameters;
use fathom_runtime::interp::{Feeds, evaluate};
use fathom_runtime::optim::{AdamWConfig, LrSchedule};
use fathom_runtime::optim::{Grads, accumulate};
use fathom_runtime::parallel::{Fault, FaultKind, Pipeline, PipelineRun, PipelineSettings};
use fathom_runtime::tensor::HostTensor;
use fathom_runtime::train::{Checkpoint, StepReport, TrainError, TrainSettings, Trainer};
use fathom_runtime::weights::Weights;

const BATCH: usize = 2;
const SEQ: usize = 8;

/// `small` with four layers (one dense, three MoE) and a tied head, so that stages differ and
/// the embedding is shared by the first and the last stage.
fn spec() -> ModelSpec {
    let mut spec = fathom_compiler::spec::examples::small();
    spec.layers = 4;
    spec.tie_embeddings = true;
    spec
}

fn weights(spec: &ModelSpec) -> Weights {
    Weights::from(init_parameters(&parameter_graph(spec).unwrap(), 0.1, 5))
}

fn settings(micro_batches: usize, backend: Backend, pipeline: PipelineSettings) -> TrainSettings {
    TrainSettings {
        batch: BATCH,
        seq: SEQ,
        micro_batches,
        steps: 100,
        optimizer: AdamWConfig::default(),
        schedule: LrSchedule {
            peak_lr: 1e-2,
            warmup_steps: 0,
            hold_steps: 100,
            decay_steps: 0,
            final_lr: 1e-2,
        },
        clip_norm: Some(1.0),
        losses: LossWeights::deepseek_v3(),
        bias_update_speed: 0.001,
        backend,
        precision: Default::default(),
        pipeline,
    }
}

fn trainer(micro_batches: usize, backend: Backend, pipeline: PipelineSettings) -> Trainer {
    let spec = spec();
    let task = SyntheticTask::new(SyntheticKind::default(), spec.vocab_size, 11).unwrap();
    let data = SyntheticBatches::new(task, BATCH, SEQ).unwrap();
    let settings = settings(micro_batches, backend, pipeline);
    Trainer::new(spec.clone(), settings, weights(&spec), Box::new(data)).unwrap()
}

fn pipelined(stages: usize, schedule: Method) -> PipelineSettings {
    PipelineSettings {
        stages,
        schedule,
        data_parallel: 1,
        expert_parallel: 1,
        timeout_seconds: 60.0,
        zero: 1,
    }
}

fn replicated(stages: usize, schedule: Method, data_parallel: usize) -> PipelineSettings {
    PipelineSettings {
        data_parallel,
        ..pipelined(stages, schedule)
    }
}

fn expert_parallel(
    stages: usize,
    schedule: Method,
    data_parallel: usize,
    expert_parallel: usize,
) -> PipelineSettings {
    PipelineSettings {
        expert_parallel,
        ..replicated(stages, schedule, data_parallel)
    }
}

/// Largest |a - b| over every weight, relative to the largest |b| of that weight.
fn max_weight_difference(a: &Weights, b: &Weights) -> (f64, String) {
    let mut worst = (0.0, String::new());
    for (name, tb) in b.iter() {
        let (va, vb) = (a.get(name).unwrap().as_f32().unwrap(), tb.as_f32().unwrap());
        let scale = vb
            .iter()
            .fold(0f64, |m, &x| m.max(x.abs() as f64))
            .max(1e-12);
        let diff = va
            .iter()
            .zip(vb)
            .fold(0f64, |m, (&x, &y)| m.max((x as f64 - y as f64).abs()));
        if diff / scale > worst.0 {
            worst = (diff / scale, name.to_owned());
        }
    }
    worst
}

fn steps(trainer: &mut Trainer, n: usize) -> Vec<StepReport> {
    (0..n).map(|_| trainer.step().unwrap()).collect()
}

#[test]
fn pieces_run_in_turn_compute_what_the_whole_stage_graph_computes() {
    let spec = spec();
    let costs = layer_costs(&spec, SEQ, true).unwrap();
    let plan = StagePlan::balanced(&costs, 2).unwrap();
    let weights = weights(&spec);
    let task = SyntheticTask::new(SyntheticKind::default(), spec.vocab_size, 3).unwrap();
    let ids = task.batch_at(0, BATCH, SEQ);
    let hidden = HostTensor::f32(
        [BATCH, SEQ, spec.hidden_size],
        (0..BATCH * SEQ * spec.hidden_size)
            .map(|i| ((i * 7919) % 23) as f32 / 23.0 - 0.5)
            .collect(),
    );
    for stage in 0..2 {
        let built =
            stage_graph(&spec, &plan, stage, BATCH, SEQ, LossWeights::deepseek_v3()).unwrap();
        let mut inputs: BTreeMap<String, HostTensor> = BTreeMap::new();
        inputs.insert("input_ids".into(), ids.clone());
        inputs.insert("hidden.in".into(), hidden.clone());
        inputs.insert("grad.hidden.out".into(), hidden.clone());
        let run = |graph, inputs: &BTreeMap<String, HostTensor>| -> BTreeMap<String, HostTensor> {
            evaluate(graph, &Feeds::new(inputs, &weights))
                .unwrap()
                .into_iter()
                .collect()
        };
        let whole = run(&built.graph, &inputs);
        let pieces = split_phases(
            &built.graph,
            |name| match name {
                "grad.hidden.out" => Phase::InputGrad,
                _ => Phase::Forward,
            },
            |name| match name {
                "grad.hidden.in" => Phase::InputGrad,
                _ if name.starts_with("grad.") => Phase::WeightGrad,
                _ => Phase::Forward,
            },
        )
        .unwrap();
        let mut piecewise = BTreeMap::new();
        for phase in Phase::ALL {
            let out = run(pieces.get(phase), &inputs);
            for (name, tensor) in out {
                if name.starts_with("carry.") {
                    inputs.insert(name, tensor);
                } else {
                    piecewise.insert(name, tensor);
                }
            }
        }
        assert_eq!(
            piecewise.keys().collect::<Vec<_>>(),
            whole.keys().collect::<Vec<_>>(),
            "stage {stage}"
        );
        for (name, tensor) in &whole {
            assert_eq!(&piecewise[name], tensor, "stage {stage}: `{name}` differs");
        }
        // The weight-gradient matmuls wait for W; the first stage has nothing to send back.
        let weight_grads = pieces.get(Phase::WeightGrad);
        assert!(
            weight_grads
                .outputs
                .iter()
                .any(|o| o.name.starts_with("grad.model"))
        );
        if stage == 0 {
            assert!(pieces.get(Phase::InputGrad).outputs.is_empty());
        }
        assert!(pieces.carried_bytes(Phase::Forward) > 0);
        // Attention's statistic is computed with its forward and handed to the backward.
        let has_statistic = |phase| {
            let piece: &fathom_compiler::Graph = pieces.get(phase);
            piece.to_string().contains("causal_attention_lse")
        };
        assert!(has_statistic(Phase::Forward), "stage {stage}");
        assert!(!has_statistic(Phase::InputGrad), "stage {stage}");
    }
}

/// Every schedule on 4 stages (DualPipeV: 4 stages on 2 ranks) against one rank with the same
/// micro-batches accumulated, on the interpreter and on the compiled CPU path.
#[test]
fn every_schedule_trains_like_a_single_rank() {
    let micro = 8;
    for backend in [Backend::Interpreter, Backend::Cpu] {
        let mut single = trainer(micro, backend, PipelineSettings::default());
        let reference = steps(&mut single, 2);
        for method in Method::ALL {
            let started = Instant::now();
            let mut t = trainer(micro, backend, pipelined(4, method));
            let reports = steps(&mut t, 2);
            let (weight_diff, worst) =
                max_weight_difference(t.weights().unwrap(), single.weights().unwrap());
            for (r, s) in reports.iter().zip(&reference) {
                let loss_diff = ((r.loss - s.loss) / s.loss).abs();
                let norm_diff = ((r.grad_norm - s.grad_norm) / s.grad_norm).abs();
                eprintln!(
                    "{backend:?} {method}: step {} loss {:.7} vs {:.7} (rel {loss_diff:.1e}), \
                     grad norm rel {norm_diff:.1e}, weights after 2 steps rel {weight_diff:.1e} \
                     (`{worst}`), {:.1}s",
                    r.step,
                    r.loss,
                    s.loss,
                    started.elapsed().as_secs_f64()
                );
                // The stages compute the same ops as the whole graph; only the order of a few
                // sums differs (the embedding's gradient from two stages, the loss parts, f64
                // on the host): a few f32 ulps.
                assert!(loss_diff < 1e-6, "{method}: loss {} vs {}", r.loss, s.loss);
                assert!(
                    norm_diff < 1e-5,
                    "{method}: grad norm {} vs {}",
                    r.grad_norm,
                    s.grad_norm
                );
                assert_eq!(r.expert_loads, s.expert_loads, "{method}: expert loads");
            }
            // AdamW divides each gradient by its own running RMS, so an ulp-level gradient
            // difference on an element whose gradient is tiny (an expert that got few tokens)
            // becomes a visible difference of its update; two steps stay within 1e-3 of the
            // weight's scale. The gradients themselves are compared tightly below.
            assert!(
                weight_diff < 1e-3,
                "{method}: `{worst}` differs by {weight_diff:e}"
            );
        }
    }
}

/// The gradients of one step, parameter by parameter, against the whole training graph.
#[test]
fn pipelined_gradients_equal_the_whole_graph_gradients() {
    let spec = spec();
    let micro = 8;
    let weights = weights(&spec);
    let task = SyntheticTask::new(SyntheticKind::default(), spec.vocab_size, 5).unwrap();
    let batches: Vec<HostTensor> = (0..micro as u64)
        .map(|i| task.batch_at(i, BATCH, SEQ))
        .collect();
    let losses = LossWeights::deepseek_v3();
    let program = training_graph(&spec, BATCH, SEQ, losses).unwrap();
    for backend in [Backend::Interpreter, Backend::Cpu] {
        let whole = Executable::new(program.graph.clone(), backend).unwrap();
        let mut reference = Grads::new();
        for ids in &batches {
            let inputs = BTreeMap::from([("input_ids".to_owned(), ids.clone())]);
            let out = whole.run(&Feeds::new(&inputs, &weights)).unwrap();
            let grads: Grads = program
                .parameters
                .iter()
                .map(|p| {
                    (
                        p.clone(),
                        out[&format!("grad.{p}")].as_f32().unwrap().to_vec(),
                    )
                })
                .collect();
            accumulate(&mut reference, &grads, 1.0 / micro as f32).unwrap();
        }
        let layouts = Method::ALL
            .map(|method| pipelined(4, method))
            .into_iter()
            // Data parallelism: replicas of a pipeline, and of a single stage.
            .chain([
                replicated(2, Method::OneFOneB, 2),
                replicated(2, Method::DualPipeV, 4),
                replicated(1, Method::OneFOneB, 2),
            ])
            // Expert parallelism (compiled backend only): pairs of replicas split the 4
            // routed experts, alone and under a pipeline.
            .chain(match backend {
                Backend::Cpu => vec![
                    expert_parallel(1, Method::OneFOneB, 2, 2),
                    expert_parallel(2, Method::DualPipeV, 4, 2),
                    expert_parallel(2, Method::OneFOneB, 4, 4),
                ],
                Backend::Interpreter | Backend::Cuda => vec![],
            });
        for layout in layouts {
            let run = PipelineRun {
                spec: &spec,
                batch: BATCH,
                seq: SEQ,
                micro_batches: micro / layout.data_parallel,
                losses,
                precision: &Default::default(),
                backend,
                parameters: &program.parameters,
            };
            let pipeline = Pipeline::new(&layout, run).unwrap();
            let method = format!(
                "{} pp={} dp={} ep={}",
                layout.schedule, layout.stages, layout.data_parallel, layout.expert_parallel
            );
            let step = pipeline.run(&weights, None, &batches).unwrap();
            assert_eq!(
                step.grads.keys().collect::<Vec<_>>(),
                reference.keys().collect::<Vec<_>>()
            );
            let mut worst = (0f64, String::new());
            let mut identical = 0;
            for (name, expected) in &reference {
                let got = &step.grads[name];
                let scale = expected.iter().fold(0f64, |m, &x| m.max(x.abs() as f64));
                let diff = got
                    .iter()
                    .zip(expected)
                    .fold(0f64, |m, (&a, &b)| m.max((a as f64 - b as f64).abs()));
                identical += usize::from(diff == 0.0);
                if diff / scale.max(1e-30) > worst.0 {
                    worst = (diff / scale, name.clone());
                }
            }
            eprintln!(
                "{backend:?} {method}: {identical}/{} gradients bit-identical, worst {:.1e} relative (`{}`)",
                reference.len(),
                worst.0,
                worst.1
            );
            // Same ops, in the same order within each stage; the sums across micro-batches,
            // across DualPipe's two copies and across the two stages that read the embedding
            // are ordered differently: f32 rounding of those sums.
            assert!(
                worst.0 < 1e-5,
                "{backend:?} {method}: `{}` {:e}",
                worst.1,
                worst.0
            );
            // Where each micro-batch's gradient reaches the sum in the single-rank order (one
            // copy of each stage) the interpreter's results are bit-identical, except for the
            // embedding, whose two stages' parts are added in another order.
            if backend == Backend::Interpreter
                && layout.schedule != Method::DualPipe
                && layout.data_parallel == 1
            {
                assert_eq!(identical, reference.len() - 1, "{method}");
            }
        }
    }
}

/// The measured timeline: every op of every rank, in order, and no receive completes before
/// its send began (the ranks really waited for each other).
#[test]
fn the_measured_timeline_is_complete_and_causal() {
    let mut t = trainer(8, Backend::Cpu, pipelined(4, Method::DualPipe));
    t.step().unwrap();
    let timeline = t.last_timeline().unwrap();
    let schedule = t.pipeline().unwrap().schedule();
    assert_eq!(timeline.ranks.len(), schedule.ranks.len());
    let mut sends = std::collections::HashMap::new();
    for (rank, (report, ops)) in timeline.ranks.iter().zip(&schedule.ranks).enumerate() {
        let done: Vec<_> = report.ops.iter().map(|t| t.op).collect();
        assert_eq!(&done, ops, "rank {rank} ran its schedule in order");
        for pair in report.ops.windows(2) {
            assert!(pair[0].end <= pair[1].start && pair[1].start <= pair[1].end);
        }
        for op in &report.ops {
            if let ScheduleOp::Send { peer, msg } = op.op {
                sends.insert((rank, peer, msg), op.start);
            }
        }
        assert!(report.busy > 0.0 && report.busy <= timeline.makespan);
        assert_eq!(
            report.parameter_copies, 2,
            "DualPipe holds two stages per rank"
        );
    }
    for (rank, report) in timeline.ranks.iter().enumerate() {
        for op in &report.ops {
            if let ScheduleOp::Recv { peer, msg } = op.op {
                let sent = sends[&(peer, rank, msg)];
                assert!(
                    sent <= op.end,
                    "rank {rank} received {msg:?} before rank {peer} sent it"
                );
            }
        }
    }
    assert!(timeline.costs.f > 0.0 && timeline.costs.b > 0.0);
}

#[test]
fn a_failed_rank_stops_the_step_with_its_rank_and_op_and_changes_nothing() {
    let mut t = trainer(8, Backend::Cpu, pipelined(4, Method::DualPipe));
    let before = t.weights().unwrap().clone();
    t.inject_fault(Some(Fault {
        rank: 2,
        op_index: 3,
        kind: FaultKind::Fail,
    }));
    let err = t.step().unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, TrainError::Pipeline(_)), "{text}");
    assert!(
        text.starts_with("pipeline rank 2 failed at op 3 ("),
        "{text}"
    );
    assert!(text.contains("injected failure"), "{text}");
    assert_eq!(t.step_count(), 0);
    assert_eq!(max_weight_difference(t.weights().unwrap(), &before).0, 0.0);
    // The run goes on once the fault is gone.
    t.inject_fault(None);
    t.step().unwrap();
}

#[test]
fn a_stalled_rank_is_reported_by_the_peer_that_waits_for_it() {
    // Long enough that a rank that is only slow (tests run side by side on 2 cores) is not
    // taken for a stalled one.
    let mut settings = pipelined(4, Method::OneFOneB);
    settings.timeout_seconds = 2.0;
    let mut t = trainer(4, Backend::Cpu, settings);
    // Rank 1's first op is the receive of micro-batch 0's activation; stall just after it.
    t.inject_fault(Some(Fault {
        rank: 1,
        op_index: 1,
        kind: FaultKind::Stall,
    }));
    let started = Instant::now();
    let text = t.step().unwrap_err().to_string();
    assert!(
        started.elapsed().as_secs_f64() < 30.0,
        "took {:?}",
        started.elapsed()
    );
    assert!(text.contains("from rank 1 after"), "{text}");
    assert!(text.contains("is rank 1 stalled?"), "{text}");
}

#[test]
fn impossible_pipelines_are_refused_with_the_setting() {
    let spec = spec();
    let task = SyntheticTask::new(SyntheticKind::default(), spec.vocab_size, 11).unwrap();
    let build = |micro, pipeline| {
        let data = SyntheticBatches::new(task.clone(), BATCH, SEQ).unwrap();
        Trainer::new(
            spec.clone(),
            settings(micro, Backend::Cpu, pipeline),
            weights(&spec),
            Box::new(data),
        )
    };
    let err = build(6, pipelined(4, Method::DualPipe))
        .unwrap_err()
        .to_string();
    assert!(err.contains("training setting `pipeline`"), "{err}");
    assert!(err.contains("micro"), "{err}");
    let err = build(8, pipelined(8, Method::OneFOneB))
        .unwrap_err()
        .to_string();
    assert!(err.contains("8 pipeline stages"), "{err}");
    let err = build(4, expert_parallel(1, Method::OneFOneB, 3, 2))
        .unwrap_err()
        .to_string();
    assert!(err.contains("must divide `data_parallel` = 3"), "{err}");
    let err = build(4, expert_parallel(1, Method::OneFOneB, 3, 3))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("must divide the model's 4 routed experts"),
        "{err}"
    );
}

fn zero(stage: u8, pipeline: PipelineSettings) -> PipelineSettings {
    PipelineSettings {
        zero: stage,
        ..pipeline
    }
}

/// The whole optimizer state of a trainer, as a checkpoint holds it.
fn optimizer_state(t: &mut Trainer) -> Vec<(String, HostTensor)> {
    t.checkpoint_state().unwrap().unwrap().2
}

/// ZeRO-1 shards the AdamW moments over the replicas (and DualPipe's copies) and each shard
/// updates its elements: the same bits as the unsharded update, weights and moments, with a
/// fraction of the state per rank.
#[test]
fn zero_1_updates_the_same_bits_with_a_share_of_the_state_per_rank() {
    let layouts = [
        replicated(1, Method::OneFOneB, 4),
        replicated(2, Method::OneFOneB, 2),
        pipelined(2, Method::DualPipe),
    ];
    for layout in layouts {
        let what = format!(
            "{} pp={} dp={}",
            layout.schedule, layout.stages, layout.data_parallel
        );
        let micro = 8 / layout.data_parallel;
        let mut unsharded = trainer(micro, Backend::Cpu, zero(0, layout.clone()));
        let mut sharded = trainer(micro, Backend::Cpu, zero(1, layout.clone()));
        let reference = steps(&mut unsharded, 2);
        let reports = steps(&mut sharded, 2);
        for (r, s) in reports.iter().zip(&reference) {
            assert_eq!((r.loss, r.grad_norm), (s.loss, s.grad_norm), "{what}");
        }
        assert_eq!(
            max_weight_difference(sharded.weights().unwrap(), unsharded.weights().unwrap()).0,
            0.0,
            "{what}: weights"
        );
        assert!(
            optimizer_state(&mut sharded) == optimizer_state(&mut unsharded),
            "{what}: moments"
        );

        let total: u64 = unsharded.optimizer_bytes_per_rank().values().sum();
        let per_rank = sharded.optimizer_bytes_per_rank();
        // What the plan says each rank keeps is what its shard holds.
        let held: BTreeMap<usize, u64> = sharded
            .optimizer()
            .shards()
            .iter()
            .map(|(&rank, shard)| (rank, shard.state_bytes()))
            .collect();
        assert_eq!(per_rank, held, "{what}");
        assert_eq!(per_rank.values().sum::<u64>(), total, "{what}");
        let largest = *per_rank.values().max().unwrap();
        let unsharded_largest = *unsharded.optimizer_bytes_per_rank().values().max().unwrap();
        eprintln!(
            "{what}: {} bytes of moments; largest rank keeps {largest} with ZeRO-1, \
             {unsharded_largest} without ({} ranks)",
            total,
            per_rank.len()
        );
        eprintln!("  {}", sharded.describe_optimizer());
        if layout.stages == 1 {
            // Every parameter on every replica: each keeps a quarter, up to one element of
            // rounding per parameter.
            assert_eq!(unsharded_largest, total, "{what}");
            let share = total as f64 / 4.0;
            for (&rank, &bytes) in &per_rank {
                assert!(
                    (bytes as f64 - share).abs() / share < 0.01,
                    "{what}: rank {rank} keeps {bytes} of {total}"
                );
            }
        } else {
            // Two holders of every parameter (replicas, or DualPipe's two copies).
            assert!(
                (largest as f64) < 0.6 * unsharded_largest as f64,
                "{what}: {largest} vs {unsharded_largest}"
            );
        }
    }
}

/// A checkpoint holds the whole optimizer state (gathered from the shards): resuming a
/// sharded run continues it bit for bit.
#[test]
fn a_sharded_run_resumes_bit_identically() {
    let layout = replicated(2, Method::OneFOneB, 2);
    let mut straight = trainer(4, Backend::Cpu, layout.clone());
    let expected = steps(&mut straight, 4);
    let dir = tempfile::tempdir().unwrap();
    let mut first = trainer(4, Backend::Cpu, layout);
    steps(&mut first, 2);
    let saved = first.save_checkpoint(dir.path()).unwrap();
    drop(first);
    let spec = spec();
    let task = SyntheticTask::new(SyntheticKind::default(), spec.vocab_size, 11).unwrap();
    let data = SyntheticBatches::new(task, BATCH, SEQ).unwrap();
    let checkpoint = Checkpoint::load(&saved).unwrap();
    let mut resumed = Trainer::resume(checkpoint, Box::new(data)).unwrap();
    let reports = steps(&mut resumed, 2);
    for (r, e) in reports.iter().zip(&expected[2..]) {
        assert_eq!((r.step, r.loss, r.grad_norm), (e.step, e.loss, e.grad_norm));
    }
    assert_eq!(
        max_weight_difference(resumed.weights().unwrap(), straight.weights().unwrap()).0,
        0.0
    );
    assert!(optimizer_state(&mut resumed) == optimizer_state(&mut straight));
}
