//! `#[derive(Module)]` expansion snapshots.

use crate::debug::pretty;
use crate::module::expand_module;

fn derive(source: &str) -> String {
    let input = syn::parse_str(source).expect("test input is a struct");
    match expand_module(input) {
        Ok(tokens) => pretty(&tokens),
        Err(error) => panic!("unexpected error: {error}"),
    }
}

fn derive_error(source: &str) -> String {
    let input = syn::parse_str(source).expect("test input is an item");
    match expand_module(input) {
        Ok(tokens) => panic!("expected an error, got {tokens}"),
        Err(error) => error
            .into_iter()
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join("\n"),
    }
}

#[test]
fn the_documented_example() {
    insta::assert_snapshot!(derive(
        r#"
        #[module(config = ModelSpec)]
        struct PostNormBlock {
            #[module(name = "self_attn", config = MlaConfig::from_spec(config))]
            attention: Mla,
            #[module(name = "post_attention_layernorm", config = config.hidden_size)]
            norm: RmsNorm,
            #[module(config = [config.hidden_size])]
            gain: Param,
            #[module(name = "experts", config = (4, ExpertConfig { width: 8 }))]
            experts: Vec<Expert>,
            #[module(skip)]
            cache: Option<Tensor>,
            #[module(name = "")]
            flattened: Extra,
        }
        "#
    ));
}

#[test]
fn a_generic_struct() {
    insta::assert_snapshot!(derive(
        r#"
        #[module(config = M::Config)]
        pub struct Pair<'a, M: Module, const N: usize>
        where
            M::Config: Sized,
        {
            #[module(config = *config)]
            left: M,
            #[module(config = *config)]
            right: M,
            #[module(skip)]
            marker: PhantomData<&'a [u8; N]>,
        }
        "#
    ));
}

#[test]
fn an_empty_struct_has_no_parameters() {
    insta::assert_snapshot!(derive("struct Nothing {}"));
}

#[test]
fn attribute_errors_are_all_reported() {
    insta::assert_snapshot!(derive_error(
        r#"
        #[module(config = (), confg = 1)]
        struct Bad {
            #[module(nmae = "x")]
            a: Param,
            #[module(name = 5)]
            b: Param,
            #[module(name = "with space")]
            c: Param,
            #[module(name = "d.")]
            d: Param,
            #[module(config = 1, config = 2)]
            e: Param,
            #[module(skip, config = 1)]
            f: Param,
            #[module(skip = true)]
            g: Param,
            #[module(name = "e")]
            h: Param,
        }
        "#
    ));
}

#[test]
fn the_debug_flag_only_prints() {
    let plain =
        derive("#[module(config = usize)] struct S { #[module(config = [*config])] w: Param }");
    let debugged = derive(
        "#[module(config = usize, debug)] struct S { #[module(config = [*config])] w: Param }",
    );
    assert_eq!(plain, debugged);
}
