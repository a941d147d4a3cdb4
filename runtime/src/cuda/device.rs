//! Finding a CUDA device, or saying in one line why there is none.
//!
//! cudarc loads `libcuda.so` lazily and panics when it is absent, so the driver's presence is
//! checked first with `is_culib_present()`, and context creation runs under `catch_unwind` as a
//! second guard (a driver that loads but cannot initialise must not take the process down).

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;

use cudarc::driver::{CudaContext, sys};

/// Whether `libcuda.so` can be loaded.
pub fn driver_present() -> bool {
    // SAFETY: this only `dlopen`s the driver library (running its initialisers) and keeps it.
    unsafe { sys::is_culib_present() }
}

/// Why no GPU can be used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NoGpu {
    #[error("no CUDA driver found (libcuda.so not loadable)")]
    NoDriver,
    #[error("FATHOM_DISABLE_CUDA is set")]
    Disabled,
    #[error("the CUDA driver reports no device {ordinal} ({count} device(s))")]
    NoDevice { ordinal: usize, count: i32 },
    #[error("the CUDA driver failed to start: {0}")]
    InitFailed(String),
}

/// A device with a context bound to it.
#[derive(Clone, Debug)]
pub struct GpuDevice {
    pub ctx: Arc<CudaContext>,
    pub ordinal: usize,
    pub name: String,
    /// Compute capability `(major, minor)`.
    pub compute_capability: (i32, i32),
    pub total_memory_bytes: usize,
    /// Streaming multiprocessors (132 on an H100/H200 SXM): the thread blocks a persistent
    /// kernel launches.
    pub multiprocessors: u32,
}

impl GpuDevice {
    /// Device `ordinal`, or why it cannot be used. `FATHOM_DISABLE_CUDA=1` forces the answer
    /// "none" (to compare with the CPU on a machine that has a GPU).
    pub fn probe(ordinal: usize) -> Result<GpuDevice, NoGpu> {
        if std::env::var_os("FATHOM_DISABLE_CUDA").is_some_and(|v| !v.is_empty() && v != "0") {
            return Err(NoGpu::Disabled);
        }
        if !driver_present() {
            return Err(NoGpu::NoDriver);
        }
        let started = catch_unwind(AssertUnwindSafe(|| {
            let count =
                CudaContext::device_count().map_err(|e| NoGpu::InitFailed(e.to_string()))?;
            if usize::try_from(count).map_or(true, |c| ordinal >= c) {
                return Err(NoGpu::NoDevice { ordinal, count });
            }
            let ctx = CudaContext::new(ordinal).map_err(|e| NoGpu::InitFailed(e.to_string()))?;
            let name = ctx.name().map_err(|e| NoGpu::InitFailed(e.to_string()))?;
            let compute_capability = ctx
                .compute_capability()
                .map_err(|e| NoGpu::InitFailed(e.to_string()))?;
            let total_memory_bytes = ctx
                .total_mem()
                .map_err(|e| NoGpu::InitFailed(e.to_string()))?;
            let multiprocessors = ctx
                .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
                .map_err(|e| NoGpu::InitFailed(e.to_string()))?;
            Ok(GpuDevice {
                ctx,
                ordinal,
                name,
                compute_capability,
                total_memory_bytes,
                multiprocessors: u32::try_from(multiprocessors).unwrap_or(1),
            })
        }));
        match started {
            Ok(result) => result,
            Err(panic) => {
                let text = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                    .unwrap_or_else(|| "a panic without a message".to_owned());
                Err(NoGpu::InitFailed(text))
            }
        }
    }

    /// `sm_90a` on Hopper (compute capability 9.0: the FP8 `wgmma` kernels need the
    /// architecture-specific target), else `sm_<major><minor>`.
    pub fn arch(&self) -> String {
        match self.compute_capability {
            (9, 0) => "sm_90a".to_owned(),
            (major, minor) => format!("sm_{major}{minor}"),
        }
    }
}

/// The NVRTC target for a device of compute capability `(major, minor)`: a CUBIN for its own
/// architecture when NVRTC knows it (`sm_90a` on Hopper), otherwise PTX for the newest virtual
/// architecture NVRTC supports below it, which the driver JIT-compiles at load (a GPU newer than
/// the NVRTC). `None` when NVRTC supports nothing at or below the device.
pub fn compile_target(compute_capability: (i32, i32), supported: &[i32]) -> Option<String> {
    let (major, minor) = compute_capability;
    let number = major * 10 + minor;
    if supported.contains(&number) {
        return Some(if number == 90 {
            "sm_90a".to_owned()
        } else {
            format!("sm_{number}")
        });
    }
    supported
        .iter()
        .copied()
        .filter(|&a| a <= number)
        .max()
        .map(|a| format!("compute_{a}"))
}

/// The line printed when a GPU was asked for and the CPU runs instead.
pub fn fallback_line(reason: &NoGpu) -> String {
    format!("fathom: {reason}; running on the CPU")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_a_cubin_when_nvrtc_knows_the_device_else_ptx_below_it() {
        let supported = [75, 80, 86, 89, 90, 100, 120];
        assert_eq!(
            compile_target((9, 0), &supported).as_deref(),
            Some("sm_90a")
        );
        assert_eq!(compile_target((8, 6), &supported).as_deref(), Some("sm_86"));
        assert_eq!(
            compile_target((12, 1), &supported).as_deref(),
            Some("compute_120")
        );
        assert_eq!(compile_target((7, 0), &supported), None);
    }

    #[test]
    fn without_a_driver_the_probe_says_so() {
        // On machines with a driver this checks nothing about the absence; CI has none.
        if driver_present() {
            eprintln!("a CUDA driver is present: the no-driver path is not exercised here");
            return;
        }
        let reason = GpuDevice::probe(0).unwrap_err();
        assert!(
            matches!(reason, NoGpu::NoDriver | NoGpu::Disabled),
            "{reason}"
        );
        if reason == NoGpu::NoDriver {
            assert_eq!(
                fallback_line(&reason),
                "fathom: no CUDA driver found (libcuda.so not loadable); running on the CPU"
            );
        }
    }
}
