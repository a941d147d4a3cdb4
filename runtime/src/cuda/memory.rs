//! The driver side of device memory: [`RawDevice`] over `cuMemAlloc`/`cuMemFree` and events, and
//! the copies between host and device the executor needs.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cudarc::driver::{CudaContext, CudaEvent, CudaStream, DriverError, result, sys};

use super::CudaError;
use super::alloc::{AllocError, RawDevice, StreamId};

/// A CUDA event that is destroyed when dropped.
#[derive(Debug)]
pub struct RawEvent(sys::CUevent);

// SAFETY: an event is a driver handle that any thread may record, query, wait on or destroy
// (the CUDA driver API is thread-safe); the allocator binds the context before each use and
// destroys an event once, in Drop. The raw pointer alone makes it !Send/!Sync by default.
unsafe impl Send for RawEvent {}
unsafe impl Sync for RawEvent {}

impl Drop for RawEvent {
    fn drop(&mut self) {
        // SAFETY: the event was created by `event::create` and is destroyed only here; destroying
        // an incomplete event is allowed (its resources are released when it completes).
        let _ = unsafe { result::event::destroy(self.0) };
    }
}

/// Device memory of one context.
#[derive(Debug)]
pub struct DriverMemory {
    ctx: Arc<CudaContext>,
}

impl DriverMemory {
    pub fn new(ctx: Arc<CudaContext>) -> Self {
        DriverMemory { ctx }
    }
}

fn device_error(e: DriverError) -> AllocError {
    AllocError::Device(e.to_string())
}

impl RawDevice for DriverMemory {
    type Event = RawEvent;

    fn alloc(&mut self, bytes: usize) -> Result<Option<u64>, AllocError> {
        self.ctx.bind_to_thread().map_err(device_error)?;
        // SAFETY: plain allocation in the bound context; the memory is uninitialised, and every
        // user writes before reading (as the CPU backend's storage pool).
        match unsafe { result::malloc_sync(bytes) } {
            Ok(ptr) => Ok(Some(ptr)),
            Err(DriverError(sys::cudaError_enum::CUDA_ERROR_OUT_OF_MEMORY)) => Ok(None),
            Err(e) => Err(device_error(e)),
        }
    }

    fn free(&mut self, ptr: u64) -> Result<(), AllocError> {
        self.ctx.bind_to_thread().map_err(device_error)?;
        // SAFETY: `ptr` came from `alloc` and the allocator frees it once, when no queued work
        // uses it (see `CachingAllocator::empty_cache`).
        unsafe { result::free_sync(ptr) }.map_err(device_error)
    }

    fn record(&mut self, stream: StreamId) -> Result<RawEvent, AllocError> {
        self.ctx.bind_to_thread().map_err(device_error)?;
        let event = RawEvent(
            result::event::create(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING)
                .map_err(device_error)?,
        );
        // SAFETY: a live event and a stream handle of this context (`StreamId` holds the handle).
        unsafe { result::event::record(event.0, stream.0 as sys::CUstream) }
            .map_err(device_error)?;
        Ok(event)
    }

    fn is_complete(&mut self, event: &RawEvent) -> Result<bool, AllocError> {
        // SAFETY: a live event created by `record`.
        match unsafe { result::event::query(event.0) } {
            Ok(()) => Ok(true),
            Err(DriverError(sys::cudaError_enum::CUDA_ERROR_NOT_READY)) => Ok(false),
            Err(e) => Err(device_error(e)),
        }
    }
}

/// The allocator's id of a cudarc stream.
pub fn stream_id(stream: &CudaStream) -> StreamId {
    StreamId(stream.cu_stream() as u64)
}

