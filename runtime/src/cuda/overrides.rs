//! Hand-edited kernels in place of generated ones.
//!
//! `fathom inspect --target sm_90a --out DIR` writes every generated kernel as
//! `DIR/cuda/<entry>.cu`. Copy one into a folder, edit it, and run anything with
//! `FATHOM_KERNEL_OVERRIDE_DIR=<folder>`: every kernel whose entry point has a file
//! `<folder>/<entry>.cu` (generated kernels and library templates alike) is compiled from that
//! file instead. The launch is the generated kernel's (grid, block, shared memory, arguments), so
//! an edit keeps the entry point's name and parameters. The kernel cache keys entries by source,
//! so each edit compiles anew and going back to the generated kernel needs no cleaning.

use std::path::{Path, PathBuf};

use fathom_kernels::KernelSource;

/// The environment variable naming the override folder.
pub const OVERRIDE_DIR_VAR: &str = "FATHOM_KERNEL_OVERRIDE_DIR";

/// Why an override file cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("hand-edited kernel {}: {reason}", path.display())]
pub struct OverrideError {
    pub path: PathBuf,
    pub reason: String,
}

/// A folder of hand-edited kernels, `<entry>.cu` each.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelOverrides {
    dir: PathBuf,
}

/// A kernel whose source was replaced, and the file it came from.
#[derive(Clone, Debug)]
pub struct Overridden {
    pub kernel: KernelSource,
    pub path: PathBuf,
}

impl KernelOverrides {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        KernelOverrides { dir: dir.into() }
    }

    /// The folder `$FATHOM_KERNEL_OVERRIDE_DIR` names, if it is set and not empty.
    pub fn from_env() -> Option<Self> {
        std::env::var_os(OVERRIDE_DIR_VAR)
            .filter(|dir| !dir.is_empty())
            .map(Self::new)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `kernel` with the source of `<dir>/<entry>.cu` when that file exists (`None` when it does
    /// not). The file must be UTF-8 and define the same `extern "C" __global__` entry point.
    pub fn apply(&self, kernel: &KernelSource) -> Result<Option<Overridden>, OverrideError> {
        let path = self.dir.join(format!("{}.cu", kernel.entry));
        if !path.is_file() {
            return Ok(None);
        }
        let error = |reason: String| OverrideError {
            path: path.clone(),
            reason,
        };
        let bytes = std::fs::read(&path).map_err(|e| error(format!("cannot be read: {e}")))?;
        let source =
            String::from_utf8(bytes).map_err(|e| error(format!("is not UTF-8 text: {e}")))?;
        if !defines_entry(&source, &kernel.entry) {
            return Err(error(format!(
                "does not define the entry point `extern \"C\" __global__ void {}(…)`; an edited \
                 kernel keeps the generated one's name and parameters, and is launched as it was \
                 ({} threads per block, {} bytes of dynamic shared memory)",
                kernel.entry, kernel.block_threads, kernel.dynamic_smem_bytes
            )));
        }
        Ok(Some(Overridden {
            kernel: KernelSource {
                source,
                ..kernel.clone()
            },
            path,
        }))
    }
}

/// Whether `source` declares `entry` as an `extern "C" __global__` function: the name as a whole
/// word followed by `(`, in a source that has both qualifiers.
fn defines_entry(source: &str, entry: &str) -> bool {
    let is_word = |c: char| c.is_ascii_alphanumeric() || c == '_';
    source.contains("extern \"C\"")
        && source.contains("__global__")
        && source.match_indices(entry).any(|(at, _)| {
            let before = source[..at].chars().next_back();
            let after = source[at + entry.len()..].trim_start();
            !before.is_some_and(is_word) && after.starts_with('(')
        })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use fathom_kernels::ArchRequirement;

    use super::*;

    fn kernel(entry: &str) -> KernelSource {
        KernelSource {
            name: entry.to_owned(),
            source: format!("extern \"C\" __global__ void {entry}(float* x) {{ x[0] = 1.0f; }}\n"),
            entry: entry.to_owned(),
            arch_requirement: ArchRequirement::Sm80OrNewer,
            block_threads: 128,
            dynamic_smem_bytes: 0,
            params: Vec::new(),
        }
    }

    #[test]
    fn a_file_named_after_the_entry_replaces_the_source_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let overrides = KernelOverrides::new(dir.path());
        let generated = kernel("k3_add");
        assert!(overrides.apply(&generated).unwrap().is_none(), "no file");

        let edited =
            "// tuned by hand\nextern \"C\" __global__ void k3_add (float* x) { x[0] = 2.0f; }\n";
        std::fs::write(dir.path().join("k3_add.cu"), edited).unwrap();
        let got = overrides.apply(&generated).unwrap().unwrap();
        assert_eq!(got.path, dir.path().join("k3_add.cu"));
        assert_eq!(got.kernel.source, edited);
        assert_eq!(
            KernelSource {
                source: generated.source.clone(),
                ..got.kernel
            },
            generated,
            "only the source changes"
        );
        // Another kernel's file does not apply.
        assert!(overrides.apply(&kernel("k30_add")).unwrap().is_none());
    }

    #[test]
    fn an_override_without_the_entry_point_or_not_text_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let overrides = KernelOverrides::new(dir.path());
        let path = dir.path().join("k3_add.cu");
        // Renamed entry (a longer name containing the original is not the entry).
        std::fs::write(
            &path,
            "extern \"C\" __global__ void k3_add_v2(float* x) { x[0] = 2.0f; }\n",
        )
        .unwrap();
        let err = overrides.apply(&kernel("k3_add")).unwrap_err();
        assert_eq!(err.path, path);
        let text = err.to_string();
        assert!(text.starts_with("hand-edited kernel "), "{text}");
        assert!(
            text.contains(
                "does not define the entry point `extern \"C\" __global__ void k3_add(…)`"
            ) && text.contains("128 threads per block"),
            "{text}"
        );
        // Without extern "C" the symbol would be mangled.
        std::fs::write(&path, "__global__ void k3_add(float* x) {}\n").unwrap();
        assert!(overrides.apply(&kernel("k3_add")).is_err());
        std::fs::write(&path, [0xff, 0xfe, 0x00]).unwrap();
        let err = overrides.apply(&kernel("k3_add")).unwrap_err();
        assert!(err.to_string().contains("is not UTF-8 text"), "{err}");
    }

    #[test]
    fn the_entry_point_is_found_as_a_whole_word_after_its_attributes() {
        assert!(defines_entry(
            "extern \"C\" __global__ void __launch_bounds__(384, 1) e(int a) {}",
            "e"
        ));
        assert!(!defines_entry(
            "extern \"C\" __global__ void ee(int a) {}",
            "e"
        ));
        assert!(!defines_entry(
            "extern \"C\" __global__ void e_2(int a) {}",
            "e"
        ));
    }
}
