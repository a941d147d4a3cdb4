//! `fathom grad` and `fathom train` end to end.

#![allow(clippy::unwrap_used)] // test helpers fail loudly by design

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use fathom::runtime::weights::read_safetensors;

fn fathom(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fathom"))
        .args(args)
        .output()
        .expect("the binary runs")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// `fathom grad` against PyTorch autograd through transformers: loss within 1e-5 relative,
/// every gradient within 1e-3 of its max|ref| (see runtime/tests/hf_fixtures.rs for why).
#[test]
fn grad_matches_the_transformers_fixture() {
    let fixture = repo("tests/fixtures/yarn");
    let reference = read_safetensors(&fixture.join("reference.safetensors")).unwrap();
    let ids = reference.get("input_ids").unwrap();
    let seq = ids.dims()[1];
    let rows: Vec<String> = ids
        .as_i64()
        .unwrap()
        .chunks(seq)
        .map(|row| row.iter().map(i64::to_string).collect::<Vec<_>>().join(","))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("grads.safetensors");
    let mut args = vec![
        "grad",
        "--model",
        fixture.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    for row in &rows {
        args.extend(["--tokens", row]);
    }
    let run = fathom(&args);
    assert!(run.status.success(), "{}", stderr(&run));
    let written = read_safetensors(&out).unwrap();
    let loss = written.get("loss").unwrap().as_f32().unwrap()[0];
    let want = reference.get("loss").unwrap().as_f32().unwrap()[0];
    assert!(((loss - want) / want).abs() < 1e-5, "loss {loss} vs {want}");
    let mut checked = 0;
    for (name, grad) in written.iter().filter(|(n, _)| *n != "loss") {
        let want = reference
            .get(&format!("grad.{name}"))
            .unwrap_or_else(|| panic!("{name}"));
        let (got, want) = (grad.as_f32().unwrap(), want.as_f32().unwrap());
        let max_ref = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        let max_diff = got
            .iter()
            .zip(want)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(
            max_diff <= 1e-3 * max_ref.max(f32::MIN_POSITIVE),
            "{name}: {max_diff} vs {max_ref}"
        );
        checked += 1;
    }
    let expected = reference.names().filter(|n| n.starts_with("grad.")).count();
    assert_eq!(
        checked, expected,
        "one gradient per trainable parameter, no buffer"
    );
}

fn run_file(dir: &Path, steps: u64) -> PathBuf {
    let text = std::fs::read_to_string(repo("examples/train-tiny.toml")).unwrap();
    let text = text
        .replace(
            "\"../target/runs/tiny/metrics.jsonl\"",
            &format!("{:?}", dir.join("metrics.jsonl")),
        )
        .replace(
            "dir = \"../target/runs/tiny\"",
            &format!("dir = {:?}", dir.join("ckpt")),
        )
        .replace("steps = 200", &format!("steps = {steps}"))
        .replace("every = 100", "every = 2")
        .replace("seq = 32", "seq = 12")
        .replace("batch = 8", "batch = 2");
    let path = dir.join("run.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn metric_lines(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn train_writes_metrics_and_checkpoints_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let config = run_file(dir.path(), 3);
    let first = fathom(&["train", "--config", config.to_str().unwrap()]);
    assert!(first.status.success(), "{}", stderr(&first));
    let lines = metric_lines(dir.path());
    assert_eq!(lines.len(), 3);
    for key in [
        "step",
        "loss",
        "loss_next_token",
        "loss_mtp",
        "loss_balance",
        "learning_rate",
        "grad_norm",
        "max_load_violation",
        "tokens_per_second",
    ] {
        assert!(
            lines[0].get(key).is_some(),
            "metrics lack {key}: {}",
            lines[0]
        );
    }
    let latest = std::fs::read_to_string(dir.path().join("ckpt/latest")).unwrap();
    assert_eq!(latest.trim(), "step-00000003");

    // Extending the run resumes it: steps 4 and 5 only.
    let more = fathom(&[
        "train",
        "--config",
        config.to_str().unwrap(),
        "--steps",
        "5",
    ]);
    assert!(more.status.success(), "{}", stderr(&more));
    assert!(stderr(&more).contains("resuming from"), "{}", stderr(&more));
    let lines = metric_lines(dir.path());
    let steps: Vec<u64> = lines.iter().map(|l| l["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, [1, 2, 3, 4, 5]);

    // A checkpoint continues only its own run.
    let other = fathom(&[
        "train",
        "--config",
        config.to_str().unwrap(),
        "--steps",
        "6",
        "--lr",
        "0.1",
    ]);
    assert!(!other.status.success());
    assert!(
        stderr(&other).contains("`schedule` was"),
        "{}",
        stderr(&other)
    );

    // The checkpoint is a model directory.
    let out = dir.path().join("logits.safetensors");
    let ckpt = dir.path().join("ckpt/step-00000005");
    let forward = fathom(&[
        "forward",
        "--model",
        ckpt.to_str().unwrap(),
        "--tokens",
        "1,2,3",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(forward.status.success(), "{}", stderr(&forward));
}

#[test]
fn ctrl_c_writes_a_checkpoint_and_exits_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let config = run_file(dir.path(), 100_000);
    let child = Command::new(env!("CARGO_BIN_EXE_fathom"))
        .args([
            "train",
            "--config",
            config.to_str().unwrap(),
            "--checkpoint-every",
            "1000000",
        ])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until a few steps are done, then interrupt.
    let deadline = Instant::now() + Duration::from_secs(120);
    while metric_count(dir.path()) < 2 {
        assert!(Instant::now() < deadline, "no progress");
        std::thread::sleep(Duration::from_millis(50));
    }
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let output = child.wait_with_output().unwrap();
    assert_eq!(output.status.code(), Some(130), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("interrupted at step"),
        "{}",
        stderr(&output)
    );
    let latest = std::fs::read_to_string(dir.path().join("ckpt/latest")).unwrap();
    let steps = metric_count(dir.path());
    assert_eq!(
        latest.trim(),
        format!("step-{steps:08}"),
        "the checkpoint holds every finished step"
    );
}

fn metric_count(dir: &Path) -> usize {
    std::fs::read_to_string(dir.join("metrics.jsonl")).map_or(0, |t| t.lines().count())
}

#[test]
fn bad_runs_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let config = run_file(dir.path(), 1);
    let config = config.to_str().unwrap();
    let cases: &[(&[&str], &str)] = &[
        (
            &["--text", "/nonexistent/corpus.txt"],
            "/nonexistent/corpus.txt",
        ),
        (
            &["--seq", "1000"],
            "sequence length 1000 exceeds the model's max_positions (256)",
        ),
        (
            &["--seq", "1"],
            "training setting `seq`: must be at least 2",
        ),
    ];
    for (extra, expected) in cases {
        let mut args = vec!["train", "--config", config];
        args.extend_from_slice(extra);
        let run = fathom(&args);
        assert!(!run.status.success(), "{extra:?}");
        assert!(
            stderr(&run).contains(expected),
            "{extra:?}: {}",
            stderr(&run)
        );
        assert!(!stderr(&run).contains("panicked"), "{}", stderr(&run));
    }
    let unknown = dir.path().join("unknown.toml");
    std::fs::write(
        &unknown,
        std::fs::read_to_string(config)
            .unwrap()
            .replace("architecture = \"tiny\"", "architecture = \"huge\""),
    )
    .unwrap();
    let run = fathom(&["train", "--config", unknown.to_str().unwrap()]);
    assert!(
        stderr(&run).contains("unknown architecture `huge`; built-in: tiny"),
        "{}",
        stderr(&run)
    );
    let typo = dir.path().join("typo.toml");
    std::fs::write(
        &typo,
        std::fs::read_to_string(config)
            .unwrap()
            .replace("micro_batches", "micro_batch"),
    )
    .unwrap();
    let run = fathom(&["train", "--config", typo.to_str().unwrap()]);
    assert!(
        stderr(&run).contains("unknown field `micro_batch`"),
        "{}",
        stderr(&run)
    );
}

/// `--precision` overrides the run file's GEMM precision (here with Hopper's emulated FP8
/// accumulation), and belongs to the run: a checkpoint written in FP8 is not continued in BF16.
#[test]
fn precision_flag_trains_in_fp8_and_belongs_to_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let config = run_file(dir.path(), 2);
    let config = config.to_str().unwrap();
    let fp8 = fathom(&[
        "train",
        "--config",
        config,
        "--precision",
        "fp8",
        "--accumulation",
        "hopper",
    ]);
    assert!(fp8.status.success(), "{}", stderr(&fp8));
    let lines = metric_lines(dir.path());
    assert_eq!(lines.len(), 2);
    assert!(
        lines
            .iter()
            .all(|l| l["loss"].as_f64().unwrap().is_finite())
    );

    let bf16 = fathom(&[
        "train",
        "--config",
        config,
        "--steps",
        "3",
        "--precision",
        "bf16",
    ]);
    assert!(!bf16.status.success());
    assert!(
        stderr(&bf16).contains("`precision` was"),
        "{}",
        stderr(&bf16)
    );

    let bad = fathom(&["train", "--config", config, "--precision", "fp4"]);
    assert!(!bad.status.success());
    assert!(
        stderr(&bad).contains("unknown precision `fp4`"),
        "{}",
        stderr(&bad)
    );
    let bad = fathom(&["train", "--config", config, "--accumulation", "volta"]);
    assert!(!bad.status.success());
    assert!(
        stderr(&bad).contains("unknown accumulation `volta`"),
        "{}",
        stderr(&bad)
    );
}

/// `--pp 2 --schedule ...`: the pipeline trains, a resumed run may change its pipeline, and a
/// failed rank stops the run with its rank and op named and the last checkpoint intact.
#[test]
fn pipelined_training_runs_resumes_and_reports_a_failed_rank() {
    let dir = tempfile::tempdir().unwrap();
    let config = run_file(dir.path(), 2);
    let config = config.to_str().unwrap();
    let pipelined = [
        "--pp",
        "2",
        "--schedule",
        "dualpipe",
        "--micro-batches",
        "4",
    ];
    let timeline = dir.path().join("timeline.svg");
    let mut args = vec![
        "train",
        "--config",
        config,
        "--timeline",
        timeline.to_str().unwrap(),
    ];
    args.extend(pipelined);
    let run = fathom(&args);
    assert!(run.status.success(), "{}", stderr(&run));
    let text = stderr(&run);
    assert!(
        text.contains("simulated from those costs: makespan"),
        "{text}"
    );
    let svg = std::fs::read_to_string(&timeline).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("rank 1"), "{svg}");
    assert!(
        text.contains("dualpipe pipeline: 2 stages on 2 ranks"),
        "{text}"
    );
    assert!(text.contains("stage 1: layers"), "{text}");
    assert_eq!(metric_lines(dir.path()).len(), 2);

    // The pipeline is not part of what a checkpoint pins: resume on 1F1B.
    let run = fathom(&[
        "train",
        "--config",
        config,
        "--steps",
        "3",
        "--pp",
        "2",
        "--schedule",
        "1f1b",
        "--micro-batches",
        "4",
    ]);
    assert!(run.status.success(), "{}", stderr(&run));
    assert_eq!(metric_lines(dir.path()).len(), 3);

    let checkpoint = dir.path().join("ckpt/latest");
    let before = std::fs::read_to_string(&checkpoint).unwrap();
    let failing = Command::new(env!("CARGO_BIN_EXE_fathom"))
        .args(["train", "--config", config, "--steps", "5"])
        .args(pipelined)
        .env("FATHOM_INJECT_FAULT", "1:4:fail")
        .output()
        .unwrap();
    assert!(!failing.status.success());
    let text = stderr(&failing);
    assert!(text.contains("pipeline rank 1 failed at op 4"), "{text}");
    assert!(text.contains("the last checkpoint in"), "{text}");
    assert_eq!(std::fs::read_to_string(&checkpoint).unwrap(), before);

    // Replicas multiply the global batch: a resumed run keeps them.
    let mut args = vec!["train", "--config", config, "--steps", "5", "--dp", "2"];
    args.extend(pipelined);
    let replicated = fathom(&args);
    assert!(!replicated.status.success());
    assert!(
        stderr(&replicated).contains("`pipeline.data_parallel` was 1, now 2"),
        "{}",
        stderr(&replicated)
    );

    let fresh = dir.path().join("fresh");
    let bad = fathom(&[
        "train",
        "--config",
        config,
        "--checkpoint-dir",
        fresh.to_str().unwrap(),
        "--pp",
        "2",
        "--schedule",
        "dualpipe",
    ]);
    assert!(!bad.status.success());
    assert!(
        stderr(&bad).contains("training setting `pipeline`"),
        "{}",
        stderr(&bad)
    );
}

/// Starts `world` processes of `fathom train ... --launcher env`, as torchrun would (its
/// variables, 127.0.0.1 and a free port), and waits for them all.
fn rank_processes(world: usize, args: &[&str], fault: Option<&str>) -> Vec<Output> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let children: Vec<_> = (0..world)
        .map(|rank| {
            let mut command = Command::new(env!("CARGO_BIN_EXE_fathom"));
            command
                .args(args)
                .args(["--launcher", "env"])
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", port.to_string())
                .env("RANK", rank.to_string())
                .env("LOCAL_RANK", rank.to_string())
                .env("WORLD_SIZE", world.to_string())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            if let Some(fault) = fault {
                command.env("FATHOM_INJECT_FAULT", fault);
            }
            command.spawn().unwrap()
        })
        .collect();
    children
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect()
}

/// The same run with its ranks as threads of one process and as processes of their own, in
/// `dir/threads` and `dir/processes`; returns the seconds each took.
fn threads_and_processes(dir: &Path, config: &str, layout: &[&str], world: usize) -> (f64, f64) {
    let args = |name: &str| -> Vec<String> {
        let mut args: Vec<String> = ["train", "--config", config, "--checkpoint-dir"]
            .map(String::from)
            .into();
        args.push(dir.join(name).join("ckpt").to_str().unwrap().to_owned());
        args.push("--metrics".into());
        args.push(
            dir.join(name)
                .join("metrics.jsonl")
                .to_str()
                .unwrap()
                .to_owned(),
        );
        args.extend(layout.iter().map(|s| (*s).to_owned()));
        args
    };
    let started = Instant::now();
    let threads = args("threads");
    let threads: Vec<&str> = threads.iter().map(String::as_str).collect();
    let run = fathom(&threads);
    assert!(run.status.success(), "{}", stderr(&run));
    let threads_seconds = started.elapsed().as_secs_f64();

    let started = Instant::now();
    let processes = args("processes");
    let processes: Vec<&str> = processes.iter().map(String::as_str).collect();
    let outputs = rank_processes(world, &processes, None);
    let processes_seconds = started.elapsed().as_secs_f64();
    for (rank, out) in outputs.iter().enumerate() {
        assert!(out.status.success(), "rank {rank}: {}", stderr(out));
        // Only rank 0 logs and writes.
        assert_eq!(
            stderr(out).contains("checkpoint:"),
            rank == 0,
            "rank {rank}: {}",
            stderr(out)
        );
    }
    (threads_seconds, processes_seconds)
}

/// Every metric line and the final checkpoint's tensors of two runs, compared bit for bit.
fn assert_same_run(a: &Path, b: &Path, what: &str) {
    let (ma, mb) = (metric_lines(a), metric_lines(b));
    assert_eq!(ma.len(), mb.len(), "{what}: metric lines");
    for (x, y) in ma.iter().zip(&mb) {
        for key in ["step", "loss", "loss_mtp", "grad_norm", "expert_loads"] {
            assert_eq!(x[key], y[key], "{what}: `{key}` at step {}", x["step"]);
        }
    }
    let latest = |dir: &Path| {
        let ckpt = dir.join("ckpt");
        ckpt.join(std::fs::read_to_string(ckpt.join("latest")).unwrap().trim())
    };
    for file in ["model.safetensors", "optimizer.safetensors"] {
        let (x, y) = (
            read_safetensors(&latest(a).join(file)).unwrap(),
            read_safetensors(&latest(b).join(file)).unwrap(),
        );
        assert_eq!(x.len(), y.len(), "{what}: {file}");
        for ((nx, tx), (ny, ty)) in x.iter().zip(y.iter()) {
            assert_eq!(nx, ny, "{what}: {file}");
            assert!(tx == ty, "{what}: {file}: `{nx}` differs");
        }
    }
}

/// `--launcher env`: one process per rank computes bit for bit what the threads compute: a
/// DualPipe pipeline (2 processes, each holding both stages, their optimizer state sharded
/// between them), and a pipeline with two replicas that split the routed experts (4 processes,
/// the expert all-to-alls between processes).
#[test]
fn ranks_as_processes_train_like_ranks_as_threads() {
    let dir = tempfile::tempdir().unwrap();
    let config = run_file(dir.path(), 3);
    let config = config.to_str().unwrap();
    let layouts: [(&[&str], usize); 2] = [
        (
            &[
                "--pp",
                "2",
                "--schedule",
                "dualpipe",
                "--micro-batches",
                "4",
            ],
            2,
        ),
        (
            &[
                "--pp",
                "2",
                "--dp",
                "2",
                "--ep",
                "2",
                "--schedule",
                "1f1b",
                "--micro-batches",
                "2",
            ],
            4,
        ),
    ];
    for (layout, world) in layouts {
        let what = layout.join(" ");
        let here = dir.path().join(format!("world-{world}"));
        let (threads, processes) = threads_and_processes(&here, config, layout, world);
        eprintln!("{what}: threads {threads:.1}s, {world} processes {processes:.1}s");
        assert_same_run(&here.join("threads"), &here.join("processes"), &what);
    }
}

/// A rank process that fails stops the others with an error naming it, instead of a hang; a
/// group of the wrong size and a missing launcher variable are refused, naming them.
#[test]
fn a_failed_rank_process_stops_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let config = run_file(dir.path(), 3);
    let config = config.to_str().unwrap();
    let args = [
        "train",
        "--config",
        config,
        "--pp",
        "2",
        "--schedule",
        "1f1b",
        "--micro-batches",
        "4",
    ];
    let started = Instant::now();
    let outputs = rank_processes(2, &args, Some("1:2:fail"));
    let seconds = started.elapsed().as_secs_f64();
    eprintln!("a failed rank stopped the group in {seconds:.1}s");
    assert!(seconds < 120.0, "took {seconds:.1}s");
    let (rank0, rank1) = (stderr(&outputs[0]), stderr(&outputs[1]));
    assert!(!outputs[0].status.success() && !outputs[1].status.success());
    assert!(rank1.contains("pipeline rank 1 failed at op 2"), "{rank1}");
    assert!(rank1.contains("injected failure"), "{rank1}");
    assert!(rank0.contains("pipeline rank 0 failed"), "{rank0}");
    assert!(
        rank0.contains("rank 1 stopped") || rank0.contains("to rank 1: it has stopped"),
        "{rank0}"
    );
    // Nothing was written before the first checkpoint was due.
    assert!(!dir.path().join("ckpt").join("latest").exists());

    let outputs = rank_processes(3, &args, None);
    for out in &outputs {
        assert!(!out.status.success());
        assert!(
            stderr(out).contains("run on 2 ranks, but the group has 3 processes"),
            "{}",
            stderr(out)
        );
    }
    // On the GPU backend the collectives go over NCCL: without a driver (or libnccl) joining
    // is refused in one line, before any connection is tried.
    if !fathom::runtime::cuda::device::driver_present() {
        let text = std::fs::read_to_string(config).unwrap();
        let cuda = dir.path().join("cuda.toml");
        std::fs::write(
            &cuda,
            text.replace("[train]", "[train]\nbackend = \"cuda\""),
        )
        .unwrap();
        let mut args = args;
        args[2] = cuda.to_str().unwrap();
        let outputs = rank_processes(1, &args, None);
        let text = stderr(&outputs[0]);
        assert!(!outputs[0].status.success());
        assert!(
            text.trim_end()
                .ends_with("rank 0: NCCL: no CUDA driver found (libcuda.so not loadable)"),
            "{text}"
        );
    }
    let lonely = Command::new(env!("CARGO_BIN_EXE_fathom"))
        .args(args)
        .args(["--launcher", "env"])
        .env_remove("MASTER_ADDR")
        .output()
        .unwrap();
    assert!(!lonely.status.success());
    assert!(
        stderr(&lonely).contains("the environment variable MASTER_ADDR is not set"),
        "{}",
        stderr(&lonely)
    );
}

/// `--host-optimizer` keeps the optimizer on the host; the device's (with `backend = "cuda"`
/// on a GPU) writes the same checkpoint byte for byte. Without a GPU both runs fall back to
/// the CPU, whose optimizer is the host's: the flag is taken and changes nothing.
#[test]
fn the_host_optimizer_flag_writes_the_same_checkpoint() {
    let mut checkpoints = Vec::new();
    for flag in [None, Some("--host-optimizer")] {
        let dir = tempfile::tempdir().unwrap();
        let config = run_file(dir.path(), 2);
        let text = std::fs::read_to_string(&config).unwrap();
        std::fs::write(
            &config,
            text.replace("[train]", "[train]\nbackend = \"cuda\""),
        )
        .unwrap();
        let mut args = vec!["train", "--config", config.to_str().unwrap()];
        args.extend(flag);
        let run = fathom(&args);
        assert!(run.status.success(), "{}", stderr(&run));
        let on_gpu = stderr(&run).contains("on the GPU, beside the parameters");
        assert_eq!(
            on_gpu,
            flag.is_none() && fathom::runtime::cuda::device::driver_present(),
            "{}",
            stderr(&run)
        );
        let step = dir.path().join("ckpt/step-00000002");
        let files = ["model.safetensors", "optimizer.safetensors"]
            .map(|name| std::fs::read(step.join(name)).unwrap());
        checkpoints.push(files);
    }
    assert!(checkpoints[0] == checkpoints[1], "the checkpoints differ");
}
