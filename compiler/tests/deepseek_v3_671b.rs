//! The full DeepSeek-V3 configuration builds from shapes alone, with the published counts.

use fathom_compiler::model::{ForwardOptions, ParameterSummary, forward_graph};
use fathom_compiler::spec::hf::spec_from_config_json;

#[test]
fn the_671b_graph_builds_with_hugging_faces_parameter_count() {
    let config = include_str!("../../examples/configs/deepseek-v3-671b.json");
    let spec = spec_from_config_json(config).expect("the hub config loads");
    let options = ForwardOptions {
        batch: 1,
        seq: 4,
        with_mtp: true,
    };
    let graph = forward_graph(&spec, options).expect("the graph builds");
    graph.validate().expect("the built graph re-validates");
    let summary = ParameterSummary::of(&spec, &graph);
    // `DeepseekV3ForCausalLM(config).num_parameters()` in transformers.
    assert_eq!(summary.main, 671_026_404_352);
    // 58 MoE layers x 256 balancing biases are buffers, not parameters.
    assert_eq!(summary.buffers, 59 * 256);
    // The MTP module: one MoE block plus enorm, hnorm, shared_head.norm and eh_proj.
    let mla = 7168 * 1536
        + 1536
        + 1536 * 128 * 192
        + 7168 * 576
        + 512
        + 512 * 128 * 256
        + 128 * 128 * 7168;
    let expert = 3 * 7168 * 2048;
    let moe_block = mla + 256 * 7168 + 256 * expert + expert + 2 * 7168;
    assert_eq!(summary.mtp, moe_block + 3 * 7168 + 7168 * 2 * 7168);
    // The report's "37B activated" (embedding and head included): 248 of the 256 routed
    // experts of each of the 58 MoE layers sit idle for a given token.
    assert_eq!(
        summary.activated_per_token,
        671_026_404_352 - 58 * 248 * expert
    );
    assert_eq!(summary.activated_per_token / 1_000_000_000, 37);
}
