//! The syntax of `model!`: `attrs* vis Name { key: value, ... }`, read into a tree that keeps the
//! span of every key and value, so that later errors (from serde or from `ModelSpec::validate`)
//! can point at the token to fix.
//!
//! Values are read as raw token trees up to the next `,` and classified here, rather than parsed
//! as `syn::Expr`: the accepted language is only literals and `none`, and this way no input, however
//! deeply nested, can make the parser recurse.

use std::collections::BTreeSet;

use proc_macro2::{Delimiter, Span, TokenStream, TokenTree};
use quote::ToTokens;
use serde_json::Value as Json;
use syn::ext::IdentExt;
use syn::parse::{ParseStream, Parser};
use syn::{Attribute, Ident, Lit, Token, Visibility, braced};

/// Sections nest this deep at most (ModelSpec nests 2: `rope.yarn`), so hostile input cannot
/// exhaust the stack.
const MAX_DEPTH: usize = 8;

/// Everything before the body: enough to declare the struct even when the body is broken.
pub struct Header {
    /// The user's attributes (docs, `cfg`, ...), put on the struct; `#[debug]` is removed.
    pub attrs: Vec<Attribute>,
    /// `#[debug]` was given: print the expansion.
    pub debug: bool,
    pub vis: Visibility,
    pub name: Ident,
}

/// A parsed `model!` invocation.
pub struct ModelInput {
    pub header: Header,
    pub body: Section,
    /// Problems that did not stop the reading (duplicates, non-literal values), so that the user
    /// sees them all at once.
    pub errors: Vec<Diagnostic>,
    /// Dotted paths of entries left out of `body` because their value was unusable: serde must
    /// not report them again as missing.
    pub dropped: BTreeSet<String>,
}

/// An error with the source position (pre-order index of its entry) used to sort the report.
#[derive(Clone)]
pub struct Diagnostic {
    pub order: usize,
    pub error: syn::Error,
}

/// The entries of one `{ ... }`, in source order, without duplicates.
#[derive(Default)]
pub struct Section {
    pub entries: Vec<Entry>,
}

pub struct Entry {
    pub key: Ident,
    /// The key as serde sees it (`r#type` is `type`).
    pub name: String,
    pub value: Value,
    /// Pre-order index in the declaration: errors are reported in source order.
    pub order: usize,
}

pub struct Value {
    /// The value's tokens (a section's whole brace group), for spanning errors over all of it.
    pub tokens: TokenStream,
    pub kind: ValueKind,
}

pub enum ValueKind {
    Scalar(Json),
    Section(Section),
}

/// What [`read`] found.
pub enum Read {
    Model(ModelInput),
    /// A syntax error, with the header when it could be read, so that the struct is still
    /// declared and uses of it elsewhere do not cascade into errors.
    Broken {
        header: Option<Header>,
        error: syn::Error,
    },
}

/// Reads a whole invocation.
pub fn read(input: TokenStream) -> Read {
    let full = |input: ParseStream| {
        let (header, mut errors) = header(input)?;
        let content;
        braced!(content in input);
        let mut reader = Reader {
            errors: Vec::new(),
            dropped: BTreeSet::new(),
            next_order: 1,
        };
        let body = reader.section(&content, "", 0)?;
        errors.append(&mut reader.errors);
        Ok(ModelInput {
            header,
            body,
            errors,
            dropped: reader.dropped,
        })
    };
    let error = match full.parse2(input.clone()) {
        Ok(model) => return Read::Model(model),
        Err(error) => error,
    };
    let header_only = |input: ParseStream| {
        let (header, _) = header(input)?;
        // The body is what failed: skip it.
        input.step(|cursor| {
            let mut rest = *cursor;
            while let Some((_, next)) = rest.token_tree() {
                rest = next;
            }
            Ok(((), rest))
        })?;
        Ok(header)
    };
    Read::Broken {
        header: header_only.parse2(input).ok(),
        error,
    }
}

fn header(input: ParseStream) -> syn::Result<(Header, Vec<Diagnostic>)> {
    let mut attrs = input.call(Attribute::parse_outer)?;
    let mut debug = false;
    let mut errors = Vec::new();
    attrs.retain(|attr| {
        if !attr.path().is_ident("debug") {
            return true;
        }
        debug = true;
        if let Err(error) = attr.meta.require_path_only() {
            errors.push(Diagnostic { order: 0, error });
        }
        false
    });
    let vis = input.parse()?;
    let name = input.parse()?;
    Ok((
        Header {
            attrs,
            debug,
            vis,
            name,
        },
        errors,
    ))
}

struct Reader {
    errors: Vec<Diagnostic>,
    dropped: BTreeSet<String>,
    next_order: usize,
}

