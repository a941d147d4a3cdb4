use fathom_compiler::module::Param;

#[derive(fathom_macros::Module)]
#[module(config = usize)]
struct Norm {
    #[module(config = [*config])]
    weight: Param,
    #[module(skip, name = "cache")]
    cache: Option<Param>,
}

fn main() {}
