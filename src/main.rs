//! The `fathom` command line.

mod cli;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    one_malloc_arena();
    let args = cli::Cli::parse();
    match cli::run(args) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {}", describe(&error));
            ExitCode::FAILURE
        }
    }
}

/// Keeps every thread's allocations in glibc's main heap. The compiled CPU program runs its
/// kernels on a rayon worker (see `CpuProgram::run`), so its temporaries' storage and the
/// `gemm` crate's packing buffers are allocated there; glibc gives each thread its own arena,
/// made of 64 MiB heaps that it does not coalesce across, and the medium benchmark's peak
/// resident memory grew from 2.7 to 3.4 GB with them (the main heap alone, as before the
/// kernels moved to a worker: 2.7 GB, at the same speed). A `MALLOC_ARENA_MAX` the user set is
/// left as it is.
fn one_malloc_arena() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: `mallopt` only sets a tuning parameter of the allocator; called before any
        // other thread exists.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 1);
        }
    }
}

/// The error and its causes on one line, skipping a cause whose text the message before it
/// already includes (library errors often quote their source).
fn describe(error: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in error.chain() {
        let line = cause.to_string();
        if !text.contains(&line) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&line);
        }
    }
    text
}
