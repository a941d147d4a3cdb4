//! Fathom's procedural macros: `model!` declares an architecture (a validated `ModelSpec`) and
//! `#[derive(Module)]` writes the declaration of a user-defined module.
//!
//! Both are thin: the entry points below only convert between `proc_macro` and `proc_macro2`, and
//! the logic lives in plain functions over `proc_macro2` tokens so that unit tests can call it.
//! Every problem is reported as a spanned `compile_error!`, never as a panic.

use proc_macro::TokenStream;

mod debug;
mod model;
mod module;

#[cfg(test)]
mod tests;

/// Declares a model architecture: a unit struct implementing
/// `fathom::compiler::spec::Architecture`, whose `spec()` returns the declared `ModelSpec`.
///
/// ```ignore
/// fathom::model! {
///     /// A tiny DeepSeek-V3.
///     pub TinyV3 {
///         vocab_size: 256,
///         hidden_size: 64,
///         layers: 2,
///         intermediate_size: 128,
///         attention: { heads: 4, q_lora_rank: none, kv_lora_rank: 16,
///                      qk_nope_head_dim: 16, qk_rope_head_dim: 8, v_head_dim: 16 },
///         moe: { routed_experts: 8, experts_per_token: 2, intermediate_size: 32 },
///     }
/// }
/// ```
///
/// Keys are `ModelSpec`'s field names, nested sections are `{ ... }`, values are literals or
/// `none` for an absent optional section. Omitted optional fields take `ModelSpec`'s defaults.
/// The declaration is checked with `ModelSpec::validate` while compiling, and every broken rule
/// is reported at the field to fix. `#[debug]` before the name prints the expansion.
#[proc_macro]
pub fn model(input: TokenStream) -> TokenStream {
    model::expand_model(input.into()).into()
}

/// Implements `fathom::compiler::module::Module` for a struct of parameters and sub-modules.
///
/// On the struct: `#[module(config = Type)]` (default `()`), and the flag `debug`. On a field:
/// `name = "checkpoint_name"` (default: the field's name; `""` declares the field in the parent's
/// scope), `config = expr` (default `()`; the struct's config is in scope as `config`) and
/// `skip` (not declared, initialised with `Default::default()`, not visited).
#[proc_macro_derive(Module, attributes(module))]
pub fn derive_module(input: TokenStream) -> TokenStream {
    let input = syn::parse_macro_input!(input as syn::DeriveInput);
    module::expand_module(input)
        .unwrap_or_else(syn::Error::into_compile_error)
        .into()
}
