//! Turns a validated `ModelSpec` back into Rust: a struct literal with every field explicit.
//!
//! Each struct is destructured without `..`, so a field added to `ModelSpec` (or its parts) fails
//! to compile here until the macro learns to emit it. Numbers are emitted as suffixed literals;
//! Rust prints an `f64` with the shortest digits that read back to the same value, so floats
//! round-trip exactly.

use fathom_compiler::spec::{Fp8Spec, MlaSpec, ModelSpec, MoeSpec, RopeSpec, YarnSpec};
use proc_macro2::{Literal, TokenStream};
use quote::quote;

/// Something the macro can write as a Rust expression of the same value.
pub trait Emit {
    fn emit(&self) -> TokenStream;
}

impl Emit for usize {
    fn emit(&self) -> TokenStream {
        let lit = Literal::usize_suffixed(*self);
        quote!(#lit)
    }
}

impl Emit for bool {
    fn emit(&self) -> TokenStream {
        quote!(#self)
    }
}

impl Emit for f64 {
    fn emit(&self) -> TokenStream {
        // Deserialized values are finite (JSON has no infinities), but the literal constructor
        // panics on non-finite input, so do not rely on it.
        if self.is_nan() {
            return quote!(::core::f64::NAN);
        }
        if self.is_infinite() {
            let sign = self.is_sign_negative().then(|| quote!(-));
            return quote!(#sign ::core::f64::INFINITY);
        }
        // Negated explicitly: a negative literal token does not survive every token round trip.
        // `-0.0f64` keeps the sign of negative zero.
        let lit = Literal::f64_suffixed(self.abs());
        if self.is_sign_negative() {
            quote!(-#lit)
        } else {
            quote!(#lit)
        }
    }
}

impl<T: Emit> Emit for Option<T> {
    fn emit(&self) -> TokenStream {
        match self {
            Some(value) => {
                let value = value.emit();
                quote!(::core::option::Option::Some(#value))
            }
            None => quote!(::core::option::Option::None),
        }
    }
}

/// Implements `Emit` for a spec struct as `::fathom::compiler::spec::Name { field: value, ... }`.
/// The field list must be complete: the destructuring has no `..`.
macro_rules! emit_struct {
    ($ty:ident { $($field:ident),* $(,)? }) => {
        impl Emit for $ty {
            fn emit(&self) -> TokenStream {
                let $ty { $($field),* } = self;
                $(let $field = Emit::emit($field);)*
                quote!(::fathom::compiler::spec::$ty { $($field: #$field),* })
            }
        }
    };
}

emit_struct!(ModelSpec {
    vocab_size,
    hidden_size,
    layers,
    dense_layers,
    intermediate_size,
    norm_eps,
    max_positions,
    tie_embeddings,
    initializer_range,
    attention,
    rope,
    moe,
    mtp_depth,
    fp8,
});

emit_struct!(MlaSpec {
    heads,
    q_lora_rank,
    kv_lora_rank,
    qk_nope_head_dim,
    qk_rope_head_dim,
    v_head_dim,
});

emit_struct!(RopeSpec {
    theta,
    interleaved,
    yarn,
});

emit_struct!(YarnSpec {
    factor,
    original_max_positions,
    beta_fast,
    beta_slow,
    mscale,
    mscale_all_dim,
    attention_factor,
    truncate,
});

emit_struct!(MoeSpec {
    routed_experts,
    shared_experts,
    experts_per_token,
    groups,
    groups_per_token,
    intermediate_size,
    routed_scaling_factor,
    normalize_gates,
});

emit_struct!(Fp8Spec {
    activation_tile,
    weight_block,
});
