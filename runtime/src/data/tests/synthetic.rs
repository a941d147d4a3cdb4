use std::f64::consts::LN_2;

use super::rows;
use crate::data::{
    Batches, DataError, DataPosition, SyntheticBatches, SyntheticKind, SyntheticTask,
};

const PROGRESSION: SyntheticKind = SyntheticKind::Progression { max_step: 4 };

#[test]
fn same_seed_same_batches() {
    for kind in [PROGRESSION, SyntheticKind::Repeat { period: 5 }] {
        let mut a = SyntheticTask::new(kind, 32, 7).unwrap();
        let mut b = SyntheticTask::new(kind, 32, 7).unwrap();
        let mut c = SyntheticTask::new(kind, 32, 8).unwrap();
        let first = a.batch(8, 16);
        assert_eq!(first.dims(), &[8, 16]);
        assert_eq!(first, b.batch(8, 16));
        assert_ne!(first, c.batch(8, 16));
        // Successive batches differ; batch_at does not move the counter.
        let second = a.batch(8, 16);
        assert_ne!(first, second);
        assert_eq!(a.batch_at(1, 8, 16), second);
        assert_eq!(a.batch_index(), 2);
        // A longer seq extends the rows.
        let longer = a.batch_at(0, 8, 24);
        for (short, long) in rows(&first).iter().zip(rows(&longer)) {
            assert_eq!(short[..], long[..16]);
        }
    }
}

#[test]
fn resuming_from_a_saved_position_gives_the_same_batches() {
    let task = SyntheticTask::new(PROGRESSION, 16, 3).unwrap();
    let mut straight = task.clone().batches(4, 8).unwrap();
    let expected: Vec<_> = (0..6).map(|_| straight.next_batch().unwrap()).collect();

    let mut first = task.clone().batches(4, 8).unwrap();
    for batch in &expected[..4] {
        assert_eq!(&first.next_batch().unwrap(), batch);
    }
    let saved = serde_json::to_value(first.position()).unwrap();
    assert_eq!(
        saved,
        serde_json::json!({"source": "synthetic", "batch_index": 4})
    );

    let mut resumed = task.batches(4, 8).unwrap();
    resumed
        .seek(&serde_json::from_value(saved).unwrap())
        .unwrap();
    for batch in &expected[4..] {
        assert_eq!(&resumed.next_batch().unwrap(), batch);
    }
    assert_eq!(resumed.position(), straight.position());

    let err = resumed
        .seek(&DataPosition::Text {
            epoch: 0,
            file_index: 0,
            byte_offset: 0,
        })
        .unwrap_err();
    assert!(matches!(err, DataError::InvalidPosition { .. }), "{err}");
}

#[test]
fn progression_rows_follow_the_rule() {
    let v = 16;
    let mut task = SyntheticTask::new(PROGRESSION, v, 11).unwrap();
    let mut steps = [0usize; 5];
    let mut starts = vec![0usize; v];
    for _ in 0..20 {
        for row in rows(&task.batch(8, 12)) {
            assert!(row.iter().all(|&t| (0..v as i64).contains(&t)), "{row:?}");
            let k = (row[1] - row[0]).rem_euclid(v as i64);
            assert!((1..=4).contains(&k), "{row:?}");
            for pair in row.windows(2) {
                assert_eq!((pair[1] - pair[0]).rem_euclid(v as i64), k, "{row:?}");
            }
            steps[k as usize] += 1;
            starts[row[0] as usize] += 1;
        }
    }
    // 160 rows: every step and every start value occurs.
    assert!(steps[1..].iter().all(|&n| n > 10), "{steps:?}");
    assert!(starts.iter().all(|&n| n > 0), "{starts:?}");
}

#[test]
fn repeat_rows_follow_the_rule() {
    let mut task = SyntheticTask::new(SyntheticKind::Repeat { period: 3 }, 20, 5).unwrap();
    let batch = task.batch(6, 10);
    let rows = rows(&batch);
    for row in &rows {
        assert!(row.iter().all(|&t| (0..20).contains(&t)), "{row:?}");
        for i in 3..10 {
            assert_eq!(row[i], row[i - 3], "{row:?}");
        }
    }
    assert!(
        rows.windows(2).any(|w| w[0] != w[1]),
        "rows should differ: {rows:?}"
    );
}

