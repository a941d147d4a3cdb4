//! The `debug` flag: show what a macro expanded to, formatted, on the compiler's stderr (as
//! CubeCL's macros do), so a user can read the generated code without `cargo expand`.

use proc_macro2::TokenStream;

/// Formats an expansion as Rust source; falls back to the raw tokens when they are not a file
/// (an expansion that carries `compile_error!`s is still a file, so this is rare).
pub fn pretty(tokens: &TokenStream) -> String {
    match syn::parse2::<syn::File>(tokens.clone()) {
        Ok(file) => prettyplease::unparse(&file),
        Err(_) => tokens.to_string(),
    }
}

/// Prints the expansion of `macro_name` for `item`.
pub fn print(macro_name: &str, item: &str, tokens: &TokenStream) {
    eprintln!(
        "---- {macro_name} expansion of `{item}` ----\n{}",
        pretty(tokens)
    );
}
