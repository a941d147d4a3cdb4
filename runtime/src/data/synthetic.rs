//! Generated sequences a tiny model learns quickly, with a known loss floor.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::{Batches, DataError, DataPosition};
use crate::tensor::HostTensor;

/// Which sequences a [`SyntheticTask`] generates. Each row is drawn independently; `V` is the
/// task's vocabulary size.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SyntheticKind {
    /// An arithmetic progression modulo `V`: `t_i = (a + i·k) mod V`, with the start `a`
    /// uniform in `0..V` and the step `k` uniform in `1..=max_step` (`max_step < V`). The first
    /// token is unpredictable, the second is one of `max_step` candidates, and from the third on
    /// the next token is determined by the previous two (`k = t_1 − t_0 mod V`). Even a bigram
    /// model gets from `ln V` to `ln max_step`, so the loss drops early and clearly; reaching the
    /// floor needs attention to the previous token. The recommended task for smoke tests.
    Progression { max_step: usize },
    /// A random pattern of `period` tokens, each uniform in `0..V`, repeated: `t_i =
    /// p_(i mod period)`. The first `period` tokens are unpredictable; after them the next token
    /// is a copy from `period` positions back. Harder than `Progression` for a tiny model: no
    /// bigram statistics help, the loss stays near `ln V` until attention learns the lookback.
    Repeat { period: usize },
}

impl Default for SyntheticKind {
    /// `Progression { max_step: 4 }`.
    fn default() -> Self {
        SyntheticKind::Progression { max_step: 4 }
    }
}

/// A deterministic, endless source of synthetic sequences (see [`SyntheticKind`]).
///
/// Batch `i` is generated from its own random stream, `ChaCha8Rng::seed_from_u64(seed ^
/// SALT)` on stream `i` (the salt keeps it apart from parameter initialisation with the same
/// seed), so a batch depends only on `(kind, vocab_size, seed, i, batch, seq)`, and resuming
/// needs only the counter `i` ([`DataPosition::Synthetic`]). A longer `seq` extends the rows of
/// a batch without changing their prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyntheticTask {
    kind: SyntheticKind,
    vocab_size: usize,
    seed: u64,
    batch_index: u64,
}

/// Keeps the data streams apart from `init::parameter_rng(seed, name)`.
const SALT: u64 = 0xDA7A_5EED_0F5E_0000;

impl SyntheticTask {
    /// A task over tokens `0..vocab_size` (at most the model's vocabulary size), at batch 0.
    /// Fails if the kind's parameter is 0 or `vocab_size` is too small for it (a progression
    /// needs `vocab_size > max_step`; every task needs at least 2 tokens).
    pub fn new(kind: SyntheticKind, vocab_size: usize, seed: u64) -> Result<Self, DataError> {
        let needed = match kind {
            SyntheticKind::Progression { max_step: 0 } => {
                return Err(DataError::InvalidTask(
                    "a progression needs max_step >= 1".into(),
                ));
            }
            SyntheticKind::Repeat { period: 0 } => {
                return Err(DataError::InvalidTask("a repeat needs period >= 1".into()));
            }
            SyntheticKind::Progression { max_step } => max_step + 1,
            SyntheticKind::Repeat { .. } => 2,
        };
        if vocab_size < needed {
            return Err(DataError::VocabTooSmall {
                what: format!("the synthetic task {kind:?}"),
                needed,
                vocab_size,
            });
        }
        Ok(SyntheticTask {
            kind,
            vocab_size,
            seed,
            batch_index: 0,
        })
    }

    pub fn kind(&self) -> SyntheticKind {
        self.kind
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// The index of the next batch [`batch`](Self::batch) will return.
    pub fn batch_index(&self) -> u64 {
        self.batch_index
    }

    /// The next batch, `i64 [batch, seq]`, and moves the counter on.
    pub fn batch(&mut self, batch: usize, seq: usize) -> HostTensor {
        let tensor = self.batch_at(self.batch_index, batch, seq);
        self.batch_index += 1;
        tensor
    }

    /// Batch number `index`, `i64 [batch, seq]`, without moving the counter.
    pub fn batch_at(&self, index: u64, batch: usize, seq: usize) -> HostTensor {
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed ^ SALT);
        rng.set_stream(index);
        let v = self.vocab_size as u64;
        let mut values = Vec::with_capacity(batch * seq);
        for _ in 0..batch {
            match self.kind {
                SyntheticKind::Progression { max_step } => {
                    let a = rng.random_range(0..v);
                    let k = rng.random_range(1..=max_step as u64);
                    values.extend((0..seq as u64).map(|i| {
                        let t = (u128::from(a) + u128::from(i % v) * u128::from(k)) % u128::from(v);
                        t as i64
                    }));
                }
                SyntheticKind::Repeat { period } => {
                    let pattern: Vec<i64> =
                        (0..period).map(|_| rng.random_range(0..v) as i64).collect();
                    values.extend((0..seq).map(|i| pattern[i % period]));
                }
            }
        }
        HostTensor::i64([batch, seq], values)
    }

