//! Where to report a problem: maps a dotted `ModelSpec` path (`moe.groups`, as serde and
//! `SpecError` name fields) to the tokens the user wrote for it.

use std::collections::HashMap;
use std::fmt::Display;

use proc_macro2::TokenStream;
use quote::ToTokens;

use super::parse::{Diagnostic, ModelInput, Section, ValueKind};

/// The tokens of one written entry.
struct Written {
    key: TokenStream,
    value: TokenStream,
    order: usize,
}

/// Every written entry by dotted path; the model's name stands for the root.
pub struct Locator {
    entries: HashMap<String, Written>,
    name: TokenStream,
}

impl Locator {
    pub fn new(model: &ModelInput) -> Self {
        let mut entries = HashMap::new();
        collect(&model.body, "", &mut entries);
        Locator {
            entries,
            name: model.header.name.to_token_stream(),
        }
    }

    /// An error about the key itself (an unknown field).
    pub fn at_key(&self, path: &str, message: impl Display) -> Diagnostic {
        self.at(path, message, |w| &w.key)
    }

    /// An error about the value written for `path` (wrong type, broken rule).
    pub fn at_value(&self, path: &str, message: impl Display) -> Diagnostic {
        self.at(path, message, |w| &w.value)
    }

    /// An error about a section as a whole (a missing field): at its key, or the model's name for
    /// the root, as rustc points at the struct name for a missing field in a struct literal.
    pub fn at_section(&self, path: &str, message: impl Display) -> Diagnostic {
        self.at(path, message, |w| &w.key)
    }

    /// Reports at `path`'s tokens when it was written, else at the nearest written section around
    /// it (a defaulted field), else at the model's name.
    fn at(
        &self,
        path: &str,
        message: impl Display,
        pick: fn(&Written) -> &TokenStream,
    ) -> Diagnostic {
        if let Some(written) = self.entries.get(path) {
            return Diagnostic {
                order: written.order,
                error: syn::Error::new_spanned(pick(written), message),
            };
        }
        let mut outer = path;
        while let Some((parent, _)) = outer.rsplit_once('.') {
            outer = parent;
            if let Some(written) = self.entries.get(outer) {
                return Diagnostic {
                    order: written.order,
                    error: syn::Error::new_spanned(&written.key, message),
                };
            }
        }
        Diagnostic {
            order: 0,
            error: syn::Error::new_spanned(&self.name, message),
        }
    }

    /// Whether the user wrote `path` (otherwise its value is a default).
    pub fn is_written(&self, path: &str) -> bool {
        self.entries.contains_key(path)
    }
}

fn collect(section: &Section, prefix: &str, out: &mut HashMap<String, Written>) {
    for entry in &section.entries {
        let path = if prefix.is_empty() {
            entry.name.clone()
        } else {
            format!("{prefix}.{}", entry.name)
        };
        if let ValueKind::Section(inner) = &entry.value.kind {
            collect(inner, &path, out);
        }
        out.insert(
            path,
            Written {
                key: entry.key.to_token_stream(),
                value: entry.value.tokens.clone(),
                order: entry.order,
            },
        );
    }
}
