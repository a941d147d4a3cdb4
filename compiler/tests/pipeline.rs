//! Pipeline schedules against Table 2 of the DeepSeek-V3 report, the reference step counts of
//! deepseek-ai/DualPipe, and the simulator's own checks.
//!
//! Definitions (also in `pipeline::simulate`):
//! - B is the *full* backward of a chunk and W its weight-gradient part, as in Table 2; a split
//!   backward runs an input-gradient pass of B−W and a W pass of W. F&B is one overlapped
//!   forward-and-backward pair (F+B when overlapping gains nothing).
//! - A rank's bubble is the part of the step (time 0 to the last rank's end) it does not compute;
//!   Table 2's bubble is that of the worst rank. For 1F1B, ZB1P and DualPipe without overlap gain
//!   every rank computes the same, so every rank's bubble equals it.
//! - Activations: micro-batch stage activations held from the start of a chunk's forward to the
//!   end of its full backward or its W; Table 2's figure is the peak of the worst rank.
//! - Parameters: distinct stages a rank runs.
//!
//! When the formulas hold exactly (found by sweeping integer costs, and pinned below):
//! 1F1B always; ZB1P when W ≤ F and W ≤ B−W (the deferred W passes fit the gaps they fill);
//! DualPipe and DualPipeV when B−W = F (the input-gradient pass lasts as long as the forward,
//! as in the report's figure), W ≤ F and B ≤ F&B ≤ F+B.

use fathom_compiler::pipeline::formula::table2;
use fathom_compiler::pipeline::svg::timeline_svg;
use fathom_compiler::pipeline::{
    Chunk, Costs, Method, ScheduleError, ScheduleOp, SimError, generate, simulate,
};

/// (PP, micro-batches) settings each method is held to Table 2 at.
fn settings(method: Method) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    for pp in [4, 8, 16] {
        let counts = match method {
            Method::OneFOneB | Method::Zb1p => vec![pp, 2 * pp, 3 * pp],
            Method::DualPipe => vec![2 * pp, 3 * pp, 2 * pp + 2],
            // DualPipeV needs 2·devices = PP micro-batches, odd counts included.
            Method::DualPipeV => vec![pp, pp + 1, 2 * pp, 3 * pp],
        };
        out.extend(counts.into_iter().map(|mb| (pp, mb)));
    }
    out.push((8, 20)); // the report's figure 5
    out
}

/// Costs under which the formulas are exact (see the module comment).
fn exact_costs() -> Vec<Costs> {
    vec![
        Costs::new(1.0, 2.0, 1.0), // F = B−W = W: the report's figure
        Costs::new(1.0, 2.0, 1.0).with_overlap(2.5), // some overlap gain
        Costs::new(1.0, 2.0, 1.0).with_overlap(2.0), // the forward hidden entirely
        Costs::new(2.0, 3.0, 1.0).with_overlap(4.0), // W < F
        Costs::new(3.0, 3.0, 0.0), // no weight gradients to defer
    ]
}

#[test]
fn table_2_bubbles_activations_and_parameters_come_out_exactly() {
    let mut rows = Vec::new();
    for method in Method::ALL {
        for (pp, mb) in settings(method) {
            for costs in exact_costs() {
                let schedule = generate(method, pp, mb).unwrap();
                let report = simulate(&schedule, &costs).unwrap();
                let want = table2(method, pp, &costs);
                let setting = format!("{method} PP={pp} mb={mb} {costs:?}");
                assert_eq!(report.bubble(), want.bubble, "bubble of {setting}");
                assert_eq!(report.peak_activations(), want.activations, "{setting}");
                assert_eq!(
                    report.parameter_copies(),
                    want.parameter_copies,
                    "{setting}"
                );
                if costs.f_and_b == costs.f + costs.b {
                    for (rank, r) in report.ranks.iter().enumerate() {
                        assert_eq!(r.bubble, want.bubble, "rank {rank} of {setting}");
                    }
                }
                if costs == Costs::new(1.0, 2.0, 1.0) && mb == 2 * pp {
                    rows.push(format!(
                        "{:<9} PP={:<2} mb={:<2} bubble {:>3} (formula {:>3}), makespan {:>3}, \
                         activations {:>2} (formula {:>2}), parameters {}x",
                        method.name(),
                        pp,
                        mb,
                        report.bubble(),
                        want.bubble,
                        report.makespan,
                        report.peak_activations(),
                        want.activations,
                        report.parameter_copies()
                    ));
                }
            }
        }
    }
    insta::assert_snapshot!(rows.join("\n"));
}

