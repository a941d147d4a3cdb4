//! The `#[module(...)]` attributes of a `#[derive(Module)]` struct and of its fields.
//!
//! Problems are collected rather than returned at the first one, so that a user fixing a struct
//! sees every wrong attribute in one build.

use proc_macro2::{Span, TokenStream};
use quote::ToTokens;
use syn::ext::IdentExt;
use syn::meta::ParseNestedMeta;
use syn::spanned::Spanned;
use syn::{Attribute, Expr, ExprLit, Field, Ident, Lit, LitStr, Token, Type};

/// Accumulates errors; `finish` returns them combined.
#[derive(Default)]
pub struct Errors(Option<syn::Error>);

impl Errors {
    pub fn push(&mut self, error: syn::Error) {
        match &mut self.0 {
            Some(all) => all.combine(error),
            None => self.0 = Some(error),
        }
    }

    pub fn finish(self) -> syn::Result<()> {
        self.0.map_or(Ok(()), Err)
    }
}

/// `#[module(config = Type, debug)]` on the struct.
#[derive(Default)]
pub struct ContainerAttrs {
    pub config: Option<Type>,
    pub debug: bool,
}

impl ContainerAttrs {
    pub fn read(attrs: &[Attribute], errors: &mut Errors) -> Self {
        let mut out = ContainerAttrs::default();
        let mut seen = Seen::default();
        for attr in module_attrs(attrs) {
            let parsed = attr.parse_nested_meta(|meta| {
                let key = seen.key(&meta, errors)?;
                match key.as_str() {
                    "config" => out.config = Some(meta.value()?.parse()?),
                    "debug" => {
                        flag(&meta)?;
                        out.debug = true;
                    }
                    _ => return Err(unknown(&meta, &key, "`config` or `debug`")),
                }
                Ok(())
            });
            if let Err(error) = parsed {
                errors.push(error);
            }
        }
        out
    }
}

/// How one field is declared.
pub struct FieldPlan<'a> {
    pub ident: &'a Ident,
    pub ty: &'a Type,
    /// The checkpoint name under the parent's path; `""` flattens into the parent.
    pub name: String,
    /// Where the name came from (the string, or the field's name), for duplicate-name errors.
    pub name_tokens: TokenStream,
    /// The `config = ...` expression; `()` when absent.
    pub config: Option<Expr>,
    /// Not declared (`Default::default()`) and not visited.
    pub skip: bool,
}

impl<'a> FieldPlan<'a> {
    /// Reads a named field's attributes; `None` for a tuple field (rejected by the caller).
    pub fn read(field: &'a Field, errors: &mut Errors) -> Option<Self> {
        let ident = field.ident.as_ref()?;
        let mut name: Option<LitStr> = None;
        let mut config: Option<Expr> = None;
        let mut skip = false;
        // Keys with their spans, to point at the one that contradicts `skip`.
        let mut declared_with: Vec<(String, Span)> = Vec::new();
        let mut seen = Seen::default();
        for attr in module_attrs(&field.attrs) {
            let parsed = attr.parse_nested_meta(|meta| {
                let key = seen.key(&meta, errors)?;
                match key.as_str() {
                    "name" => {
                        let lit = string(meta.value()?.parse()?)?;
                        check_name(&lit)?;
                        name = Some(lit);
                    }
                    "config" => config = Some(meta.value()?.parse()?),
                    "skip" => flag(&meta)?,
                    _ => return Err(unknown(&meta, &key, "`name`, `config` or `skip`")),
                }
                if key == "skip" {
                    skip = true;
                } else {
                    declared_with.push((key, meta.path.span()));
                }
                Ok(())
            });
            if let Err(error) = parsed {
                errors.push(error);
            }
        }
        if skip {
            for (key, span) in &declared_with {
                let message = format!(
                    "`{key}` has no effect on a `skip` field: skipped fields are not declared"
                );
                errors.push(syn::Error::new(*span, message));
            }
        }
        let name_tokens = match &name {
            Some(lit) => lit.to_token_stream(),
            None => ident.to_token_stream(),
        };
        Some(FieldPlan {
            ident,
            ty: &field.ty,
            name: name.map_or_else(|| ident.unraw().to_string(), |lit| lit.value()),
            name_tokens,
            config,
            skip,
        })
    }
}

fn module_attrs(attrs: &[Attribute]) -> impl Iterator<Item = &Attribute> {
    attrs.iter().filter(|attr| attr.path().is_ident("module"))
}

/// Keys already given, over all `#[module]` attributes of one item.
#[derive(Default)]
struct Seen(Vec<String>);

impl Seen {
    /// The key of `meta` as a string; a duplicate is recorded (and then read again, harmlessly).
    fn key(&mut self, meta: &ParseNestedMeta<'_>, errors: &mut Errors) -> syn::Result<String> {
        let key = match meta.path.get_ident() {
            Some(ident) => ident.unraw().to_string(),
            None => return Err(meta.error("expected a key such as `config`")),
        };
        if self.0.contains(&key) {
            errors.push(meta.error(format!("duplicate `{key}` key")));
        } else {
            self.0.push(key.clone());
        }
        Ok(key)
    }
}

fn unknown(meta: &ParseNestedMeta<'_>, key: &str, expected: &str) -> syn::Error {
    meta.error(format!("unknown `module` key `{key}`; expected {expected}"))
}

/// A key without a value (`skip`, `debug`).
fn flag(meta: &ParseNestedMeta<'_>) -> syn::Result<()> {
    if meta.input.peek(Token![=]) || !meta.input.is_empty() && !meta.input.peek(Token![,]) {
        let key = meta.path.to_token_stream();
        return Err(meta.error(format!("`{key}` takes no value")));
    }
    Ok(())
}

fn string(expr: Expr) -> syn::Result<LitStr> {
    match expr {
        Expr::Lit(ExprLit {
            lit: Lit::Str(lit), ..
        }) => Ok(lit),
        other => Err(syn::Error::new_spanned(
            other,
            "expected a string literal: `name = \"self_attn\"`",
        )),
    }
}

/// Checkpoint names are dot-separated parts without whitespace; `""` alone means "the parent's
/// own scope" (to flatten a sub-module's parameters into its parent).
fn check_name(lit: &LitStr) -> syn::Result<()> {
    let name = lit.value();
    if name.is_empty() {
        return Ok(());
    }
    if name.chars().any(char::is_whitespace) || name.split('.').any(str::is_empty) {
        let message = format!(
            "invalid checkpoint name {name:?}: use dot-separated parts without spaces \
             (`\"mlp.gate\"`), or `\"\"` to declare the field in the parent's scope"
        );
        return Err(syn::Error::new(lit.span(), message));
    }
    Ok(())
}
