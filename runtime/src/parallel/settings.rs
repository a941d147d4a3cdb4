//! How a run is split across pipeline ranks.

use fathom_compiler::pipeline::Method;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Pipeline parallelism of a run. The default, one stage, is no pipeline at all.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineSettings {
    /// Pipeline stages (the report's PP). DualPipeV runs them on `stages / 2` ranks, the other
    /// schedules on `stages` ranks.
    #[serde(default = "one")]
    pub stages: usize,
    /// `1f1b`, `zb1p`, `dualpipe` or `dualpipev`.
    #[serde(default = "one_f_one_b", with = "method_name")]
    pub schedule: Method,
    /// Data-parallel replicas of the pipeline, each on its own micro-batches, their
    /// gradients all-reduced (the `--dp` of the CLI).
    #[serde(default = "one")]
    pub data_parallel: usize,
    /// Expert parallelism: groups of this many data-parallel replicas share their routed
    /// experts, each replica owning `experts / expert_parallel` of every MoE layer and running
    /// their GEMMs for the whole group's tokens (the `--ep` of the CLI). Divides
    /// `data_parallel`.
    #[serde(default = "one")]
    pub expert_parallel: usize,
    /// How long a rank waits for a message before it reports its peer as stalled.
    #[serde(default = "default_timeout")]
    pub timeout_seconds: f64,
    /// ZeRO stage: 1 (the default) shards the AdamW moments over the ranks holding each
    /// parameter (its data-parallel replicas, DualPipe's two copies), each updating its share
    /// of the elements and sending the new weights to the others; 0 keeps each parameter's
    /// whole state on its first holder. Both compute the same bits; 1 needs 1/holders of the
    /// memory per rank.
    #[serde(default = "one_u8")]
    pub zero: u8,
}

impl Default for PipelineSettings {
    fn default() -> Self {
        PipelineSettings {
            stages: 1,
            schedule: Method::OneFOneB,
            data_parallel: 1,
            expert_parallel: 1,
            timeout_seconds: default_timeout(),
            zero: 1,
        }
    }
}

impl PipelineSettings {
    /// Whether the run is split over more than one rank.
    pub fn is_parallel(&self) -> bool {
        self.stages > 1 || self.data_parallel > 1
    }
}

fn one() -> usize {
    1
}

fn one_u8() -> u8 {
    1
}

fn one_f_one_b() -> Method {
    Method::OneFOneB
}

fn default_timeout() -> f64 {
    600.0
}

/// The schedule by its CLI name (`dualpipe`), not its Rust variant name.
mod method_name {
    use super::*;

    pub fn serialize<S: Serializer>(method: &Method, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(method.name())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Method, D::Error> {
        let name = String::deserialize(d)?;
        name.parse().map_err(serde::de::Error::custom)
    }
}