#[test]
fn with_overlap_gain_the_middle_ranks_carry_the_dualpipe_bubble() {
    // Outer ranks run fewer overlapped pairs, so they compute longer and idle less; the formula
    // is the bubble of the two middle ranks.
    let costs = Costs::new(1.0, 2.0, 1.0).with_overlap(2.5);
    let report = simulate(&generate(Method::DualPipe, 8, 20).unwrap(), &costs).unwrap();
    let bubbles: Vec<f64> = report.ranks.iter().map(|r| r.bubble).collect();
    assert_eq!(bubbles, [3.5, 4.0, 4.5, 4.5, 4.5, 4.5, 4.0, 3.5]);
    assert_eq!(table2(Method::DualPipe, 8, &costs).bubble, 4.5);
}

#[test]
fn outside_their_assumptions_the_formulas_are_estimates() {
    // Pinned so that a change in the schedules shows here. The input-gradient pass longer than
    // the forward: DualPipe does one unit better than the formula.
    let costs = Costs::new(1.0, 3.0, 1.0);
    let dualpipe = simulate(&generate(Method::DualPipe, 8, 20).unwrap(), &costs).unwrap();
    assert_eq!(
        (
            dualpipe.bubble(),
            table2(Method::DualPipe, 8, &costs).bubble
        ),
        (11.0, 12.0)
    );
    // W longer than F: ZB1P's deferred W passes no longer fit the gaps.
    let costs = Costs::new(1.0, 4.0, 2.0);
    let zb1p = simulate(&generate(Method::Zb1p, 8, 20).unwrap(), &costs).unwrap();
    assert_eq!(
        (zb1p.bubble(), table2(Method::Zb1p, 8, &costs).bubble),
        (14.0, 7.0)
    );
}

#[test]
fn dualpipe_ranks_follow_the_reference_step_counts() {
    // SPEC §3 / dualpipe.py, with h = min(r, PP-1-r), H = PP/2, N = micro-batches/2:
    // steps 1-2 are 2(H-h-1) + 2(h+1) = PP forwards; overlapped pairs are two per main step
    // (N-PP+h+1 of them) plus one per B1F1B0 step (H-h-1), less the middle ranks' first pair,
    // which runs unoverlapped; split backwards (each with its W) come from steps 3, 6 and 7;
    // step 8 ends with h+1 W passes.
    for (pp, mb) in [(4, 8), (8, 20), (16, 32)] {
        let schedule = generate(Method::DualPipe, pp, mb).unwrap();
        let (half, n) = (pp / 2, mb / 2);
        for (r, ops) in schedule.ranks.iter().enumerate() {
            let h = r.min(pp - 1 - r);
            let compute: Vec<&ScheduleOp> = ops.iter().filter(|op| op.is_compute()).collect();
            let leading = compute
                .iter()
                .take_while(|op| matches!(op, ScheduleOp::F(_)))
                .count();
            let count =
                |want: fn(&ScheduleOp) -> bool| compute.iter().filter(|op| want(op)).count();
            let pairs = count(|op| matches!(op, ScheduleOp::FB { .. }));
            let weights = count(|op| matches!(op, ScheduleOp::W(_)));
            let trailing = compute
                .iter()
                .rev()
                .take_while(|op| matches!(op, ScheduleOp::W(_)))
                .count();
            let middle = usize::from(h + 1 == half);
            // The middle ranks' unoverlapped first pair adds its forward to the leading run.
            assert_eq!(leading, pp + middle, "rank {r}");
            assert_eq!(
                pairs,
                2 * (n - pp + h + 1) + (half - h - 1) - middle,
                "rank {r}"
            );
            assert_eq!(weights, 2 * (half - h - 1) + (h + 1), "rank {r}");
            assert_eq!(trailing, h + 1, "rank {r}");
        }
    }
}