impl Reader {
    fn section(&mut self, input: ParseStream, prefix: &str, depth: usize) -> syn::Result<Section> {
        let mut entries: Vec<Entry> = Vec::new();
        // Every key read at this level, including dropped ones, to catch all duplicates.
        let mut seen: Vec<Ident> = Vec::new();
        while !input.is_empty() {
            // Keywords are accepted as keys so that `type: 1` is "unknown field", not a parse error.
            let key = input.call(Ident::parse_any)?;
            let colon: Token![:] = input.parse()?;
            let name = key.unraw().to_string();
            let path = if prefix.is_empty() {
                name.clone()
            } else {
                format!("{prefix}.{name}")
            };
            let order = self.next_order;
            self.next_order += 1;

            let value = if input.peek(syn::token::Brace) {
                if depth + 1 >= MAX_DEPTH {
                    return Err(syn::Error::new(
                        key.span(),
                        "sections are nested too deeply",
                    ));
                }
                let group: TokenTree = input.fork().parse()?;
                let content;
                braced!(content in input);
                let section = self.section(&content, &path, depth + 1)?;
                Some(Value {
                    tokens: group.into_token_stream(),
                    kind: ValueKind::Section(section),
                })
            } else {
                let mut tokens = TokenStream::new();
                while !input.is_empty() && !input.peek(Token![,]) {
                    tokens.extend([input.parse::<TokenTree>()?]);
                }
                if tokens.is_empty() {
                    let error =
                        syn::Error::new(colon.span, format!("expected a value for `{name}`"));
                    return Err(error);
                }
                match scalar(&tokens) {
                    Ok(json) => Some(Value {
                        tokens,
                        kind: ValueKind::Scalar(json),
                    }),
                    Err(error) => {
                        self.errors.push(Diagnostic { order, error });
                        self.dropped.insert(path);
                        None
                    }
                }
            };
            if !input.is_empty() {
                input.parse::<Token![,]>()?;
            }

            if let Some(first) = seen.iter().find(|k| k.unraw() == key.unraw()) {
                let at = location(first.span()).map(|l| format!(", first given at {l}"));
                let message = format!("duplicate field `{name}`{}", at.unwrap_or_default());
                self.errors.push(Diagnostic {
                    order,
                    error: syn::Error::new(key.span(), message),
                });
                continue;
            }
            seen.push(key.clone());
            if let Some(value) = value {
                entries.push(Entry {
                    key,
                    name,
                    value,
                    order,
                });
            }
        }
        Ok(Section { entries })
    }
}

/// `line L, column C` of a span, when the compiler tells (rustc 1.88+ does).
fn location(span: Span) -> Option<String> {
    let start = span.start();
    (start.line > 0).then(|| format!("line {}, column {}", start.line, start.column + 1))
}

/// Classifies one value: a literal, a negated number, or `none`.
fn scalar(tokens: &TokenStream) -> syn::Result<Json> {
    let trees: Vec<TokenTree> = tokens.clone().into_iter().collect();
    match trees.as_slice() {
        [TokenTree::Literal(lit)] => literal(&Lit::new(lit.clone()), false),
        [TokenTree::Punct(minus), TokenTree::Literal(lit)] if minus.as_char() == '-' => {
            match Lit::new(lit.clone()) {
                number @ (Lit::Int(_) | Lit::Float(_)) => literal(&number, true),
                _ => Err(not_a_literal(tokens)),
            }
        }
        [TokenTree::Ident(ident)] if ident == "none" => Ok(Json::Null),
        [TokenTree::Ident(ident)] if ident == "true" || ident == "false" => {
            Ok(Json::Bool(ident == "true"))
        }
        [TokenTree::Ident(ident)] if ident == "None" => Err(syn::Error::new(
            ident.span(),
            "write `none` (lower case) for an absent optional value",
        )),
        [TokenTree::Ident(ident), TokenTree::Group(_)] if ident == "Some" => {
            Err(syn::Error::new_spanned(
                tokens,
                "write the value itself: optional fields take it without `Some(...)`",
            ))
        }
        // A fragment substituted by `macro_rules!` (`$x:literal`) arrives in an invisible group.
        [TokenTree::Group(group)] if group.delimiter() == Delimiter::None => {
            scalar(&group.stream())
        }
        _ => Err(not_a_literal(tokens)),
    }
}

fn not_a_literal(tokens: &TokenStream) -> syn::Error {
    syn::Error::new_spanned(
        tokens,
        "expected a literal (an integer, a float, `true`/`false` or a string) or `none`; \
         `model!` reads its values while compiling, so constants and expressions cannot be used",
    )
}

fn literal(lit: &Lit, negative: bool) -> syn::Result<Json> {
    let no_suffix = |suffix: &str| {
        if suffix.is_empty() {
            Ok(())
        } else {
            let message = format!("remove the suffix `{suffix}`: the field's type is known");
            Err(syn::Error::new(lit.span(), message))
        }
    };
    match lit {
        Lit::Int(int) => {
            no_suffix(int.suffix())?;
            let out_of_range = || syn::Error::new(int.span(), "integer out of range");
            if negative {
                let value: i64 = format!("-{}", int.base10_digits())
                    .parse()
                    .map_err(|_| out_of_range())?;
                Ok(Json::from(value))
            } else {
                let value: u64 = int.base10_parse().map_err(|_| out_of_range())?;
                Ok(Json::from(value))
            }
        }
        Lit::Float(float) => {
            no_suffix(float.suffix())?;
            let value: f64 = float.base10_parse()?;
            let value = if negative { -value } else { value };
            serde_json::Number::from_f64(value)
                .map(Json::Number)
                .ok_or_else(|| syn::Error::new(float.span(), "not a finite number"))
        }
        Lit::Bool(b) => Ok(Json::Bool(b.value)),
        Lit::Str(s) => {
            no_suffix(s.suffix())?;
            Ok(Json::String(s.value()))
        }
        other => Err(not_a_literal(&other.to_token_stream())),
    }
}

impl Section {
    /// The section as JSON, the form `ModelSpec` deserializes from.
    pub fn to_json(&self) -> Json {
        let map = self
            .entries
            .iter()
            .map(|entry| {
                let value = match &entry.value.kind {
                    ValueKind::Scalar(json) => json.clone(),
                    ValueKind::Section(section) => section.to_json(),
                };
                (entry.name.clone(), value)
            })
            .collect();
        Json::Object(map)
    }
}
