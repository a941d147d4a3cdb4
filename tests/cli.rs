//! The `fathom` binary end to end: init, forward, graph, and its errors.

#![allow(clippy::unwrap_used)] // test helpers fail loudly by design

use std::path::Path;
use std::process::{Command, Output};

use fathom::runtime::pretrained::Pretrained;
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

fn repo(path: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(path)
        .display()
        .to_string()
}

#[test]
fn init_then_forward_writes_the_interpreters_logits() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    let model = model.to_str().unwrap();
    let config = repo("tests/fixtures/shared2_dense2/config.json");
    let init = fathom(&["init", "--config", &config, "--seed", "3", "--out", model]);
    assert!(init.status.success(), "{}", stderr(&init));

    let out = dir.path().join("logits.safetensors");
    let out = out.to_str().unwrap();
    let run = fathom(&[
        "forward", "--model", model, "--tokens", "5,17,42", "--tokens", "1,2,3", "--out", out,
    ]);
    assert!(run.status.success(), "{}", stderr(&run));
    let written = read_safetensors(Path::new(out)).unwrap();
    assert_eq!(written.len(), 1, "only `logits`");
    let logits = written.get("logits").unwrap();
    assert_eq!(logits.dims(), [2, 3, 64]);

    let loaded = Pretrained::load(Path::new(model)).unwrap();
    let expected = loaded.logits(&[vec![5, 17, 42], vec![1, 2, 3]]).unwrap();
    assert_eq!(
        logits.as_f32(),
        expected.as_f32(),
        "bit-identical to the library call"
    );

    let again = dir.path().join("again");
    let again = again.to_str().unwrap();
    assert!(
        fathom(&["init", "--config", &config, "--seed", "3", "--out", again])
            .status
            .success()
    );
    let a = std::fs::read(Path::new(model).join("model.safetensors")).unwrap();
    let b = std::fs::read(Path::new(again).join("model.safetensors")).unwrap();
    assert!(a == b, "the same seed writes the same bytes");
}

#[test]
fn the_671b_summary_prints_hugging_faces_count() {
    let config = repo("examples/configs/deepseek-v3-671b.json");
    let run = fathom(&["graph", "--config", &config, "--summary"]);
    assert!(run.status.success(), "{}", stderr(&run));
    let text = String::from_utf8(run.stdout).unwrap();
    assert!(
        text.contains("parameters (main model):       671,026,404,352"),
        "{text}"
    );
    assert!(text.contains("activated per token:"), "{text}");
}

#[test]
fn graph_prints_one_line_per_node() {
    let model = repo("tests/fixtures/no_q_lora");
    let run = fathom(&["graph", "--model", &model, "--seq", "3"]);
    assert!(run.status.success(), "{}", stderr(&run));
    let text = String::from_utf8(run.stdout).unwrap();
    assert!(text.starts_with("graph deepseek_v3 {"));
    assert!(text.contains("= param \"model.layers.0.self_attn.q_proj.weight\""));
    assert!(text.contains("output \"logits\""));
}

#[test]
fn bad_input_is_a_clear_error_and_a_failure_status() {
    let model = repo("tests/fixtures/moe_grouped");
    let cases: &[(&[&str], &str)] = &[
        (
            &[
                "forward",
                "--model",
                &model,
                "--tokens",
                "1,2,64",
                "--out",
                "/dev/null",
            ],
            "row 0, position 2: token 64 is outside the vocabulary 0..64",
        ),
        (
            &[
                "forward",
                "--model",
                &model,
                "--tokens",
                "1,2",
                "--tokens",
                "3",
                "--out",
                "/dev/null",
            ],
            "rows must have equal length",
        ),
        (
            &[
                "forward",
                "--model",
                "/nonexistent/model",
                "--tokens",
                "1",
                "--out",
                "/dev/null",
            ],
            "cannot read /nonexistent/model/config.json",
        ),
        (
            &[
                "forward",
                "--model",
                &model,
                "--tokens",
                "1,two",
                "--out",
                "/dev/null",
            ],
            "`two` is not a token id",
        ),
        (&["graph"], "give the model as --model DIR or --config FILE"),
    ];
    for (args, expected) in cases {
        let run = fathom(args);
        assert!(!run.status.success(), "{args:?} succeeded");
        let message = stderr(&run);
        assert!(message.contains(expected), "{args:?}: {message}");
        assert!(!message.contains("panicked"), "{args:?}: {message}");
    }
}

