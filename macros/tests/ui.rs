//! Compile-fail tests: each file in `ui/` is a wrong declaration, and its `.stderr` is what the
//! user sees. Regenerate with `TRYBUILD=overwrite cargo test -p fathom-macros --test ui`, then
//! read every changed `.stderr`: each error must point at the token to fix.

#[test]
fn ui() {
    trybuild::TestCases::new().compile_fail("tests/ui/*.rs");
}