#[test]
fn every_schedule_passes_the_checks_for_many_settings() {
    let costs = [
        Costs::new(1.0, 2.0, 1.0),
        Costs::new(1.0, 2.0, 1.0).with_comm(0.25),
        Costs::new(1.5, 2.5, 0.5).with_overlap(3.0).with_comm(1.0),
    ];
    let mut checked = 0;
    for method in Method::ALL {
        for pp in 2..=16 {
            // The fewest micro-batches the method takes, a few above (odd and even), and more.
            let Some(least) = (1..=4 * pp).find(|&mb| generate(method, pp, mb).is_ok()) else {
                continue; // an odd PP for DualPipe and DualPipeV
            };
            for mb in [least, least + 1, least + 2, least + 5, 2 * least + 3] {
                let Ok(schedule) = generate(method, pp, mb) else {
                    continue; // an odd count for DualPipe
                };
                for c in &costs {
                    let report = simulate(&schedule, c).unwrap_or_else(|e| {
                        panic!("{method} PP={pp} mb={mb} {c:?}: {e}");
                    });
                    let ops: usize = schedule.ranks.iter().map(Vec::len).sum();
                    assert!(report.makespan > 0.0 && ops > 0);
                    checked += 1;
                }
            }
        }
    }
    assert!(checked > 500, "only {checked} settings checked");
}

#[test]
fn impossible_settings_name_the_setting() {
    let message = |method, pp, mb| generate(method, pp, mb).unwrap_err().to_string();
    assert_eq!(
        message(Method::DualPipe, 7, 28),
        "dualpipe: `pp` = 7, but dualpipe needs an even number of stages"
    );
    assert_eq!(
        message(Method::DualPipe, 8, 21),
        "dualpipe: `micro-batches` = 21, but dualpipe needs an even number of micro-batches \
         (half enter from each end)"
    );
    assert_eq!(
        message(Method::DualPipe, 8, 14),
        "dualpipe: `micro-batches` = 14, but dualpipe needs at least 2·PP = 16 micro-batches"
    );
    assert_eq!(
        message(Method::DualPipeV, 8, 7),
        "dualpipev: `micro-batches` = 7, but dualpipev needs at least 2·devices = PP = 8 \
         micro-batches"
    );
    assert_eq!(
        message(Method::OneFOneB, 1, 4),
        "1f1b: `pp` = 1, but 1f1b needs at least 2 pipeline stages"
    );
    assert_eq!(
        message(Method::Zb1p, 4, 3),
        "zb1p: `micro-batches` = 3, but zb1p needs at least PP = 4 micro-batches"
    );
    assert_eq!(
        "gpipe".parse::<Method>().unwrap_err(),
        ScheduleError::UnknownMethod("gpipe".into())
    );
    assert_eq!("DualPipeV".parse::<Method>().unwrap(), Method::DualPipeV);
}

#[test]
fn a_dropped_receive_is_a_deadlock_naming_the_rank_and_op() {
    let mut schedule = generate(Method::OneFOneB, 4, 8).unwrap();
    let at = schedule.ranks[2]
        .iter()
        .position(|op| matches!(op, ScheduleOp::Recv { .. }))
        .unwrap();
    schedule.ranks[2].remove(at);
    let err = simulate(&schedule, &Costs::default()).unwrap_err();
    let SimError::Deadlock { stuck } = &err else {
        panic!("expected a deadlock, got {err}");
    };
    // Rank 2 cannot start its first forward; the others wait for what it would have sent.
    let rank_2 = stuck.iter().find(|s| s.rank == 2).unwrap();
    assert_eq!(rank_2.index, at);
    assert_eq!(rank_2.op, ScheduleOp::F(Chunk::new(0, 2)));
    assert_eq!(
        stuck.iter().map(|s| s.rank).collect::<Vec<_>>(),
        [0, 1, 2, 3]
    );
    insta::assert_snapshot!(err.to_string());
}