#[test]
fn a_checkpoint_that_does_not_match_its_config_names_every_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let source = repo("tests/fixtures/moe_grouped");
    {
        let file = "model.safetensors";
        std::fs::copy(Path::new(&source).join(file), dir.path().join(file)).unwrap();
    }
    let config = std::fs::read_to_string(Path::new(&source).join("config.json")).unwrap();
    let config = config.replace("\"kv_lora_rank\": 16", "\"kv_lora_rank\": 12");
    std::fs::write(dir.path().join("config.json"), config).unwrap();
    let model = dir.path().to_str().unwrap();
    let run = fathom(&[
        "forward",
        "--model",
        model,
        "--tokens",
        "1",
        "--out",
        "/dev/null",
    ]);
    let message = stderr(&run);
    assert!(!run.status.success());
    assert!(
        message.contains("wrong shape: model.layers.0.self_attn.kv_a_layernorm.weight is [16] in the checkpoint, the model expects [12]"),
        "{message}"
    );
}

#[test]
fn fathom_dump_dir_receives_every_compilation_artifact() {
    let dump = tempfile::tempdir().unwrap();
    let out = dump.path().join("logits.safetensors");
    let run = Command::new(env!("CARGO_BIN_EXE_fathom"))
        .args([
            "forward",
            "--model",
            &repo("tests/fixtures/yarn"),
            "--tokens",
            "1,2,3",
        ])
        .args(["--out", out.to_str().unwrap()])
        .env("FATHOM_DUMP_DIR", dump.path())
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", stderr(&run));
    for file in [
        "00-input.graph.txt",
        "10-fusion-groups.txt",
        "11-kernels.txt",
        "12-memory-plan.txt",
        "13-timings.txt",
        "14-traffic.txt",
    ] {
        // One directory per compiled program, named after it.
        let text = std::fs::read_to_string(dump.path().join("deepseek_v3").join(file))
            .unwrap_or_else(|e| panic!("{file}: {e}"));
        assert!(!text.is_empty(), "{file} is empty");
    }
}

/// `fathom inspect` of the tiny model's training step at `batch` × `seq` tokens.
fn inspect_tiny_training(batch: &'static str, seq: &'static str) -> Vec<&'static str> {
    vec![
        "inspect",
        "--architecture",
        "tiny",
        "--train",
        "--batch",
        batch,
        "--seq",
        seq,
    ]
}

#[test]
fn inspect_shows_the_kernels_a_precision_policy_leaves() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().to_str().unwrap();
    let args = inspect_tiny_training("1", "4");
    let run = fathom(&[&args[..], &["--precision", "bf16", "--out", out]].concat());
    assert!(run.status.success(), "{}", stderr(&run));
    let kernels = std::fs::read_to_string(dir.path().join("11-kernels.txt")).unwrap();
    assert!(kernels.contains(", bf16 operands"), "{kernels}");
    let run = fathom(&[&args[..], &["--precision", "fp4", "--out", out]].concat());
    assert!(!run.status.success());
    assert!(stderr(&run).contains("fp4"), "{}", stderr(&run));
}

