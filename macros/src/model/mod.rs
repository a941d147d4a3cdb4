//! `model!`: a declaration checked against the compiler's own `ModelSpec` rules while compiling.
//!
//! The macro owns no rules of its own. It reads the declaration into a span-keeping tree
//! ([`parse`]), deserializes `ModelSpec` from it through `serde_path_to_error` (so unknown fields,
//! wrong types and missing fields come from serde, with the failing path), runs
//! `ModelSpec::validate`, and maps every path back to the tokens the user wrote ([`spans`]).
//! A valid spec is written back as a plain struct literal ([`emit`]).

mod emit;
mod parse;
mod spans;

use std::collections::BTreeSet;

use fathom_compiler::spec::ModelSpec;
use proc_macro2::TokenStream;
use quote::quote;
use serde_json::Value as Json;

use crate::debug;
use emit::Emit;
use parse::{Diagnostic, Header, ModelInput, Read};
use spans::Locator;

/// Expands one `model!` invocation: the declaration and its `Architecture` impl, or, when the
/// declaration is wrong, the struct alone plus one `compile_error!` per problem.
pub fn expand_model(input: TokenStream) -> TokenStream {
    let (header, checked) = match parse::read(input) {
        Read::Model(model) => {
            let checked = check(&model);
            (model.header, checked)
        }
        Read::Broken {
            header: Some(header),
            error,
        } => (header, Err(vec![error])),
        Read::Broken {
            header: None,
            error,
        } => return error.to_compile_error(),
    };
    let declaration = declare(&header);
    let output = match checked {
        Ok(spec) => {
            let impls = implement(&header, &spec);
            quote!(#declaration #impls)
        }
        Err(errors) => {
            // Just the struct besides the errors: an `impl` would need a spec we do not have, and
            // the struct keeps other uses of the name from failing too.
            let combined = errors.into_iter().reduce(|mut all, next| {
                all.combine(next);
                all
            });
            let errors = combined.map(|e| e.to_compile_error());
            quote!(#declaration #errors)
        }
    };
    if header.debug {
        debug::print("model!", &header.name.to_string(), &output);
    }
    output
}

fn declare(header: &Header) -> TokenStream {
    let Header {
        attrs, vis, name, ..
    } = header;
    quote! {
        #(#attrs)*
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
        #vis struct #name;
    }
}

fn implement(header: &Header, spec: &ModelSpec) -> TokenStream {
    let name = &header.name;
    let name_str = syn::ext::IdentExt::unraw(name).to_string();
    let body = spec.emit();
    quote! {
        impl #name {
            /// The declared hyperparameters, validated when this declaration was compiled.
            pub fn spec() -> ::fathom::compiler::spec::ModelSpec {
                #body
            }
        }

        impl ::fathom::compiler::spec::Architecture for #name {
            const NAME: &'static str = #name_str;

            fn spec() -> ::fathom::compiler::spec::ModelSpec {
                #name::spec()
            }
        }
    }
}

