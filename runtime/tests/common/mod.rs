//! What several integration tests load: a `transformers` fixture's model and a training step on
//! its reference batch.

#![allow(dead_code)] // each test crate uses its own part

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use fathom_compiler::model::LossWeights;
use fathom_compiler::training::{TrainingGraph, training_graph};
use fathom_runtime::HostTensor;
use fathom_runtime::pretrained::Pretrained;
use fathom_runtime::weights::read_safetensors;

/// The directory of fixture `name` (tests/fixtures, written by scripts/fixtures/make_fixtures.py).
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name)
}

/// A fixture's model, the training graph of its reference batch, and that batch as the
/// graph's `input_ids`.
pub struct FixtureStep {
    pub model: Pretrained,
    pub train: TrainingGraph,
    pub inputs: HashMap<&'static str, HostTensor>,
}

impl FixtureStep {
    pub fn load(name: &str, losses: LossWeights) -> FixtureStep {
        let dir = fixture(name);
        let model = Pretrained::load(&dir).unwrap_or_else(|e| panic!("{name}: {e}"));
        let reference = read_safetensors(&dir.join("reference.safetensors"))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let ids = reference
            .get("input_ids")
            .unwrap_or_else(|| panic!("{name}: no input_ids"))
            .clone();
        let (batch, seq) = (ids.dims()[0], ids.dims()[1]);
        let train = training_graph(&model.spec, batch, seq, losses)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        FixtureStep {
            model,
            train,
            inputs: HashMap::from([("input_ids", ids)]),
        }
    }
}