/// With FP8 operands and Hopper's accumulation, `library-plan.txt` shows the Linear products
/// running as `quantize` + the FP8 GEMM of the target, and says why the others run in f32.
#[test]
fn inspect_shows_which_products_run_as_fp8_gemms() {
    let dir = tempfile::tempdir().unwrap();
    let mut args = inspect_tiny_training("2", "32");
    args.extend(["--precision", "fp8", "--accumulation", "hopper"]);
    for (target, gemm) in [
        ("sm_90a", "fp8_gemm_1x128_128x128_"),
        ("sm_80", "fp8_gemm_fallback_1x128_128x128_"),
    ] {
        let out = dir.path().join(target);
        let targeted = ["--target", target, "--out", out.to_str().unwrap()];
        let run = fathom(&[&args[..], &targeted[..]].concat());
        assert!(run.status.success(), "{}", stderr(&run));
        let plan = std::fs::read_to_string(out.join("cuda").join("library-plan.txt")).unwrap();
        // Every template instantiation the plan launches is there to read or hand-edit.
        let gemm_source = std::fs::read_dir(out.join("cuda"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .find(|name| name.starts_with(gemm) && name.ends_with(".cu"));
        let gemm_source = gemm_source.unwrap_or_else(|| panic!("no {gemm}*.cu"));
        let text = std::fs::read_to_string(out.join("cuda").join(&gemm_source)).unwrap();
        assert!(text.contains("extern \"C\" __global__"), "{text}");
        assert!(plan.contains("quantize_1x128_f32_e4m3"), "{plan}");
        assert!(plan.contains(gemm), "{target}: {plan}");
        // The weights' codes are made once before the calls, which read them.
        assert!(plan.starts_with("weight codes (bytes+"), "{plan}");
        assert!(plan.contains("(reads the weight codes of b"), "{plan}");
        let said = String::from_utf8_lossy(&run.stdout);
        assert!(said.contains("FP8 quantisations of weights"), "{said}");
        // The activations' roundings the products quantise again are skipped: their sources
        // are quantised where read.
        assert!(
            plan.contains("whose quantize steps read its source"),
            "{plan}"
        );
        assert!(
            said.contains(&format!("temporaries on {target}: ")),
            "{said}"
        );
        assert!(
            said.contains(" skipped (their sources quantised where read)"),
            "{said}"
        );
        // The saved inputs of the forward's products are kept as E4M3 codes, which the
        // products and the weight gradients read.
        assert!(plan.contains("(keeps E4M3 codes and scales in b"), "{plan}");
        assert!(plan.contains(": its GEMM reads them)"), "{plan}");
        assert!(plan.contains(": quantised again from them)"), "{plan}");
        assert!(!said.contains(" 0 kept as codes"), "{said}");
        assert!(
            said.contains(&format!("products never stored on {target}: ")),
            "{said}"
        );
        assert!(!said.contains(": 0 loop nests"), "{said}");
        assert!(
            plan.contains("which multiply its factors as they read them)"),
            "{plan}"
        );
        assert!(said.contains("loop nests: "), "{said}");
        // The experts' weights are fed into their stacks and their gradients read in place.
        let experts = said
            .lines()
            .find(|l| l.starts_with("experts without copies: "));
        let experts = experts.unwrap_or_else(|| panic!("{said}"));
        assert!(
            !experts.contains(": 0 stacks") && !experts.contains(", 0 gradients"),
            "{experts}"
        );
        // The experts' products too, in DeepGEMM's padded layout, and their weight gradients
        // K-grouped over it: no product is left in f32.
        assert!(
            plan.contains(&format!("grouped_{gemm}")),
            "{target}: {plan}"
        );
        let k_grouped = gemm.replace("128x128_", "1x128_");
        assert!(
            plan.contains(&format!("kgrouped_{k_grouped}")),
            "{target}: {plan}"
        );
        assert!(plan.contains("index_pad_groups"), "{plan}");
        assert!(!plan.contains("(f32 GEMM:"), "{plan}");
        assert!(
            String::from_utf8_lossy(&run.stdout).contains("FP8 GEMMs"),
            "{}",
            String::from_utf8_lossy(&run.stdout)
        );
    }
}

#[test]
fn inspect_compiles_a_hand_edited_kernel_from_the_override_folder() {
    let nvrtc = fathom::kernels::nvrtc::nvrtc_unless_skipped().unwrap_or_else(|e| {
        panic!("{e}\n(set FATHOM_SKIP_NVRTC=1 to skip the CUDA compile checks explicitly)")
    });
    if nvrtc.is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let generated = dir.path().join("generated");
    let model = ["inspect", "--architecture", "tiny", "--target", "sm_90a"];
    let run = fathom(&[&model[..], &["--out", generated.to_str().unwrap()]].concat());
    assert!(run.status.success(), "{}", stderr(&run));

    // The user's workflow: copy one generated kernel into a folder and edit it.
    let cuda = generated.join("cuda");
    let mut sources: Vec<_> = std::fs::read_dir(&cuda)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "cu"))
        .collect();
    sources.sort();
    let original = &sources[0];
    let entry = original.file_stem().unwrap().to_str().unwrap().to_owned();
    let edits = dir.path().join("edits");
    std::fs::create_dir(&edits).unwrap();
    let text = std::fs::read_to_string(original).unwrap();
    let edited = format!("// edited by hand\n__device__ int fathom_edit_marker;\n{text}");
    std::fs::write(edits.join(format!("{entry}.cu")), edited).unwrap();

    let out = dir.path().join("compiled");
    let run = Command::new(env!("CARGO_BIN_EXE_fathom"))
        .args(model)
        .args(["--compile", "--out", out.to_str().unwrap()])
        .env("FATHOM_KERNEL_OVERRIDE_DIR", &edits)
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", stderr(&run));
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        stdout.contains(&format!("{entry}: compiled from the hand-edited ")),
        "{stdout}"
    );
    let resources = std::fs::read_to_string(out.join("cuda/resources.txt")).unwrap();
    assert_eq!(resources.matches("(edited)").count(), 1, "{resources}");
    assert!(
        resources.contains(&format!("{entry} (edited)")),
        "{resources}"
    );
}

/// `bench --backend cuda` times the GPU, or says in one line that the CPU runs instead and
/// reports the backend that ran; an unknown backend is refused by name.
#[test]
fn bench_reports_the_backend_that_ran() {
    let config = repo("benches/configs/small.json");
    let args = [
        "bench", "--config", &config, "--batch", "1", "--seq", "16", "--steps", "1", "--json",
    ];
    let run = fathom(&[&args[..], &["--backend", "cuda"]].concat());
    assert!(run.status.success(), "{}", stderr(&run));
    let report: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
    let ran = report["backend"].as_str().unwrap();
    assert!(
        ran == "cuda" || stderr(&run).contains("running on the CPU"),
        "{ran}"
    );
    let run = fathom(&[&args[..], &["--backend", "gpu"]].concat());
    assert!(!run.status.success());
    assert!(
        stderr(&run).contains("unknown backend `gpu`"),
        "{}",
        stderr(&run)
    );
}
