use fathom_compiler::module::Param;

#[derive(fathom_macros::Module)]
#[module(config = usize)]
struct Mlp {
    #[module(config = [*config, *config])]
    up_proj: Param,
    #[module(name = "up_proj", config = [*config, *config])]
    gate_proj: Param,
}

fn main() {}
