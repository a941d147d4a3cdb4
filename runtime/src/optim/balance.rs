//! Auxiliary-loss-free load balancing (DeepSeek-V3 §2.1.2, SPEC §1; Wang et al., "Auxiliary-
//! Loss-Free Load Balancing Strategy for Mixture-of-Experts"): after each step, every routed
//! expert's selection bias moves by `gamma` against its load relative to the mean.

use std::collections::BTreeMap;

use super::{OptimError, non_negative};

/// Updates one MoE layer's balancing bias (`mlp.gate.e_score_correction_bias`) from the loads of
/// the whole global batch (tokens routed to each expert, summed by the caller over micro-batches
/// and data-parallel ranks, e.g. with [`LoadStats::merge`]): `b_i -= gamma` when expert `i`'s
/// load is above the mean over experts, `b_i += gamma` when below, unchanged when equal
/// (`b_i += gamma * sign(mean - load_i)`). The comparison is `load_i * n` against the sum of
/// loads, exact for integer counts, so equal loads are never moved. The update is computed in
/// f64 and rounded to f32.
///
/// Refuses loads and bias of different lengths, a negative or non-finite load (naming the
/// expert) and a negative or non-finite `gamma`; on error `bias` is unchanged.
pub fn update_balancing_bias(
    bias: &mut [f32],
    expert_load: &[f64],
    gamma: f64,
) -> Result<(), OptimError> {
    non_negative("gamma", gamma)?;
    if expert_load.len() != bias.len() {
        return Err(OptimError::LengthMismatch {
            what: "expert loads for the balancing bias",
            expected: bias.len(),
            found: expert_load.len(),
        });
    }
    if let Some((expert, &value)) = expert_load
        .iter()
        .enumerate()
        .find(|&(_, &l)| !(l.is_finite() && l >= 0.0))
    {
        return Err(OptimError::BadLoad { expert, value });
    }
    let n = expert_load.len() as f64;
    let total: f64 = expert_load.iter().sum();
    for (b, &load) in bias.iter_mut().zip(expert_load) {
        let scaled = load * n;
        if scaled > total {
            *b = (f64::from(*b) - gamma) as f32;
        } else if scaled < total {
            *b = (f64::from(*b) + gamma) as f32;
        }
    }
    Ok(())
}

/// Adds `load` (tokens routed to each expert of the layer whose balancing bias is `bias`, from
/// one micro-batch or one rank) to that layer's running sums in `sums`, in f64.
pub fn add_expert_load(
    sums: &mut BTreeMap<String, Vec<f64>>,
    bias: &str,
    load: impl ExactSizeIterator<Item = f64>,
) {
    let sum = sums
        .entry(bias.to_owned())
        .or_insert_with(|| vec![0.0; load.len()]);
    for (s, l) in sum.iter_mut().zip(load) {
        *s += l;
    }
}

/// Tokens routed to each expert of one MoE layer, for the bias update and for logging.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LoadStats {
    /// Per expert, the number of (token, choice) pairs that picked it.
    pub counts: Vec<f64>,
}

impl LoadStats {
    /// No tokens yet, for `experts` routed experts.
    pub fn new(experts: usize) -> Self {
        LoadStats {
            counts: vec![0.0; experts],
        }
    }

    /// Counts the chosen expert ids (the router's top-k indices, any shape, flattened; each
    /// token contributes one count per choice). An id outside `0..experts` is an error naming
    /// it and its position.
    pub fn from_expert_ids(ids: &[i64], experts: usize) -> Result<Self, OptimError> {
        let mut stats = LoadStats::new(experts);
        stats.add_expert_ids(ids)?;
        Ok(stats)
    }

    /// Adds more chosen ids (another micro-batch); on error nothing is added.
    pub fn add_expert_ids(&mut self, ids: &[i64]) -> Result<(), OptimError> {
        let experts = self.counts.len();
        let index = |id: i64| usize::try_from(id).ok().filter(|&i| i < experts);
        if let Some((position, &id)) = ids.iter().enumerate().find(|&(_, &id)| index(id).is_none())
        {
            return Err(OptimError::ExpertOutOfRange {
                id,
                position,
                experts,
            });
        }
        for i in ids.iter().filter_map(|&id| index(id)) {
            self.counts[i] += 1.0;
        }
        Ok(())
    }

    /// Adds another batch's counts (same number of experts).
    pub fn merge(&mut self, other: &LoadStats) -> Result<(), OptimError> {
        if other.counts.len() != self.counts.len() {
            return Err(OptimError::LengthMismatch {
                what: "expert counts to merge",
                expected: self.counts.len(),
                found: other.counts.len(),
            });
        }
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        Ok(())
    }

    pub fn total(&self) -> f64 {
        self.counts.iter().sum()
    }

    /// Mean load over experts (0 without experts).
    pub fn mean(&self) -> f64 {
        if self.counts.is_empty() {
            0.0
        } else {
            self.total() / self.counts.len() as f64
        }
    }

    /// Largest load (0 without experts).
    pub fn max(&self) -> f64 {
        self.counts.iter().copied().fold(0.0, f64::max)
    }

