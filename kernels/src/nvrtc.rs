//! A thin NVRTC driver: find `libnvrtc.so.12` and the CUDA headers, compile a [`KernelSource`]
//! to a CUBIN with ptxas' resource report, and find a disassembler for the SASS. No GPU or driver
//! is needed, so this runs in CI; the runtime builds its kernel cache on top of it.
//!
//! Search order for the library: `$FATHOM_NVRTC` (the file, or a folder holding it; when set, the
//! only place tried), `$CUDA_HOME/lib64`, `/usr/local/cuda/lib64`, then the caller's pip folders
//! (the project's `.nvrtc/`, filled by `scripts/test.sh` with
//! `pip install --target .nvrtc/cu12 nvidia-cuda-nvrtc-cu12==12.9.86 nvidia-cuda-runtime-cu12==12.9.79`).

use std::ffi::{CStr, CString, c_char, c_int};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use cudarc::nvrtc::{result, sys};

use crate::kernel::KernelSource;

const LIBRARY: &str = "libnvrtc.so.12";

/// Where NVRTC and the CUDA headers were found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NvrtcInstall {
    /// Absolute path of `libnvrtc.so.12`.
    pub library: PathBuf,
    /// Folder holding `cuda_fp8.h` and friends (NVRTC does not bundle them).
    pub include_dir: PathBuf,
}

/// Errors of finding, loading or running NVRTC.
#[derive(Debug, thiserror::Error)]
pub enum NvrtcError {
    #[error(
        "NVRTC (libnvrtc.so.12 with the CUDA headers) not found; looked for: {}.\n\
         Install it without a GPU: python3 -m pip install --target .nvrtc/cu12 \
         nvidia-cuda-nvrtc-cu12==12.9.86 nvidia-cuda-runtime-cu12==12.9.79 \
         (scripts/test.sh does this), or point FATHOM_NVRTC at libnvrtc.so.12",
        tried.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
    )]
    NotFound { tried: Vec<PathBuf> },
    #[error("cannot load {}: {reason}", path.display())]
    Load { path: PathBuf, reason: String },
    #[error("NVRTC {call} failed for {kernel}: {code:?}")]
    Call {
        call: &'static str,
        kernel: String,
        code: sys::nvrtcResult,
    },
    #[error("NVRTC could not compile {kernel} for {arch}:\n{log}{excerpt}")]
    Compile {
        kernel: String,
        arch: String,
        log: String,
        excerpt: String,
    },
}

impl NvrtcInstall {
    /// Finds NVRTC: the environment and the usual CUDA folders first, then `pip_dirs` (each a
    /// `pip install --target` folder holding `nvidia/cuda_nvrtc` and `nvidia/cuda_runtime`).
    pub fn find(pip_dirs: &[PathBuf]) -> Result<Self, NvrtcError> {
        let mut candidates: Vec<(PathBuf, PathBuf)> = Vec::new();
        if let Some(path) = std::env::var_os("FATHOM_NVRTC").map(PathBuf::from) {
            let library = if path.is_dir() {
                path.join(LIBRARY)
            } else {
                path
            };
            let dir = library.parent().map(Path::to_path_buf).unwrap_or_default();
            // A toolkit (lib64/../include) or a pip tree (nvidia/cuda_nvrtc/lib/../../cuda_runtime/include).
            let include = [
                dir.join("../include"),
                dir.join("../../cuda_runtime/include"),
            ]
            .into_iter()
            .find(|p| p.join("cuda_fp8.h").is_file())
            .unwrap_or_else(|| dir.join("../include"));
            // An explicit choice is the only one tried: a wrong path is an error, not a fallback.
            let include = std::env::var_os("FATHOM_CUDA_INCLUDE").map_or(include, PathBuf::from);
            if library.is_file() && include.join("cuda_fp8.h").is_file() {
                return Ok(Self {
                    library: absolute(&library),
                    include_dir: absolute(&include),
                });
            }
            return Err(NvrtcError::NotFound {
                tried: vec![library, include.join("cuda_fp8.h")],
            });
        }
        if let Some(home) = std::env::var_os("CUDA_HOME").map(PathBuf::from) {
            candidates.push((home.join("lib64").join(LIBRARY), home.join("include")));
        }
        let system = PathBuf::from("/usr/local/cuda");
        candidates.push((system.join("lib64").join(LIBRARY), system.join("include")));
        for dir in pip_dirs {
            let nvidia = dir.join("nvidia");
            candidates.push((
                nvidia.join("cuda_nvrtc/lib").join(LIBRARY),
                nvidia.join("cuda_runtime/include"),
            ));
        }
        let include_override = std::env::var_os("FATHOM_CUDA_INCLUDE").map(PathBuf::from);
        for (library, include) in &candidates {
            let include = include_override.clone().unwrap_or_else(|| include.clone());
            if library.is_file() && include.join("cuda_fp8.h").is_file() {
                return Ok(Self {
                    library: absolute(library),
                    include_dir: absolute(&include),
                });
            }
        }
        Err(NvrtcError::NotFound {
            tried: candidates.into_iter().map(|(library, _)| library).collect(),
        })
    }
}

