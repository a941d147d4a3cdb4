use fathom_compiler::module::Param;

#[derive(fathom_macros::Module)]
#[module(config = usize)]
struct Linear {
    #[module(nmae = "weight", config = [*config, *config])]
    w: Param,
}

fn main() {}
