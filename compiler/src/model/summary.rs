//! Parameter counts of a built model, as Hugging Face and the DeepSeek-V3 report count them.

use std::fmt;

use crate::graph::Graph;
use crate::spec::ModelSpec;

/// Parameter counts of a model graph. Buffers (the balancing bias) are not parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParameterSummary {
    /// The main model, embedding and head included, MTP modules excluded: what HF's
    /// `num_parameters()` reports for a DeepseekV3ForCausalLM (671,026,404,352 for V3).
    pub main: u64,
    /// The MTP modules' own parameters (they share the embedding and head with the main model).
    pub mtp: u64,
    /// Parameters of the main model one token uses: everything but the routed experts it was
    /// not sent to.
    pub activated_per_token: u64,
    /// Elements of non-trainable buffers.
    pub buffers: u64,
}

impl ParameterSummary {
    pub fn of(spec: &ModelSpec, graph: &Graph) -> Self {
        let mut s = ParameterSummary {
            main: 0,
            mtp: 0,
            activated_per_token: 0,
            buffers: 0,
        };
        let mut routed = 0u64;
        for (id, name, ty) in graph.parameters() {
            let n = ty.numel() as u64;
            if !graph.is_trainable(id) {
                s.buffers += n;
            } else if layer_index(name).is_some_and(|i| i >= spec.layers) {
                s.mtp += n;
            } else {
                s.main += n;
                if name.contains(".mlp.experts.") {
                    routed += n;
                }
            }
        }
        let (chosen, experts) = spec.moe.as_ref().map_or((0, 1), |m| {
            (m.experts_per_token as u64, m.routed_experts as u64)
        });
        s.activated_per_token = s.main - routed + routed / experts * chosen;
        s
    }

    /// Main model plus MTP modules.
    pub fn total(&self) -> u64 {
        self.main + self.mtp
    }
}

/// `N` in `model.layers.N.…`.
fn layer_index(name: &str) -> Option<usize> {
    let rest = name.strip_prefix("model.layers.")?;
    rest.split('.').next()?.parse().ok()
}

impl fmt::Display for ParameterSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "parameters (main model):   {:>19}", grouped(self.main))?;
        writeln!(f, "parameters (MTP modules):  {:>19}", grouped(self.mtp))?;
        writeln!(
            f,
            "parameters (total):        {:>19}",
            grouped(self.total())
        )?;
        writeln!(
            f,
            "activated per token:       {:>19}",
            grouped(self.activated_per_token)
        )?;
        write!(
            f,
            "buffers (not parameters):  {:>19}",
            grouped(self.buffers)
        )
    }
}

/// `671026404352` -> `671,026,404,352`.
pub fn grouped(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}