/// Copies `host` to device address `dst` on `stream` and waits for it (so `host` may be dropped
/// right after; uploads are not on the hot path of a captured graph).
pub fn upload<T: Copy>(stream: &CudaStream, dst: u64, host: &[T]) -> Result<(), DriverError> {
    stream.context().bind_to_thread()?;
    // SAFETY: `dst` is a live device allocation of at least `size_of_val(host)` bytes (the caller
    // sized it from the same buffer), and `host` outlives the copy: the stream is synchronised
    // before returning.
    unsafe { result::memcpy_htod_async(dst, host, stream.cu_stream()) }?;
    stream.synchronize()
}

/// Copies from device address `src` into `host` on `stream`, waiting for the stream's earlier
/// work and the copy.
pub fn download<T: Copy>(stream: &CudaStream, src: u64, host: &mut [T]) -> Result<(), DriverError> {
    stream.context().bind_to_thread()?;
    // SAFETY: `src` is a live device allocation of at least `size_of_val(host)` bytes, and `host`
    // is borrowed mutably until the stream is synchronised below.
    unsafe { result::memcpy_dtoh_async(host, src, stream.cu_stream()) }?;
    stream.synchronize()
}

/// Sets `bytes` bytes from device address `dst` to zero, queued on `stream`.
pub fn zero_bytes(stream: &CudaStream, dst: u64, bytes: usize) -> Result<(), DriverError> {
    stream.context().bind_to_thread()?;
    // SAFETY: `dst` is a live device allocation of at least `bytes` bytes (the caller sized it),
    // written only by work queued on `stream` after this.
    unsafe { result::memset_d8_async(dst, 0, bytes, stream.cu_stream()) }
}

/// How long a launch that takes milliseconds may run before it counts as hung (a kernel whose
/// pipeline deadlocks never finishes, and `synchronize` would wait for ever).
pub const HANG_LIMIT: Duration = Duration::from_secs(20);

/// Waits for the work queued on `stream`, giving up after `limit` with
/// [`CudaError::Hung`] naming `what()`: the context of a hung kernel cannot be recovered, so the
/// caller stops, saying which, instead of waiting for ever.
pub fn finish_within(
    stream: &CudaStream,
    limit: Duration,
    what: impl FnOnce() -> String,
) -> Result<(), CudaError> {
    let driver = |e| CudaError::driver("waiting for queued work".into(), e);
    let done = timing_event(stream.context()).map_err(driver)?;
    done.record(stream).map_err(driver)?;
    let started = Instant::now();
    while !done.try_is_complete().map_err(driver)? {
        if started.elapsed() > limit {
            return Err(CudaError::Hung {
                what: what(),
                limit,
            });
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(())
}

/// An event that records time (cudarc's default events do not, and `elapsed_ms` then fails).
pub fn timing_event(ctx: &Arc<CudaContext>) -> Result<CudaEvent, DriverError> {
    ctx.new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
}

/// Milliseconds per call of `launch` on `stream`: `warmup` untimed calls, waited for by `settle`
/// (a synchronize, or a wait that gives up on a kernel that never finishes), then `iters` calls
/// between two timing events, averaged.
pub fn mean_launch_ms<E: From<CudaError>>(
    stream: &CudaStream,
    (warmup, iters): (u32, u32),
    mut launch: impl FnMut() -> Result<(), E>,
    settle: impl FnOnce() -> Result<(), E>,
) -> Result<f64, E> {
    let driver = |what: &'static str| move |e| E::from(CudaError::driver(what.to_owned(), e));
    for _ in 0..warmup {
        launch()?;
    }
    settle()?;
    let ctx = stream.context();
    let start = timing_event(ctx).map_err(driver("creating a timing event"))?;
    let end = timing_event(ctx).map_err(driver("creating a timing event"))?;
    start.record(stream).map_err(driver("recording an event"))?;
    for _ in 0..iters {
        launch()?;
    }
    end.record(stream).map_err(driver("recording an event"))?;
    stream.synchronize().map_err(driver("timing launches"))?;
    let ms = start
        .elapsed_ms(&end)
        .map_err(driver("reading the timer"))?;
    Ok(f64::from(ms) / f64::from(iters.max(1)))
}
