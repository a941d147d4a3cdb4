//! The tuner without a GPU: the policy, the choice of the fastest timing, the file (kept per
//! device, replaced when damaged, written by rename), and the whole choice with a fake timer.

#![allow(clippy::unwrap_used)]

use fathom_kernels::{BScaling, GemmProblem};

use super::*;

fn form(m: u32, n: u32, k: u32) -> GemmForm {
    GemmForm {
        problem: GemmProblem { m, n, k, groups: 1 },
        b_scaling: BScaling::Block128x128,
        output: GemmOutput::Bf16,
        grouping: GemmGrouping::Dense,
    }
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("fathom-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

#[test]
fn the_policy_reads_the_environment_value() {
    assert_eq!(TuningPolicy::parse(None), Ok(TuningPolicy::Off));
    assert_eq!(TuningPolicy::parse(Some("large")), Ok(TuningPolicy::Large));
    assert_eq!(TuningPolicy::parse(Some("all")), Ok(TuningPolicy::All));
    assert_eq!(TuningPolicy::parse(Some("off")), Ok(TuningPolicy::Off));
    let error = TuningPolicy::parse(Some("fast")).unwrap_err();
    assert!(error.contains("FATHOM_GEMM_TUNING=fast"), "{error}");
    // DeepSeek-V3's 4096 × 2112 × 7168 is large; the tiny model's products are not.
    assert!(TuningPolicy::Large.takes(&form(4096, 2112, 7168)));
    assert!(!TuningPolicy::Large.takes(&form(64, 32, 128)));
    assert!(TuningPolicy::All.takes(&form(64, 32, 128)));
    assert!(!TuningPolicy::Off.takes(&form(4096, 2112, 7168)));
}

#[test]
fn the_fastest_timing_wins_and_the_default_is_reported() {
    let f = form(4096, 2112, 7168);
    let candidates = f.candidates();
    let default = f.default_params();
    let timing = |params: Fp8GemmParams, band, tflops| Timing {
        params,
        persistent_band: band,
        tflops,
    };
    let timings = [
        timing(default, None, 700.0),
        timing(default, Some(8), 800.0),
        timing(candidates[1], Some(1), 900.0),
        timing(candidates[1], Some(16), f64::NAN),
    ];
    let tuned = fastest(&timings, &default).unwrap();
    assert_eq!(tuned.kernel, candidates[1].name());
    assert_eq!(
        (tuned.persistent_band, tuned.tflops, tuned.default_tflops),
        (Some(1), 900.0, 700.0)
    );
    assert_eq!(fastest(&[], &default), None);
    let choice = tuned.choice(&f, |_| 132).unwrap();
    assert_eq!(choice.params, candidates[1]);
    assert_eq!(choice.schedule, TileSchedule::persistent(132, 1));
    // A kernel no candidate is any more: timed again.
    let stale = TunedGemm {
        kernel: "fp8_gemm_gone".into(),
        ..tuned
    };
    assert_eq!(stale.choice(&f, |_| 132), None);
}

#[test]
fn the_file_keeps_one_devices_timings_and_survives_damage() {
    let dir = temp_dir("gemm-tuning");
    let path = GemmTuning::path_in(&dir, "sm_90a");
    let f = form(4096, 2112, 7168);
    let tuned = TunedGemm {
        kernel: f.default_params().name(),
        persistent_band: Some(8),
        tflops: 900.0,
        default_tflops: 700.0,
    };
    let mut tuning = GemmTuning::open(&path, "NVIDIA H200");
    assert_eq!(tuning.get(&f), None);
    tuning.insert(&f, tuned.clone());
    tuning.save().unwrap();
    assert!(path.exists());
    // No temporary file is left beside it.
    let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");
    assert_eq!(GemmTuning::open(&path, "NVIDIA H200").get(&f), Some(&tuned));
    // Another device's timings are not used.
    assert_eq!(GemmTuning::open(&path, "NVIDIA H100").get(&f), None);
    // A damaged file reads as empty and is replaced on the next save.
    std::fs::write(&path, "{ not json").unwrap();
    let mut damaged = GemmTuning::open(&path, "NVIDIA H200");
    assert_eq!(damaged.get(&f), None);
    damaged.insert(&f, tuned.clone());
    damaged.save().unwrap();
    assert_eq!(GemmTuning::open(&path, "NVIDIA H200").get(&f), Some(&tuned));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The whole choice with a fake timer: large forms are timed once (every candidate under every
/// schedule) and chosen; the second time the file answers without timing; small forms keep the
/// heuristic's tile; a candidate that cannot run is skipped.
#[test]
fn large_forms_are_timed_once_and_chosen() {
    let dir = temp_dir("gemm-choose");
    let path = GemmTuning::path_in(&dir, "sm_90a");
    let (large, small) = (form(4096, 2112, 7168), form(64, 32, 128));
    let forms = [large, small];
    let wanted = large.candidates()[2];
    let mut calls = 0;
    // The wanted candidate in bands of 8 is fastest; the first candidate cannot run.
    let mut time = |f: &GemmForm, p: &Fp8GemmParams, band: Option<u32>| {
        calls += 1;
        assert_eq!(*f, large);
        if *p == large.candidates()[0] {
            return None;
        }
        Some(if *p == wanted && band == Some(8) {
            1.0
        } else {
            2.0
        })
    };
    let mut tuning = GemmTuning::open(&path, "GPU");
    let choices = choose(&forms, TuningPolicy::Large, &mut tuning, &mut time, |_| 132);
    assert_eq!(
        calls,
        large.candidates().len() * (1 + PERSISTENT_BANDS.len())
    );
    assert_eq!(choices.len(), 1);
    assert_eq!(
        choices[&large],
        GemmChoice {
            params: wanted,
            schedule: TileSchedule::persistent(132, 8)
        }
    );
    tuning.save().unwrap();
    let mut again = GemmTuning::open(&path, "GPU");
    let mut untimed = |_: &GemmForm, _: &Fp8GemmParams, _: Option<u32>| -> Option<f64> {
        panic!("the file has this form's choice")
    };
    let from_file = choose(
        &forms,
        TuningPolicy::Large,
        &mut again,
        &mut untimed,
        |_| 132,
    );
    assert_eq!(from_file, choices);
    let off = choose(&forms, TuningPolicy::Off, &mut again, &mut untimed, |_| 132);
    assert!(off.is_empty());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn timing_operands_cover_every_form() {
    let mut seed = 1;
    let dense = form(256, 160, 384);
    let ops = TimingOperands::of(&dense, &mut seed);
    assert_eq!((ops.a.len(), ops.b.len()), (256 * 384, 160 * 384));
    assert_eq!((ops.scale_a.len(), ops.scale_b.len()), (3 * 256, 2 * 3));
    assert_eq!(ops.out_bytes, 256 * 160 * 2);
    assert!(ops.block_expert.is_empty() && ops.out_rows.is_empty() && ops.k_offsets.is_empty());
    // No NaN codes (E4M3's are 0x7f and 0xff).
    assert!(ops.a.iter().chain(&ops.b).all(|c| c & 0x7f != 0x7f));
    let k_grouped = GemmForm {
        problem: GemmProblem {
            m: 256,
            n: 128,
            k: 1024,
            groups: 4,
        },
        b_scaling: BScaling::Row1x128,
        output: GemmOutput::F32,
        grouping: GemmGrouping::KGrouped,
    };
    let ops = TimingOperands::of(&k_grouped, &mut seed);
    assert_eq!(ops.k_offsets, [0, 256, 512, 768, 1024]);
    assert_eq!((ops.b.len(), ops.scale_b.len()), (128 * 1024, 8 * 128));
    assert_eq!(ops.out_bytes, 4 * 256 * 128 * 4);
    let grouped = GemmForm {
        problem: GemmProblem {
            m: 1000,
            n: 64,
            k: 128,
            groups: 8,
        },
        output: GemmOutput::F32Scattered,
        grouping: GemmGrouping::Contiguous,
        ..dense
    };
    let ops = TimingOperands::of(&grouped, &mut seed);
    assert_eq!(ops.block_expert, [0, 1, 2, 3, 4, 5, 6, 7]);
    assert_eq!((ops.out_rows.len(), ops.b.len()), (1000, 8 * 64 * 128));
}
