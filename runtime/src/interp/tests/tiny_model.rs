//! The model library's tiny DeepSeek-V3 end to end: the interpreter runs it deterministically.

use fathom_compiler::model::{ForwardOptions, forward_graph};
use fathom_compiler::spec::hf::spec_from_config_json;

use super::*;
use crate::init::init_parameters;

#[test]
fn a_tiny_deepseek_v3_runs_deterministically() -> TestResult {
    let config = include_str!("../../../../tests/fixtures/moe_grouped/config.json");
    let spec = spec_from_config_json(config)?;
    let (batch, seq) = (2, 16);
    let options = ForwardOptions {
        batch,
        seq,
        with_mtp: true,
    };
    let graph = forward_graph(&spec, options)?;
    let parameters = init_parameters(&graph, 0.2, 7);
    let ids: Vec<i64> = (0..(batch * seq) as i64)
        .map(|i| (i * 37 + 11) % 64)
        .collect();
    let inputs = HashMap::from([("input_ids", HostTensor::i64([batch, seq], ids))]);
    let feeds = Feeds::new(&inputs, &parameters);

    let first = evaluate(&graph, &feeds)?;
    let logits = first.get("logits").ok_or("logits")?;
    assert_eq!(logits.dims(), [batch, seq, spec.vocab_size]);
    assert!(
        logits
            .as_f32()
            .ok_or("floats")?
            .iter()
            .all(|v| v.is_finite())
    );
    let mtp = first.get("mtp_logits.1").ok_or("mtp logits")?;
    assert_eq!(mtp.dims(), [batch, seq - 1, spec.vocab_size]);
    let second = evaluate(&graph, &feeds)?;
    assert_eq!(first, second, "bit-identical on a second run");
    Ok(())
}