/// The `pip install --target` folders of this project that `scripts/test.sh` fills
/// (`.nvrtc/cu12` with NVRTC and the headers, `.nvrtc/tools` with the disassemblers), under the
/// current directory and under the source tree this crate was built from, so that tests, the CLI
/// and the runtime of a development checkout all find the same install.
pub fn project_pip_dirs() -> Vec<PathBuf> {
    let source_tree = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut dirs = Vec::new();
    for root in [PathBuf::from("."), source_tree] {
        let nvrtc = root.join(".nvrtc");
        dirs.extend([nvrtc.join("cu12"), nvrtc.join("tools"), nvrtc]);
    }
    dirs
}

/// NVRTC for the compile checks of the test suites, or `None` when the run opted out with
/// `FATHOM_SKIP_NVRTC=1` (said on stderr). A missing install is an error that says how to
/// install it; the tests turn it into a failure rather than a silent skip.
pub fn nvrtc_unless_skipped() -> Result<Option<Nvrtc>, NvrtcError> {
    if std::env::var("FATHOM_SKIP_NVRTC").as_deref() == Ok("1") {
        eprintln!("FATHOM_SKIP_NVRTC=1: CUDA compile checks skipped");
        return Ok(None);
    }
    Nvrtc::locate().map(Some)
}

fn absolute(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}

/// ptxas' resource report for one entry point (`--ptxas-options=-v`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ResourceUsage {
    pub registers: u32,
    /// Static shared memory in bytes (dynamic shared memory is a launch parameter).
    pub static_smem_bytes: u32,
    pub stack_frame_bytes: u32,
    pub spill_store_bytes: u32,
    pub spill_load_bytes: u32,
}

impl ResourceUsage {
    /// Parses the report of `entry` from an NVRTC log; `None` when the log has none.
    pub fn parse(log: &str, entry: &str) -> Option<Self> {
        let mut usage = ResourceUsage::default();
        let mut in_entry = false;
        let mut found = false;
        for line in log.lines() {
            if let Some(rest) = line.split("Compiling entry function '").nth(1) {
                in_entry = rest.starts_with(entry) && rest[entry.len()..].starts_with('\'');
                continue;
            }
            if !in_entry {
                continue;
            }
            if line.contains("bytes stack frame") {
                usage.stack_frame_bytes = number_before(line, "bytes stack frame")?;
                usage.spill_store_bytes = number_before(line, "bytes spill stores")?;
                usage.spill_load_bytes = number_before(line, "bytes spill loads")?;
            } else if line.contains("Used ") && line.contains(" registers") {
                usage.registers = number_before(line, "registers")?;
                usage.static_smem_bytes = number_before(line, "bytes smem").unwrap_or(0);
                found = true;
                in_entry = false;
            }
        }
        found.then_some(usage)
    }
}

/// The integer right before `unit` in `line` (e.g. `168` in "Used 168 registers").
fn number_before(line: &str, unit: &str) -> Option<u32> {
    let head = &line[..line.find(unit)?];
    head.split(|c: char| !c.is_ascii_digit())
        .rev()
        .find(|s| !s.is_empty())?
        .parse()
        .ok()
}