#[test]
fn loss_floors() {
    let eps = 1e-12;
    let progression = SyntheticTask::new(PROGRESSION, 16, 0).unwrap();
    let ln4 = 4f64.ln();
    assert!((progression.loss_floor(17) - ln4 / 16.0).abs() < eps);
    assert!((progression.loss_floor(2) - ln4).abs() < eps);
    assert_eq!(progression.loss_floor(1), 0.0);
    // Falls with seq, and lies well below the untrained ln V.
    assert!(progression.loss_floor(32) < progression.loss_floor(16));
    assert!(progression.loss_floor(16) < 16f64.ln() / 10.0);
    // Two ahead from t_0: 2k mod 16 takes 4 values still.
    assert!((progression.loss_floor_ahead(10, 2) - ln4 / 8.0).abs() < eps);
    // Four ahead with V = 8: 4k mod 8 is 4, 0, 4, 0: one bit.
    let small = SyntheticTask::new(PROGRESSION, 8, 0).unwrap();
    assert!((small.loss_floor_ahead(10, 4) - LN_2 / 6.0).abs() < eps);

    let repeat = SyntheticTask::new(SyntheticKind::Repeat { period: 3 }, 16, 0).unwrap();
    let ln16 = 16f64.ln();
    assert!((repeat.loss_floor(9) - 2.0 * ln16 / 8.0).abs() < eps);
    assert!((repeat.loss_floor(2) - ln16).abs() < eps); // no repetition seen yet
    let period2 = SyntheticTask::new(SyntheticKind::Repeat { period: 2 }, 16, 0).unwrap();
    // Three ahead: targets t_3, t_4, t_5 = p1, p0, p1; only p1 from position 0 is unknown.
    assert!((period2.loss_floor_ahead(6, 3) - ln16 / 3.0).abs() < eps);
    let constant = SyntheticTask::new(SyntheticKind::Repeat { period: 1 }, 16, 0).unwrap();
    assert_eq!(constant.loss_floor(8), 0.0);

    let batches = SyntheticBatches::new(progression, 8, 17).unwrap();
    assert!((batches.loss_floor() - ln4 / 16.0).abs() < eps);
}

#[test]
fn invalid_tasks() {
    let err = SyntheticTask::new(PROGRESSION, 4, 0).unwrap_err();
    assert!(
        matches!(
            err,
            DataError::VocabTooSmall {
                needed: 5,
                vocab_size: 4,
                ..
            }
        ),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains("needs vocab_size >= 5, the model has 4"),
        "{err}"
    );
    let err = SyntheticTask::new(SyntheticKind::Progression { max_step: 0 }, 16, 0).unwrap_err();
    assert!(matches!(err, DataError::InvalidTask(_)), "{err}");
    let err = SyntheticTask::new(SyntheticKind::Repeat { period: 0 }, 16, 0).unwrap_err();
    assert!(matches!(err, DataError::InvalidTask(_)), "{err}");
    let task = SyntheticTask::new(PROGRESSION, 16, 0).unwrap();
    for (batch, seq) in [(0, 8), (8, 0)] {
        let err = task.clone().batches(batch, seq).unwrap_err();
        assert!(matches!(err, DataError::InvalidShape { .. }), "{err}");
    }
}

#[test]
fn both_sources_behind_the_trait() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("t.txt"), "abcdefgh").unwrap();
    let mut sources: Vec<Box<dyn Batches>> = vec![
        Box::new(crate::data::TextDataset::open(dir.path(), 2, 4).unwrap()),
        Box::new(
            SyntheticTask::new(SyntheticKind::default(), 16, 0)
                .unwrap()
                .batches(2, 4)
                .unwrap(),
        ),
    ];
    for source in &mut sources {
        assert_eq!(source.batch_shape(), (2, 4));
        let start = source.position();
        let batch = source.next_batch().unwrap();
        assert_eq!(batch.dims(), &[2, 4]);
        source.seek(&start).unwrap();
        assert_eq!(source.next_batch().unwrap(), batch);
    }
}