#[test]
fn a_dropped_send_and_a_missing_w_are_reported() {
    let mut schedule = generate(Method::DualPipe, 4, 8).unwrap();
    let at = schedule.ranks[1]
        .iter()
        .position(|op| matches!(op, ScheduleOp::Send { .. }))
        .unwrap();
    let dropped = schedule.ranks[1].remove(at);
    let err = simulate(&schedule, &Costs::default()).unwrap_err();
    let SimError::Deadlock { stuck } = &err else {
        panic!("expected a deadlock, got {err}");
    };
    let ScheduleOp::Send { peer, msg } = dropped else {
        unreachable!()
    };
    assert!(
        stuck
            .iter()
            .any(|s| s.rank == peer && s.op == ScheduleOp::Recv { peer: 1, msg }),
        "{err}"
    );

    let mut schedule = generate(Method::Zb1p, 4, 8).unwrap();
    let at = schedule.ranks[0]
        .iter()
        .rposition(|op| matches!(op, ScheduleOp::W(_)))
        .unwrap();
    schedule.ranks[0].remove(at);
    let err = simulate(&schedule, &Costs::default()).unwrap_err();
    assert_eq!(
        err.to_string(),
        "micro-batch 7 on stage 0 gets 1 forward, 0 full backward, 1 input-gradient backward \
         and 0 weight-gradient passes, where exactly one forward and either one full backward \
         or one input-gradient and one weight-gradient pass are needed"
    );
}

#[test]
fn a_receive_on_the_wrong_rank_is_misplaced() {
    let mut schedule = generate(Method::OneFOneB, 4, 4).unwrap();
    let op = schedule.ranks[1][0];
    schedule.ranks[3].insert(0, op);
    let err = simulate(&schedule, &Costs::default()).unwrap_err();
    assert!(
        matches!(
            err,
            SimError::Misplaced {
                rank: 3,
                index: 0,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn bad_costs_name_the_cost() {
    let schedule = generate(Method::OneFOneB, 2, 2).unwrap();
    let err = simulate(&schedule, &Costs::new(1.0, 1.0, 2.0)).unwrap_err();
    assert_eq!(
        err.to_string(),
        "cost `w` = 2: expected at most b (W is the weight-gradient part of the full backward b)"
    );
    let err = simulate(&schedule, &Costs::new(f64::NAN, 1.0, 0.0)).unwrap_err();
    assert!(err.to_string().starts_with("cost `f` = NaN"), "{err}");
}

#[test]
fn schedules_round_trip_through_json() {
    let schedule = generate(Method::DualPipeV, 4, 5).unwrap();
    let json = serde_json::to_string(&schedule).unwrap();
    let back: fathom_compiler::pipeline::Schedule = serde_json::from_str(&json).unwrap();
    assert_eq!(back, schedule);
}

#[test]
fn dualpipe_table() {
    insta::assert_snapshot!(generate(Method::DualPipe, 4, 8).unwrap().table());
}

#[test]
fn one_f_one_b_table() {
    insta::assert_snapshot!(generate(Method::OneFOneB, 4, 8).unwrap().table());
}

#[test]
fn dualpipe_timeline_svg() {
    let schedule = generate(Method::DualPipe, 4, 8).unwrap();
    let report = simulate(&schedule, &Costs::default().with_overlap(2.5)).unwrap();
    let svg = timeline_svg(&report);
    assert_eq!(svg, timeline_svg(&report), "the picture is deterministic");
    insta::assert_snapshot!(svg);
}
