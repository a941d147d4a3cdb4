//! Hand-written CUDA C++ templates for Fathom's code generator (FP8 GEMM with fine-grained
//! scaling, grouped expert GEMM, MLA attention, quantisation), embedded as text with a Rust
//! description of each template's parameters.
//!
//! The templates arrive with the GPU path (issue 6); until then the crate only fixes its place in
//! the workspace, so that the facade's layout does not change when they land.