    /// The lowest expected next-token loss (nats, averaged over the `seq − 1` predicted
    /// positions, as the model's next-token loss is) on sequences of `seq` tokens: the loss of
    /// the Bayes-optimal predictor that knows the task. A trained model's loss approaches it
    /// from above. `loss_floor_ahead(seq, 1)`.
    ///
    /// - `Progression { max_step: K }`: only the second token is uncertain (the step), so
    ///   `ln K / (seq − 1)`.
    /// - `Repeat { period: p }`: the tokens at positions `1..p` are uniform and fresh, so
    ///   `(min(p, seq) − 1) · ln V / (seq − 1)`.
    pub fn loss_floor(&self, seq: usize) -> f64 {
        self.loss_floor_ahead(seq, 1)
    }

    /// The lowest expected loss of predicting the token `ahead` positions on (1: the next
    /// token; `k + 1`: MTP depth `k`), averaged over the `seq − ahead` positions that have a
    /// target: `Σ_i H(t_(i+ahead) | t_0..=t_i) / (seq − ahead)`. 0 when `seq <= ahead` (no
    /// position has a target).
    pub fn loss_floor_ahead(&self, seq: usize, ahead: usize) -> f64 {
        if seq <= ahead || ahead == 0 {
            return 0.0;
        }
        let positions = seq - ahead;
        let v = self.vocab_size;
        let total: f64 = match self.kind {
            // Position 0 sees t_0 only: t_ahead = t_0 + ahead·k, uncertain through k. From
            // position 1 on, k = t_1 − t_0 mod V is known (1 <= k < V) and so is every token.
            SyntheticKind::Progression { max_step } => {
                let mut counts = vec![0usize; v];
                for k in 1..=max_step {
                    counts[(ahead % v) * k % v] += 1;
                }
                entropy(&counts, max_step)
            }
            // t_j = p_(j mod period) is known at position i iff a position <= i has the same
            // residue, i.e. iff j mod period <= i; otherwise it is uniform over V.
            SyntheticKind::Repeat { period } => {
                let unknown = (0..positions).filter(|&i| (i + ahead) % period > i).count();
                unknown as f64 * (v as f64).ln()
            }
        };
        total / positions as f64
    }

    /// Wraps the task as a [`Batches`] source of `i64 [batch, seq]` batches.
    pub fn batches(self, batch: usize, seq: usize) -> Result<SyntheticBatches, DataError> {
        SyntheticBatches::new(self, batch, seq)
    }

    pub fn position(&self) -> DataPosition {
        DataPosition::Synthetic {
            batch_index: self.batch_index,
        }
    }

    /// Moves the counter to a [`DataPosition::Synthetic`] position. The task and seed are not
    /// recorded in the position: the caller resumes with the same ones.
    pub fn seek(&mut self, position: &DataPosition) -> Result<(), DataError> {
        match *position {
            DataPosition::Synthetic { batch_index } => {
                self.batch_index = batch_index;
                Ok(())
            }
            _ => Err(DataError::InvalidPosition {
                what: format!("the synthetic task {:?}", self.kind),
                position: *position,
                reason: "not a synthetic task position".into(),
            }),
        }
    }
}

/// The Shannon entropy (nats) of the distribution `counts / total`.
fn entropy(counts: &[usize], total: usize) -> f64 {
    counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = c as f64 / total as f64;
            -p * p.ln()
        })
        .sum()
}

/// A [`SyntheticTask`] with a fixed batch shape, as a [`Batches`] source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyntheticBatches {
    task: SyntheticTask,
    batch: usize,
    seq: usize,
}

impl SyntheticBatches {
    /// Fails if `batch` or `seq` is 0.
    pub fn new(task: SyntheticTask, batch: usize, seq: usize) -> Result<Self, DataError> {
        if batch == 0 || seq == 0 {
            return Err(DataError::InvalidShape {
                what: format!("the synthetic task {:?}", task.kind),
                batch,
                seq,
            });
        }
        Ok(SyntheticBatches { task, batch, seq })
    }

    pub fn task(&self) -> &SyntheticTask {
        &self.task
    }

    /// The loss floor of these batches: [`SyntheticTask::loss_floor`] at this `seq`.
    pub fn loss_floor(&self) -> f64 {
        self.task.loss_floor(self.seq)
    }
}

impl Batches for SyntheticBatches {
    fn next_batch(&mut self) -> Result<HostTensor, DataError> {
        Ok(self.task.batch(self.batch, self.seq))
    }

    fn batch_shape(&self) -> (usize, usize) {
        (self.batch, self.seq)
    }

    fn position(&self) -> DataPosition {
        self.task.position()
    }

    fn seek(&mut self, position: &DataPosition) -> Result<(), DataError> {
        self.task.seek(position)
    }
}
