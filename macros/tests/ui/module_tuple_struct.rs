use fathom_compiler::module::Param;

#[derive(fathom_macros::Module)]
struct Linear(Param, Param);

fn main() {}