/// A compiled kernel.
#[derive(Clone, Debug)]
pub struct CompiledKernel {
    pub name: String,
    /// The `--gpu-architecture` it was compiled for.
    pub arch: String,
    /// Empty when `arch` is a virtual architecture (`compute_XX`): then `ptx` holds the code.
    pub cubin: Vec<u8>,
    /// The PTX, fetched only for virtual architectures (the driver JIT-compiles it at load).
    pub ptx: Option<String>,
    /// The complete NVRTC option list the kernel was compiled with.
    pub options: Vec<String>,
    /// NVRTC's log (warnings and ptxas' report).
    pub log: String,
    pub resources: Option<ResourceUsage>,
}

/// NVRTC, loaded. Loading twice in one process returns the same library.
#[derive(Debug)]
pub struct Nvrtc {
    install: NvrtcInstall,
    version: (i32, i32),
}

static LOADED: OnceLock<Result<(NvrtcInstall, libloading::os::unix::Library), String>> =
    OnceLock::new();

impl Nvrtc {
    /// Finds NVRTC (`$FATHOM_NVRTC`, `$CUDA_HOME`, `/usr/local/cuda`, then [`project_pip_dirs`])
    /// and loads it.
    pub fn locate() -> Result<Self, NvrtcError> {
        Self::load(NvrtcInstall::find(&project_pip_dirs())?)
    }

    /// Opens the library by absolute path (`RTLD_NOW | RTLD_GLOBAL`, kept for the process), so that
    /// cudarc's `dlopen` by soname finds it, and checks that it is NVRTC 12.
    pub fn load(install: NvrtcInstall) -> Result<Self, NvrtcError> {
        let loaded = LOADED.get_or_init(|| {
            use libloading::os::unix::{Library, RTLD_GLOBAL, RTLD_NOW};
            // SAFETY: loading NVRTC runs only its library initialisers, which have no preconditions.
            unsafe { Library::open(Some(&install.library), RTLD_NOW | RTLD_GLOBAL) }
                .map(|lib| (install.clone(), lib))
                .map_err(|e| e.to_string())
        });
        let install = match loaded {
            Ok((first, _)) => first.clone(),
            Err(reason) => {
                return Err(NvrtcError::Load {
                    path: install.library,
                    reason: reason.clone(),
                });
            }
        };
        let (mut major, mut minor): (c_int, c_int) = (0, 0);
        // SAFETY: both pointers are valid for writes; the library is loaded above.
        let code = unsafe { sys::nvrtcVersion(&mut major, &mut minor) };
        if code != sys::nvrtcResult::NVRTC_SUCCESS || major != 12 {
            return Err(NvrtcError::Load {
                path: install.library,
                reason: format!("expected NVRTC 12, got {major}.{minor} ({code:?})"),
            });
        }
        Ok(Self {
            install,
            version: (major, minor),
        })
    }

    /// `(major, minor)` of the loaded NVRTC.
    pub fn version(&self) -> (i32, i32) {
        self.version
    }

    pub fn install(&self) -> &NvrtcInstall {
        &self.install
    }

    /// The architectures NVRTC can compile for, as numbers (`90` for `sm_90`/`compute_90`).
    pub fn supported_archs(&self) -> Result<Vec<i32>, NvrtcError> {
        let call_error = |code| NvrtcError::Call {
            call: "get supported architectures",
            kernel: String::new(),
            code,
        };
        let mut count: c_int = 0;
        // SAFETY: a valid out-pointer; the library is loaded.
        let code = unsafe { sys::nvrtcGetNumSupportedArchs(&mut count) };
        if code != sys::nvrtcResult::NVRTC_SUCCESS {
            return Err(call_error(code));
        }
        let mut archs = vec![0 as c_int; usize::try_from(count).unwrap_or(0)];
        if !archs.is_empty() {
            // SAFETY: the buffer holds the number of entries NVRTC reported.
            let code = unsafe { sys::nvrtcGetSupportedArchs(archs.as_mut_ptr()) };
            if code != sys::nvrtcResult::NVRTC_SUCCESS {
                return Err(call_error(code));
            }
        }
        Ok(archs)
    }