/// The spec, or every problem found, in source order.
fn check(model: &ModelInput) -> Result<ModelSpec, Vec<syn::Error>> {
    let locator = Locator::new(model);
    let mut report: Vec<Diagnostic> = model.errors.clone();
    let mut json = model.body.to_json();
    let mut dropped: BTreeSet<String> = model.dropped.clone();
    // Whether a written value was dropped (only unknown fields can go without changing the spec):
    // then `validate` would judge defaults the user did not choose, so it is not run.
    let mut partial = !dropped.is_empty();
    let mut suggested: BTreeSet<String> = BTreeSet::new();

    // serde stops at the first error. To report several, drop the offending entry and try again;
    // every round removes an entry, so this ends.
    let spec = loop {
        let error = match serde_path_to_error::deserialize::<_, ModelSpec>(json.clone()) {
            Ok(spec) => break Some(spec),
            Err(error) => error,
        };
        let path = dotted(error.path());
        let message = error.inner().to_string();
        if let Some(field) = missing_field(&message) {
            // Not reported when an earlier error explains it: its value was dropped, or an
            // unknown key was already answered with "did you mean `field`?".
            let full = join(&path, field);
            if !dropped.contains(&full) && !suggested.contains(&full) {
                let message = if path.is_empty() {
                    format!("missing required field `{field}`")
                } else {
                    format!("missing required field `{field}` in `{path}`")
                };
                report.push(locator.at_section(&path, message));
            }
            // A required field has no stand-in value: nothing more can be checked.
            break None;
        }
        if !locator.is_written(&path) || !remove(&mut json, &path) {
            report.push(locator.at_value(&path, &message));
            break None;
        }
        if message.starts_with("unknown field") {
            let section = path.rsplit_once('.').map_or("", |(section, _)| section);
            let message = match suggestion(&message) {
                Some(name) => {
                    suggested.insert(join(section, name));
                    format!("{message}; did you mean `{name}`?")
                }
                None => message,
            };
            report.push(locator.at_key(&path, message));
        } else {
            report.push(locator.at_value(&path, &message));
            partial = true;
        }
        dropped.insert(path);
    };

    if let (Some(spec), false) = (&spec, partial) {
        for problem in spec.validate() {
            let message = if locator.is_written(&problem.field) {
                problem.to_string()
            } else {
                format!(
                    "{problem}; `{}` is not written, so it has its default",
                    problem.field
                )
            };
            report.push(locator.at_value(&problem.field, message));
        }
    }
    match spec {
        Some(spec) if report.is_empty() => Ok(spec),
        _ => {
            report.sort_by_key(|d| d.order);
            Err(report.into_iter().map(|d| d.error).collect())
        }
    }
}

/// serde_path_to_error's path as `ModelSpec`'s dotted field names; `""` is the root.
fn dotted(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let parts: Vec<String> = path
        .iter()
        .map(|segment| match segment {
            Segment::Map { key } => key.clone(),
            Segment::Seq { index } => index.to_string(),
            Segment::Enum { variant } => variant.clone(),
            Segment::Unknown => "?".to_owned(),
        })
        .collect();
    parts.join(".")
}

fn join(section: &str, field: &str) -> String {
    if section.is_empty() {
        field.to_owned()
    } else {
        format!("{section}.{field}")
    }
}

/// The field named by serde's "missing field `x`" message.
fn missing_field(message: &str) -> Option<&str> {
    message.strip_prefix("missing field `")?.strip_suffix('`')
}

/// Removes the entry at a dotted path from the JSON tree; false if it is not there.
fn remove(json: &mut Json, path: &str) -> bool {
    let (sections, last) = match path.rsplit_once('.') {
        Some((sections, last)) => (Some(sections), last),
        None => (None, path),
    };
    let mut node = json;
    for key in sections.into_iter().flat_map(|s| s.split('.')) {
        match node.get_mut(key) {
            Some(inner) => node = inner,
            None => return false,
        }
    }
    node.as_object_mut()
        .and_then(|map| map.remove(last))
        .is_some()
}

/// For serde's "unknown field `x`, expected one of `a`, `b`": the expected name that `x` is a
/// likely typo of.
fn suggestion(message: &str) -> Option<&str> {
    // Odd pieces between backticks: the unknown name, then the expected ones.
    let mut names = message.split('`').skip(1).step_by(2);
    let unknown = names.next()?;
    names
        .map(|name| (edit_distance(unknown, name), name))
        .min_by_key(|(distance, _)| *distance)
        .filter(|(distance, _)| *distance <= (unknown.len() / 3).max(1))
        .map(|(_, name)| name)
}

/// Levenshtein distance over bytes (field names are ASCII).
fn edit_distance(a: &str, b: &str) -> usize {
    let b = b.as_bytes();
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.bytes().enumerate() {
        let mut current = vec![i + 1];
        for (j, &cb) in b.iter().enumerate() {
            let substitute = previous[j] + usize::from(ca != cb);
            current.push(substitute.min(previous[j + 1] + 1).min(current[j] + 1));
        }
        previous = current;
    }
    previous[b.len()]
}
