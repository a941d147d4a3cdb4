//! `fathom schedule` end to end: a DualPipe schedule with its figures and SVG, and a bad setting.

#![allow(clippy::unwrap_used)] // test helpers fail loudly by design

use std::process::{Command, Output};

fn fathom(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fathom"))
        .args(args)
        .output()
        .expect("the binary runs")
}

#[test]
fn dualpipe_prints_its_table_figures_and_writes_the_svg() {
    let dir = tempfile::tempdir().unwrap();
    let svg = dir.path().join("dualpipe.svg");
    let out = fathom(&[
        "schedule",
        "--method",
        "dualpipe",
        "--pp",
        "8",
        "--micro-batches",
        "20",
        "--overlap",
        "2.5",
        "--svg",
        svg.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(
        stdout.starts_with("dualpipe schedule: PP=8 on 8 ranks, 20 micro-batches\n"),
        "{stdout}"
    );
    // Rank 0 runs PP forwards, then its first split backward of the other stream (micro-batch 10).
    assert!(
        stdout.contains("rank 0 | F0    F1    F2    F3    F4    F5    F6    F10   B10   W10"),
        "{stdout}"
    );
    assert!(
        stdout.contains("bubble:           4.5 (worst rank); Table 2 (PP/2-1)(F&B+B-3W) = 4.5"),
        "{stdout}"
    );
    assert!(
        stdout.contains("peak activations: 9; Table 2 PP+1 = 9"),
        "{stdout}"
    );
    assert!(
        stdout.contains("parameters:       2x; Table 2 2x"),
        "{stdout}"
    );
    let picture = std::fs::read_to_string(&svg).unwrap();
    assert!(picture.starts_with("<svg") && picture.ends_with("</svg>\n"));
    assert!(picture.contains("overlapped forward &amp; backward"));
}

#[test]
fn an_odd_pp_for_dualpipe_is_a_clear_error() {
    let out = fathom(&[
        "schedule",
        "--method",
        "dualpipe",
        "--pp",
        "7",
        "--micro-batches",
        "28",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        stderr.trim_end(),
        "error: dualpipe: `pp` = 7, but dualpipe needs an even number of stages"
    );
}