    /// The complete option list of a compile for `arch` with `extra` options appended.
    pub fn options(&self, arch: &str, extra: &[String]) -> Vec<String> {
        let mut options = vec![
            format!("--gpu-architecture={arch}"),
            format!("--include-path={}", self.install.include_dir.display()),
            "--std=c++17".to_owned(),
            "--ptxas-options=-v".to_owned(),
        ];
        options.extend(extra.iter().cloned());
        options
    }

    /// Compiles `kernel` for `arch` (e.g. `sm_90a`; by default its own requirement's) to a CUBIN,
    /// with ptxas' verbose report parsed into [`ResourceUsage`].
    pub fn compile(
        &self,
        kernel: &KernelSource,
        arch: Option<&str>,
    ) -> Result<CompiledKernel, NvrtcError> {
        let arch = arch.unwrap_or(kernel.arch_requirement.compile_arch());
        self.compile_with(kernel, arch, &[])
    }

    /// Compiles `kernel` for `arch` with `extra` NVRTC options: a CUBIN for a real architecture
    /// (`sm_XX`), PTX for a virtual one (`compute_XX`).
    pub fn compile_with(
        &self,
        kernel: &KernelSource,
        arch: &str,
        extra: &[String],
    ) -> Result<CompiledKernel, NvrtcError> {
        let call_error = |call, code| NvrtcError::Call {
            call,
            kernel: kernel.name.clone(),
            code,
        };
        let source = CString::new(kernel.source.as_str()).map_err(|_| NvrtcError::Compile {
            kernel: kernel.name.clone(),
            arch: arch.to_owned(),
            log: "the source contains a NUL byte".to_owned(),
            excerpt: String::new(),
        })?;
        let file_name = CString::new(format!("{}.cu", kernel.name)).unwrap_or_default();
        let options = self.options(arch, extra);
        let program = result::create_program(&source, Some(&file_name))
            .map_err(|e| call_error("create", e.0))?;
        let program = ProgramGuard(program);
        // SAFETY: the program was just created and is destroyed only by the guard.
        let compiled = unsafe { result::compile_program(program.0, &options) };
        // SAFETY: as above.
        let log = unsafe { result::get_program_log(program.0) }
            .map(|raw| c_chars_to_string(&raw))
            .map_err(|e| call_error("get log", e.0))?;
        if compiled.is_err() {
            let excerpt = error_excerpt(&log, &kernel.source);
            return Err(NvrtcError::Compile {
                kernel: kernel.name.clone(),
                arch: arch.to_owned(),
                log,
                excerpt,
            });
        }
        let mut size = 0usize;
        // SAFETY: valid program, valid out-pointer.
        let code = unsafe { sys::nvrtcGetCUBINSize(program.0, &mut size) };
        if code != sys::nvrtcResult::NVRTC_SUCCESS {
            return Err(call_error("get CUBIN size", code));
        }
        let mut cubin = vec![0u8; size];
        if size > 0 {
            // SAFETY: the buffer holds exactly the size NVRTC reported.
            let code =
                unsafe { sys::nvrtcGetCUBIN(program.0, cubin.as_mut_ptr().cast::<c_char>()) };
            if code != sys::nvrtcResult::NVRTC_SUCCESS {
                return Err(call_error("get CUBIN", code));
            }
        }
        let ptx = if cubin.is_empty() {
            // SAFETY: valid program, compiled successfully.
            let raw =
                unsafe { result::get_ptx(program.0) }.map_err(|e| call_error("get PTX", e.0))?;
            Some(c_chars_to_string(&raw))
        } else {
            None
        };
        let resources = ResourceUsage::parse(&log, &kernel.entry);
        Ok(CompiledKernel {
            name: kernel.name.clone(),
            arch: arch.to_owned(),
            cubin,
            ptx,
            options,
            log,
            resources,
        })
    }
}

struct ProgramGuard(sys::nvrtcProgram);

impl Drop for ProgramGuard {
    fn drop(&mut self) {
        // SAFETY: the program was created by `create_program` and is destroyed only here.
        let _ = unsafe { result::destroy_program(self.0) };
    }
}

