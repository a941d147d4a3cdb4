//! The learning-rate schedule of DeepSeek-V3 (report §4.2): linear warmup, constant, cosine
//! decay, constant tail.

use std::f64::consts::PI;

use serde::{Deserialize, Serialize};

use super::{OptimError, non_negative};

/// Learning rate by step, counting steps from 0 (the rate for the step about to be taken):
///
/// - warmup, `step < warmup_steps`: `peak_lr * (step + 1) / warmup_steps`, so step 0 already
///   trains (at `peak/warmup`) and the last warmup step reaches `peak_lr` exactly;
/// - hold, the next `hold_steps` steps: `peak_lr`;
/// - decay, the next `decay_steps` steps, `s` counting from 0 within them:
///   `peak_lr - (peak_lr - final_lr) * (1 - cos(pi * s / decay_steps)) / 2`, which starts at
///   `peak_lr` exactly and is halfway at `s = decay_steps / 2`;
/// - then `final_lr` forever.
///
/// Any phase may have 0 steps. Call [`LrSchedule::validate`] on a loaded schedule.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LrSchedule {
    pub peak_lr: f64,
    pub warmup_steps: u64,
    pub hold_steps: u64,
    pub decay_steps: u64,
    pub final_lr: f64,
}

impl LrSchedule {
    /// Rates finite and non-negative, and `final_lr <= peak_lr`.
    pub fn validate(&self) -> Result<(), OptimError> {
        non_negative("peak_lr", self.peak_lr)?;
        non_negative("final_lr", self.final_lr)?;
        if self.final_lr > self.peak_lr {
            return Err(OptimError::InvalidValue {
                field: "final_lr",
                value: self.final_lr,
                reason: "must not exceed peak_lr",
            });
        }
        Ok(())
    }

    /// The learning rate for step `step` (from 0).
    pub fn lr(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.peak_lr * ((step + 1) as f64 / self.warmup_steps as f64);
        }
        let s = step - self.warmup_steps;
        if s < self.hold_steps {
            return self.peak_lr;
        }
        let s = s - self.hold_steps;
        if s < self.decay_steps {
            let progress = s as f64 / self.decay_steps as f64;
            let fall = 0.5 * (1.0 - (PI * progress).cos());
            return self.peak_lr - (self.peak_lr - self.final_lr) * fall;
        }
        self.final_lr
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn schedule() -> LrSchedule {
        LrSchedule {
            peak_lr: 2.2e-4,
            warmup_steps: 2000,
            hold_steps: 1000,
            decay_steps: 4000,
            final_lr: 2.2e-5,
        }
    }

    #[test]
    fn warmup_is_linear_from_the_first_step() {
        let s = schedule();
        assert_eq!(s.lr(0), 2.2e-4 / 2000.0);
        assert_eq!(s.lr(999), 2.2e-4 * 0.5);
        // The last warmup step reaches the peak exactly.
        assert_eq!(s.lr(1999), 2.2e-4);
        assert!((1..2000).all(|i| s.lr(i) > s.lr(i - 1)));
    }

    #[test]
    fn hold_cosine_and_tail() {
        let s = schedule();
        assert_eq!(s.lr(2000), 2.2e-4);
        assert_eq!(s.lr(2999), 2.2e-4);
        // Decay starts at the peak exactly and is halfway at its middle.
        assert_eq!(s.lr(3000), 2.2e-4);
        let mid = s.lr(3000 + 2000);
        assert!((mid - (2.2e-4 + 2.2e-5) / 2.0).abs() < 1e-18, "{mid}");
        let quarter = s.lr(3000 + 1000);
        let expected = 2.2e-5 + (2.2e-4 - 2.2e-5) * (1.0 + (PI / 4.0).cos()) / 2.0;
        assert!((quarter - expected).abs() < 1e-18, "{quarter}");
        assert!((3001..7000).all(|i| s.lr(i) < s.lr(i - 1)));
        assert!(s.lr(6999) > 2.2e-5);
        // Then the tail, forever.
        assert_eq!(s.lr(7000), 2.2e-5);
        assert_eq!(s.lr(u64::MAX), 2.2e-5);
    }

    #[test]
    fn empty_phases() {
        let s = LrSchedule {
            peak_lr: 1.0,
            warmup_steps: 0,
            hold_steps: 0,
            decay_steps: 0,
            final_lr: 0.5,
        };
        assert_eq!(s.lr(0), 0.5);
        let s = LrSchedule {
            warmup_steps: 1,
            ..s
        };
        assert_eq!((s.lr(0), s.lr(1)), (1.0, 0.5));
        let s = LrSchedule {
            decay_steps: 2,
            ..s
        };
        assert_eq!((s.lr(0), s.lr(1), s.lr(3)), (1.0, 1.0, 0.5));
        assert!((s.lr(2) - 0.75).abs() < 1e-15);
    }

    #[test]
    fn validation_names_the_field() {
        assert_eq!(schedule().validate(), Ok(()));
        let err = |s: LrSchedule| s.validate().unwrap_err().to_string();
        let s = schedule();
        assert_eq!(
            err(LrSchedule {
                final_lr: 3e-4,
                ..s
            }),
            "invalid final_lr = 0.0003: must not exceed peak_lr"
        );
        assert!(err(LrSchedule { peak_lr: -1.0, ..s }).starts_with("invalid peak_lr = -1"));
        assert!(
            err(LrSchedule {
                peak_lr: f64::NAN,
                ..s
            })
            .starts_with("invalid peak_lr = NaN")
        );
        assert!(
            err(LrSchedule {
                final_lr: f64::INFINITY,
                ..s
            })
            .starts_with("invalid final_lr")
        );
        assert!(
            err(LrSchedule {
                final_lr: -0.5,
                ..s
            })
            .starts_with("invalid final_lr")
        );
    }

    #[test]
    fn serde_round_trip() {
        let s = schedule();
        let json = serde_json::to_string(&s).unwrap_or_default();
        assert_eq!(
            json,
            r#"{"peak_lr":0.00022,"warmup_steps":2000,"hold_steps":1000,"decay_steps":4000,"final_lr":0.000022}"#
        );
        assert_eq!(serde_json::from_str::<LrSchedule>(&json).ok(), Some(s));
        let typo = json.replace("hold_steps", "hold");
        assert!(serde_json::from_str::<LrSchedule>(&typo).is_err());
    }
}
