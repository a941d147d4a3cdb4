//! ZeRO-1: the AdamW state sharded over the ranks that hold a parameter.
//!
//! Every replica of a parameter (the data-parallel replicas of its stage, DualPipe's two copies
//! of it, the first and last stages sharing the embedding) receives the same reduced gradient,
//! so one of them updating each element is enough: a [`ShardPlan`] cuts every parameter into
//! as many contiguous element ranges as it has holders and gives range i to holder i. Each
//! rank keeps the moments of its ranges only (a [`ShardedAdamW`] of one shard, in a process of
//! its own, or of every rank's, for ranks that are threads of one process) and, after the
//! update, sends the weights of its ranges to the other holders
//! (`fathom_runtime::parallel::share_updates`). AdamW is element-wise, so the shards compute
//! bit for bit what one whole optimizer computes.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;

use super::{AdamW, Grads, MomentPart, OptimError, ParamStore};

/// A range of a parameter's elements and the rank that keeps its optimizer state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Piece {
    pub owner: usize,
    pub range: Range<usize>,
}

/// Who keeps the optimizer state of which elements.
#[derive(Clone, Debug, PartialEq)]
pub struct ShardPlan {
    /// Per parameter, in name order: its pieces, in element order, tiling the parameter.
    pieces: BTreeMap<String, Vec<Piece>>,
    /// Per parameter: the ranks that hold its weights (sorted).
    holders: BTreeMap<String, Vec<usize>>,
}

impl ShardPlan {
    /// Every parameter (name and element count) whole on rank 0, its only holder: one rank.
    pub fn single<'a>(sizes: impl IntoIterator<Item = (&'a str, usize)>) -> Self {
        let sizes: BTreeMap<String, usize> =
            sizes.into_iter().map(|(n, s)| (n.to_owned(), s)).collect();
        let holders = sizes.keys().map(|n| (n.clone(), vec![0])).collect();
        Self::new(&sizes, holders, false)
    }

    /// The pieces of parameters of `sizes` elements held by `holders` (every parameter needs
    /// at least one holder). `sharded`: each holder gets a contiguous near-equal range (ZeRO-1);
    /// otherwise the first holder keeps the whole parameter's state.
    pub fn new(
        sizes: &BTreeMap<String, usize>,
        holders: BTreeMap<String, Vec<usize>>,
        sharded: bool,
    ) -> Self {
        let mut pieces = BTreeMap::new();
        for (name, &size) in sizes {
            let group = &holders[name];
            let shares = if sharded { group.len() } else { 1 };
            let cut = |i: usize| i * size / shares;
            let list = (0..shares)
                .map(|i| Piece {
                    owner: group[i],
                    range: cut(i)..cut(i + 1),
                })
                // A parameter smaller than its holder count leaves some holders nothing.
                .filter(|p| !p.range.is_empty() || size == 0)
                .collect();
            pieces.insert(name.clone(), list);
        }
        ShardPlan { pieces, holders }
    }

    /// The pieces of every parameter, in name order.
    pub fn pieces(&self) -> impl Iterator<Item = (&str, &[Piece])> {
        self.pieces.iter().map(|(n, p)| (n.as_str(), p.as_slice()))
    }

    /// The ranks holding `param`'s weights (empty for an unknown name).
    pub fn holders(&self, param: &str) -> &[usize] {
        self.holders.get(param).map_or(&[], Vec::as_slice)
    }

    /// The element range of each parameter whose state `rank` keeps.
    pub fn owned_by(&self, rank: usize) -> BTreeMap<String, Range<usize>> {
        self.pieces
            .iter()
            .filter_map(|(name, pieces)| {
                let piece = pieces.iter().find(|p| p.owner == rank)?;
                Some((name.clone(), piece.range.clone()))
            })
            .collect()
    }

    /// Every rank that keeps some state.
    pub fn owners(&self) -> BTreeSet<usize> {
        self.pieces.values().flatten().map(|p| p.owner).collect()
    }
}

/// AdamW cut into shards by a [`ShardPlan`]: the shards of the ranks this process runs.
#[derive(Clone, Debug, PartialEq)]
pub struct ShardedAdamW {
    plan: ShardPlan,
    /// By rank.
    shards: BTreeMap<usize, AdamW>,
}

impl ShardedAdamW {
    /// Cuts `whole` (a fresh or restored whole optimizer) into the shards of `local` ranks.
    pub fn new(
        whole: &AdamW,
        plan: ShardPlan,
        local: impl IntoIterator<Item = usize>,
    ) -> Result<Self, OptimError> {
        let parts = whole.parts();
        let mut shards = BTreeMap::new();
        for rank in local {
            let owned = plan.owned_by(rank);
            let mine = parts.iter().filter_map(|part| {
                let range = owned.get(&part.param)?;
                Some(cut(part, range.clone()))
            });
            let shard = AdamW::from_parts(*whole.config(), whole.step_count(), mine)?;
            shards.insert(rank, shard);
        }
        Ok(ShardedAdamW { plan, shards })
    }

    pub fn plan(&self) -> &ShardPlan {
        &self.plan
    }

    /// The shards of this process's ranks, by rank.
    pub fn shards(&self) -> &BTreeMap<usize, AdamW> {
        &self.shards
    }

    pub fn step_count(&self) -> u64 {
        self.shards.values().next().map_or(0, AdamW::step_count)
    }