fn c_chars_to_string(raw: &[c_char]) -> String {
    let bytes: Vec<u8> = raw.iter().map(|&c| c as u8).collect();
    CStr::from_bytes_until_nul(&bytes)
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned())
}

/// The source lines NVRTC's errors point at (`name.cu(123): error: ...`), with two lines of
/// context each, so that a failure shows the generated code, not just a line number.
fn error_excerpt(log: &str, source: &str) -> String {
    let lines: Vec<&str> = source.lines().collect();
    let mut out = String::new();
    let mut shown = Vec::new();
    for entry in log.lines().filter(|l| l.contains(": error")) {
        let Some(number) = entry
            .split_once(".cu(")
            .and_then(|(_, rest)| rest.split_once(')'))
            .and_then(|(n, _)| n.parse::<usize>().ok())
        else {
            continue;
        };
        if shown.contains(&number) || shown.len() >= 5 {
            continue;
        }
        shown.push(number);
        out.push_str(&format!("\n--- source around line {number} ---\n"));
        let first = number.saturating_sub(3);
        for (i, text) in lines.iter().enumerate().skip(first).take(5) {
            let marker = if i + 1 == number { ">" } else { " " };
            out.push_str(&format!("{marker}{:5} | {text}\n", i + 1));
        }
    }
    out
}

/// Finds a CUDA binary tool (`cuobjdump`, `nvdisasm`): `$CUDA_HOME/bin`, `/usr/local/cuda/bin`,
/// then each of `pip_dirs`' `nvidia/cu13/bin` and `nvidia/cuda_*/bin`, then `$PATH`.
pub fn find_cuda_tool(tool: &str, pip_dirs: &[PathBuf]) -> Option<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(home) = std::env::var_os("CUDA_HOME") {
        dirs.push(PathBuf::from(home).join("bin"));
    }
    dirs.push(PathBuf::from("/usr/local/cuda/bin"));
    for pip in pip_dirs {
        dirs.push(pip.join("nvidia/cu13/bin"));
        dirs.push(pip.join(format!("nvidia/cuda_{tool}/bin")));
    }
    if let Some(path) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&path));
    }
    dirs.into_iter().map(|d| d.join(tool)).find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG: &str = "ptxas info    : 0 bytes gmem\n\
ptxas info    : Compiling entry function 'other' for 'sm_90a'\n\
ptxas info    : Used 12 registers\n\
ptxas info    : Compiling entry function 'fp8_gemm_x' for 'sm_90a'\n\
ptxas info    : Function properties for fp8_gemm_x\n\
    8 bytes stack frame, 4 bytes spill stores, 16 bytes spill loads\n\
ptxas info    : Used 168 registers, used 1 barriers, 1024 bytes smem, 464 bytes cmem[0]\n";

    #[test]
    fn parses_the_entry_points_report() {
        let usage = ResourceUsage::parse(LOG, "fp8_gemm_x").expect("report present");
        assert_eq!(
            usage,
            ResourceUsage {
                registers: 168,
                static_smem_bytes: 1024,
                stack_frame_bytes: 8,
                spill_store_bytes: 4,
                spill_load_bytes: 16
            }
        );
        assert_eq!(
            ResourceUsage::parse(LOG, "other").map(|u| u.registers),
            Some(12)
        );
        assert_eq!(ResourceUsage::parse(LOG, "fp8_gemm"), None);
    }

    #[test]
    fn error_excerpt_shows_failing_lines() {
        let source = "a\nb\nc\nd\ne\nf\n";
        let log = "k.cu(4): error: identifier \"d\" is undefined\n";
        let excerpt = error_excerpt(log, source);
        assert!(excerpt.contains(">    4 | d"), "{excerpt}");
        assert!(excerpt.contains("     2 | b"), "{excerpt}");
    }

    #[test]
    fn not_found_says_how_to_install() {
        let err = NvrtcError::NotFound {
            tried: vec![PathBuf::from("/x/libnvrtc.so.12")],
        };
        let text = err.to_string();
        assert!(text.contains("/x/libnvrtc.so.12"));
        assert!(text.contains("pip install --target .nvrtc/cu12 nvidia-cuda-nvrtc-cu12==12.9.86"));
    }
}
