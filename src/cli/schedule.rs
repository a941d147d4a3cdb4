//! `fathom schedule`: a pipeline schedule as a table, its simulated figures beside Table 2 of
//! the DeepSeek-V3 report, and optionally its timeline as SVG.

use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::Context;
use fathom_compiler::pipeline::formula::{activations_formula, bubble_formula, table2};
use fathom_compiler::pipeline::svg::timeline_svg;
use fathom_compiler::pipeline::{Costs, Method, SimReport, generate, simulate};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The schedule: 1f1b, zb1p, dualpipe or dualpipev.
    #[arg(long, value_parser = parse_method)]
    method: Method,
    /// Pipeline stages (Table 2's PP); dualpipev runs them on PP/2 devices.
    #[arg(long)]
    pp: usize,
    /// Micro-batches in one training step.
    #[arg(long)]
    micro_batches: usize,
    /// Time of a forward chunk.
    #[arg(long, default_value_t = 1.0)]
    f: f64,
    /// Time of a full backward chunk (input and weight gradients).
    #[arg(long, default_value_t = 2.0)]
    b: f64,
    /// Time of the weight-gradient part of the backward (at most B).
    #[arg(long, default_value_t = 1.0)]
    w: f64,
    /// Time of an overlapped forward-and-backward pair [default: F+B, no overlap gain].
    #[arg(long)]
    overlap: Option<f64>,
    /// Latency of one transfer between ranks.
    #[arg(long, default_value_t = 0.0)]
    comm: f64,
    /// Write the simulated timeline to this SVG file.
    #[arg(long)]
    svg: Option<PathBuf>,
    /// Print the schedule (every op, transfers included) as JSON instead of the table.
    #[arg(long)]
    json: bool,
}

fn parse_method(text: &str) -> Result<Method, String> {
    text.parse()
        .map_err(|e: fathom_compiler::pipeline::ScheduleError| e.to_string())
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let schedule = generate(args.method, args.pp, args.micro_batches)?;
    let costs = Costs::new(args.f, args.b, args.w)
        .with_overlap(args.overlap.unwrap_or(args.f + args.b))
        .with_comm(args.comm);
    let report = simulate(&schedule, &costs)
        .with_context(|| format!("simulating the {} schedule", args.method))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&schedule)?);
    } else {
        print!("{}", schedule.table());
        println!();
        print!("{}", figures(&report));
    }
    if let Some(path) = &args.svg {
        std::fs::write(path, timeline_svg(&report))
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote the timeline to {}", path.display());
    }
    Ok(())
}

/// Per-rank figures, then the step's beside Table 2.
fn figures(report: &SimReport) -> String {
    let want = table2(report.method, report.pp, &report.costs);
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = writeln!(
        out,
        "{:<6} {:>10} {:>10} {:>17} {:>17}",
        "rank", "busy", "bubble", "peak activations", "parameter copies"
    );
    for (rank, r) in report.ranks.iter().enumerate() {
        let _ = writeln!(
            out,
            "{rank:<6} {:>10} {:>10} {:>17} {:>17}",
            r.busy, r.bubble, r.peak_activations, r.parameter_copies
        );
    }
    let _ = writeln!(out);
    let _ = writeln!(out, "makespan:         {}", report.makespan);
    let _ = writeln!(
        out,
        "bubble:           {} (worst rank); Table 2 {} = {}",
        report.bubble(),
        bubble_formula(report.method),
        want.bubble
    );
    let _ = writeln!(
        out,
        "peak activations: {}; Table 2 {} = {}  (micro-batch activations of one stage)",
        report.peak_activations(),
        activations_formula(report.method),
        want.activations
    );
    let _ = writeln!(
        out,
        "parameters:       {}x; Table 2 {}x  (one stage's parameters)",
        report.parameter_copies(),
        want.parameter_copies
    );
    out
}