    /// Every local shard's step ([`AdamW::step_held`]); `grads` holds (at least) every
    /// parameter a local shard has state for.
    pub fn step(
        &mut self,
        params: &mut impl ParamStore,
        grads: &Grads,
        lr: f64,
    ) -> Result<(), OptimError> {
        for shard in self.shards.values() {
            shard.check_params(params)?;
        }
        for shard in self.shards.values_mut() {
            shard.step_held(params, grads, lr)?;
        }
        Ok(())
    }

    /// Bytes of moments each local rank keeps.
    pub fn bytes_per_rank(&self) -> BTreeMap<usize, u64> {
        self.shards
            .iter()
            .map(|(&rank, s)| (rank, s.state_bytes()))
            .collect()
    }

    /// The whole optimizer, joined from the local shards and `remote` parts (the other
    /// ranks'); an error names a parameter whose state is incomplete.
    pub fn joined(&self, remote: Vec<MomentPart>) -> Result<AdamW, OptimError> {
        let config = match self.shards.values().next() {
            Some(shard) => *shard.config(),
            None => {
                return Err(OptimError::MissingState {
                    tensor: "every shard".into(),
                });
            }
        };
        let parts = self.shards.values().flat_map(AdamW::parts).chain(remote);
        let whole = AdamW::from_parts(config, self.step_count(), parts)?;
        match whole.is_whole() {
            true => Ok(whole),
            false => Err(OptimError::MissingState {
                tensor: "the moments of some parameter's elements (a shard is missing)".into(),
            }),
        }
    }
}

/// The elements `range` of `part` (which covers them).
fn cut(part: &MomentPart, range: Range<usize>) -> MomentPart {
    let local = range.start - part.range.start..range.end - part.range.start;
    MomentPart {
        param: part.param.clone(),
        dims: part.dims.clone(),
        range,
        m: part.m[local.clone()].to_vec(),
        v: part.v[local].to_vec(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::optim::{AdamWConfig, MomentPrecision};
    use crate::tensor::HostTensor;

    fn params() -> BTreeMap<String, HostTensor> {
        [("a", vec![3, 5]), ("b", vec![7]), ("c", vec![2])]
            .into_iter()
            .map(|(n, dims): (&str, Vec<usize>)| {
                let count: usize = dims.iter().product();
                let values = (0..count).map(|i| (i as f32 * 0.37).sin()).collect();
                (n.to_owned(), HostTensor::f32(dims, values))
            })
            .collect()
    }

    fn grads(step: usize) -> Grads {
        params()
            .iter()
            .map(|(n, t)| {
                let g = (0..t.ty.numel())
                    .map(|i| ((i + 7 * step) as f32 * 1.3).cos())
                    .collect();
                (n.clone(), g)
            })
            .collect()
    }

    #[test]
    fn shards_update_bit_for_bit_what_the_whole_optimizer_updates() {
        for moments in [MomentPrecision::F32, MomentPrecision::Bf16] {
            let config = AdamWConfig {
                moments,
                weight_decay: 0.1,
                ..AdamWConfig::default()
            };
            let mut whole_params = params();
            let mut whole =
                AdamW::new(config, whole_params.iter().map(|(n, t)| (n.as_str(), t))).unwrap();
            let sizes = whole_params
                .iter()
                .map(|(n, t)| (n.clone(), t.ty.numel()))
                .collect();
            // `c` (2 elements) on three holders: one of them keeps nothing of it.
            let holders = [
                ("a", vec![0, 1, 2]),
                ("b", vec![0, 1, 2]),
                ("c", vec![0, 1, 2]),
            ]
            .into_iter()
            .map(|(n, h)| (n.to_owned(), h))
            .collect();
            let plan = ShardPlan::new(&sizes, holders, true);
            assert_eq!(plan.owned_by(0)["a"], 0..5);
            assert_eq!(plan.owned_by(2)["b"], 4..7);
            assert!(!plan.owned_by(0).contains_key("c"));
            let mut sharded = ShardedAdamW::new(&whole, plan, 0..3).unwrap();
            let mut sharded_params = params();
            for step in 0..3 {
                whole.step(&mut whole_params, &grads(step), 1e-2).unwrap();
                sharded
                    .step(&mut sharded_params, &grads(step), 1e-2)
                    .unwrap();
            }
            assert_eq!(sharded_params, whole_params);
            assert_eq!(sharded.joined(Vec::new()).unwrap(), whole);
            let bytes: u64 = sharded.bytes_per_rank().values().sum();
            assert_eq!(bytes, whole.state_bytes());
        }
    }

    #[test]
    fn a_missing_shard_is_named_when_joining() {
        let p = params();
        let config = AdamWConfig::default();
        let whole = AdamW::new(config, p.iter().map(|(n, t)| (n.as_str(), t))).unwrap();
        let sizes = p.iter().map(|(n, t)| (n.clone(), t.ty.numel())).collect();
        let holders = p.keys().map(|n| (n.clone(), vec![0, 1])).collect();
        let only_rank_1 =
            ShardedAdamW::new(&whole, ShardPlan::new(&sizes, holders, true), [1]).unwrap();
        let err = only_rank_1.joined(Vec::new()).unwrap_err().to_string();
        assert!(err.contains("a shard is missing"), "{err}");
        // Parts that leave a gap are refused, naming the parameter.
        let mut parts = whole.parts();
        parts[0].range = 1..16;
        let err = AdamW::from_parts(config, 0, parts).unwrap_err().to_string();
        assert!(err.contains("adamw.m.a"), "{err}");
    }
}
