//! `#[derive(Module)]`: writes `Module::declare` (one `scope.declare` per field, under its
//! checkpoint name) and `Module::visit_parameters` (the fields in order).
//!
//! The macro stays thin: it emits builder calls with the user's own tokens and spans, so that a
//! config of the wrong type is reported by rustc at the user's `config = ...` expression, and a
//! field type that is not a `Module` at the field's type.

mod attrs;

use std::collections::HashMap;

use proc_macro2::{Span, TokenStream};
use quote::{quote, quote_spanned};
use syn::spanned::Spanned;
use syn::{Data, DeriveInput, Fields, FieldsNamed, Ident};

use crate::debug;
use attrs::{ContainerAttrs, Errors, FieldPlan};

/// Expands `#[derive(Module)]` on `input`.
pub fn expand_module(input: DeriveInput) -> syn::Result<TokenStream> {
    let fields = named_fields(&input)?;
    let mut errors = Errors::default();
    let container = ContainerAttrs::read(&input.attrs, &mut errors);
    let plans: Vec<FieldPlan<'_>> = fields
        .named
        .iter()
        .filter_map(|field| FieldPlan::read(field, &mut errors))
        .collect();
    check_unique_names(&plans, &mut errors);
    errors.finish()?;

    // `config` is visible to the user's expressions, so it takes the call site's hygiene; the
    // other bindings are the macro's own and cannot be captured by (or capture) user tokens.
    let config = Ident::new("config", Span::call_site());
    let scope = Ident::new("scope", Span::mixed_site());
    let visit = Ident::new("visit", Span::mixed_site());

    let inits = plans.iter().map(|plan| {
        let FieldPlan {
            ident, ty, name, ..
        } = plan;
        let at = ty.span();
        if plan.skip {
            return quote_spanned!(at=> #ident: ::core::default::Default::default());
        }
        let value = match &plan.config {
            Some(expr) => quote_spanned!(expr.span()=> &(#expr)),
            None => quote_spanned!(at=> &()),
        };
        quote_spanned!(at=> #ident: #scope.declare::<#ty>(#name, #value)?)
    });
    let visits = plans.iter().filter(|plan| !plan.skip).map(|plan| {
        let FieldPlan { ident, ty, .. } = plan;
        quote_spanned! {ty.span()=>
            ::fathom::compiler::module::Module::visit_parameters(&self.#ident, #visit);
        }
    });

    let name = &input.ident;
    let (impl_generics, ty_generics, where_clause) = input.generics.split_for_impl();
    let config_ty = match &container.config {
        Some(ty) => quote!(#ty),
        None => quote!(()),
    };
    let output = quote! {
        impl #impl_generics ::fathom::compiler::module::Module for #name #ty_generics #where_clause {
            type Config = #config_ty;

            // A struct whose fields ignore the config, or have no parameters, leaves these unused.
            #[allow(unused_variables)]
            fn declare(
                #scope: &mut ::fathom::compiler::module::Scope<'_>,
                #config: &Self::Config,
            ) -> ::core::result::Result<Self, ::fathom::compiler::GraphError> {
                ::core::result::Result::Ok(Self { #(#inits,)* })
            }

            #[allow(unused_variables)]
            fn visit_parameters(
                &self,
                #visit: &mut dyn ::core::ops::FnMut(&::fathom::compiler::module::Param),
            ) {
                #(#visits)*
            }
        }
    };
    if container.debug {
        debug::print("#[derive(Module)]", &name.to_string(), &output);
    }
    Ok(output)
}

/// The fields of a struct with named fields; anything else is an error at its keyword or fields.
fn named_fields(input: &DeriveInput) -> syn::Result<&FieldsNamed> {
    const WHY: &str = "each field is a parameter or sub-module, and its name is the default \
                       checkpoint name";
    match &input.data {
        Data::Struct(data) => match &data.fields {
            Fields::Named(fields) => Ok(fields),
            Fields::Unnamed(fields) => Err(syn::Error::new(
                fields.paren_token.span.join(),
                format!("`#[derive(Module)]` needs named fields, not a tuple struct: {WHY}"),
            )),
            Fields::Unit => Err(syn::Error::new(
                input.ident.span(),
                format!("`#[derive(Module)]` needs a struct with named fields: {WHY}"),
            )),
        },
        Data::Enum(data) => Err(syn::Error::new(
            data.enum_token.span,
            format!("`#[derive(Module)]` needs a struct with named fields, not an enum: {WHY}"),
        )),
        Data::Union(data) => Err(syn::Error::new(
            data.union_token.span,
            format!("`#[derive(Module)]` needs a struct with named fields, not a union: {WHY}"),
        )),
    }
}

/// Two fields declared under one name would declare the same parameters twice. `""` (flattened)
/// fields are exempt: their parameters' own names tell them apart.
fn check_unique_names(plans: &[FieldPlan<'_>], errors: &mut Errors) {
    let mut first: HashMap<&str, &Ident> = HashMap::new();
    for plan in plans
        .iter()
        .filter(|plan| !plan.skip && !plan.name.is_empty())
    {
        if let Some(other) = first.get(plan.name.as_str()) {
            let message = format!(
                "checkpoint name `{}` is already used by field `{other}`",
                plan.name
            );
            errors.push(syn::Error::new_spanned(&plan.name_tokens, message));
        } else {
            first.insert(&plan.name, plan.ident);
        }
    }
}