    /// `max / mean`: 1 when perfectly balanced; 1 when there are no tokens.
    pub fn max_over_mean(&self) -> f64 {
        let mean = self.mean();
        if mean > 0.0 { self.max() / mean } else { 1.0 }
    }

    /// The Loss-Free Balancing paper's MaxVio, `(max_i load_i - mean) / mean`: 0 when perfectly
    /// balanced; 0 when there are no tokens.
    pub fn max_violation(&self) -> f64 {
        let mean = self.mean();
        if mean > 0.0 {
            (self.max() - mean) / mean
        } else {
            0.0
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn bias_moves_against_the_load() {
        // Mean load 4: expert 0 over, 1 under, 2 equal, 3 under.
        let mut bias = [0.5f32, -0.25, 0.125, 0.0];
        update_balancing_bias(&mut bias, &[9.0, 1.0, 4.0, 2.0], 0.001).unwrap();
        assert_eq!(
            bias,
            [
                (0.5f64 - 0.001) as f32,
                (-0.25f64 + 0.001) as f32,
                0.125,
                0.001f64 as f32
            ]
        );
    }

    #[test]
    fn equal_loads_and_zero_gamma_are_no_ops() {
        let mut bias = [0.1f32, 0.2, 0.3];
        update_balancing_bias(&mut bias, &[7.0, 7.0, 7.0], 0.001).unwrap();
        assert_eq!(bias, [0.1, 0.2, 0.3]);
        // A mean that is not representable (10/3) is still compared exactly.
        update_balancing_bias(&mut bias, &[3.0, 3.0, 4.0], 0.0).unwrap();
        assert_eq!(bias, [0.1, 0.2, 0.3]);
        let mut bias = [0.0f32; 3];
        update_balancing_bias(&mut bias, &[3.0, 3.0, 4.0], 0.5).unwrap();
        assert_eq!(bias, [0.5, 0.5, -0.5]);
        update_balancing_bias(&mut [], &[], 0.5).unwrap();
    }

    #[test]
    fn bad_bias_inputs_are_named() {
        let mut bias = [0.0f32; 2];
        let err = update_balancing_bias(&mut bias, &[1.0], 0.001).unwrap_err();
        assert_eq!(
            err.to_string(),
            "expert loads for the balancing bias: 1 values, expected 2"
        );
        let err = update_balancing_bias(&mut bias, &[1.0, f64::NAN], 0.001).unwrap_err();
        assert!(
            matches!(err, OptimError::BadLoad { expert: 1, value } if value.is_nan()),
            "{err}"
        );
        let err = update_balancing_bias(&mut bias, &[-1.0, 1.0], 0.001).unwrap_err();
        assert!(
            err.to_string().starts_with("load of expert 0 is -1"),
            "{err}"
        );
        let err = update_balancing_bias(&mut bias, &[1.0, 2.0], -0.1).unwrap_err();
        assert!(err.to_string().starts_with("invalid gamma"), "{err}");
        assert_eq!(bias, [0.0, 0.0]);
    }

    #[test]
    fn load_stats_count_and_summarise() {
        // 4 tokens, top-2 of 4 experts.
        let ids = [0, 1, 0, 2, 1, 0, 0, 2];
        let mut stats = LoadStats::from_expert_ids(&ids, 4).unwrap();
        assert_eq!(stats.counts, [4.0, 2.0, 2.0, 0.0]);
        assert_eq!((stats.total(), stats.mean(), stats.max()), (8.0, 2.0, 4.0));
        assert_eq!(stats.max_over_mean(), 2.0);
        assert_eq!(stats.max_violation(), 1.0);
        stats.add_expert_ids(&[3, 3, 3, 3]).unwrap();
        assert_eq!(stats.counts, [4.0, 2.0, 2.0, 4.0]);
        assert_eq!(stats.max_violation(), 1.0 / 3.0);
        stats
            .merge(&LoadStats::from_expert_ids(&[1, 1, 2, 2], 4).unwrap())
            .unwrap();
        assert_eq!(stats.counts, [4.0; 4]);
        assert_eq!((stats.max_over_mean(), stats.max_violation()), (1.0, 0.0));

        let empty = LoadStats::new(8);
        assert_eq!((empty.max_over_mean(), empty.max_violation()), (1.0, 0.0));
        assert_eq!(LoadStats::new(0).mean(), 0.0);
    }

    #[test]
    fn bad_ids_are_named_and_add_nothing() {
        let mut stats = LoadStats::new(2);
        let err = stats.add_expert_ids(&[0, 1, 2]).unwrap_err();
        assert_eq!(err.to_string(), "expert id 2 at position 2 is outside 0..2");
        let err = stats.add_expert_ids(&[-1]).unwrap_err();
        assert!(matches!(err, OptimError::ExpertOutOfRange { id: -1, .. }));
        assert_eq!(stats.counts, [0.0, 0.0]);
        let err = stats.merge(&LoadStats::new(3)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "expert counts to merge: 3 values, expected 2"
        );
    }
}
