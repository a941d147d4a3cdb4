use fathom_compiler::module::Param;

#[derive(fathom_macros::Module)]
enum Block {
    Dense { weight: Param },
    Sparse { experts: Vec<Param> },
}

fn main() {}
