//! A caching device allocator: the policy, over a small trait for the raw device calls so that
//! it is tested on the CPU with a fake device.
//!
//! `cuMemAlloc`/`cuMemFree` synchronise the device and cost tens of microseconds, so freed blocks
//! are kept and reused. Sizes are rounded to classes (512 B steps up to 1 MiB, 2 MiB steps above)
//! so that a block serves requests of nearby sizes; a cached block serves a request when it is at
//! least the class size and at most twice it (a larger block would waste more than it saves).
//!
//! Frees are stream-ordered: a block freed on the stream it was used on is reused at once by later
//! work on that stream (stream order makes that safe, as in PyTorch's allocator); a block that was
//! also used on other streams ([`CachingAllocator::record_use`]) waits for an event recorded on each
//! of them at free time before any stream can have it again.

use std::collections::BTreeMap;

/// A stream, by its raw handle (the fake device uses any number).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StreamId(pub u64);

/// Errors of the raw device calls.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AllocError {
    #[error("out of device memory allocating {bytes} bytes ({in_use} in use, {cached} cached)")]
    OutOfMemory {
        bytes: usize,
        in_use: usize,
        cached: usize,
    },
    #[error("device call failed: {0}")]
    Device(String),
    #[error("block at {ptr:#x} is not allocated by this allocator")]
    UnknownBlock { ptr: u64 },
}

/// The raw operations a device provides.
pub trait RawDevice {
    /// A marker recorded on a stream; complete once the stream's work before it has finished.
    type Event;
    /// Allocates `bytes`; `Ok(None)` when the device is out of memory.
    fn alloc(&mut self, bytes: usize) -> Result<Option<u64>, AllocError>;
    /// Frees a pointer returned by `alloc`. No work on any stream may still use it.
    fn free(&mut self, ptr: u64) -> Result<(), AllocError>;
    fn record(&mut self, stream: StreamId) -> Result<Self::Event, AllocError>;
    fn is_complete(&mut self, event: &Self::Event) -> Result<bool, AllocError>;
}

/// A block handed out. It must be given back with [`CachingAllocator::free`] (it is not `Clone`).
#[derive(Debug, PartialEq, Eq)]
#[must_use = "a device block must be freed through its allocator"]
pub struct Block {
    pub ptr: u64,
    /// Bytes asked for.
    pub requested: usize,
    /// Bytes held (the size class).
    pub size: usize,
    /// The stream it was allocated for.
    pub stream: StreamId,
}

/// Memory counters, in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AllocStats {
    /// Held by live blocks (size classes).
    pub in_use: usize,
    pub peak_in_use: usize,
    /// Held in the cache: freed blocks ready for reuse or waiting for their streams.
    pub cached: usize,
    /// Calls to the device's `alloc`.
    pub device_allocs: u64,
    /// Requests served from the cache.
    pub reuses: u64,
}

/// Where a cached block may be reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Owner {
    /// Only on this stream, until its work is known to be done.
    Stream(StreamId),
    /// On any stream: no pending work uses it.
    Idle,
}

/// The allocator.
#[derive(Debug)]
pub struct CachingAllocator<D: RawDevice> {
    device: D,
    /// Cached blocks by (size, pointer) for best fit, with where they may be reused.
    free: BTreeMap<(usize, u64), Owner>,
    /// Freed blocks used on several streams, waiting for an event on each.
    pending: Vec<(u64, usize, Vec<D::Event>)>,
    /// Live blocks: pointer -> (size, streams it was used on besides its own).
    live: BTreeMap<u64, (usize, Vec<StreamId>)>,
    stats: AllocStats,
}

const SMALL_LIMIT: usize = 1 << 20;
const SMALL_STEP: usize = 512;
const LARGE_STEP: usize = 2 << 20;

/// The bytes a request of `bytes` gets.
pub fn size_class(bytes: usize) -> usize {
    let bytes = bytes.max(1);
    if bytes <= SMALL_LIMIT {
        bytes.div_ceil(SMALL_STEP) * SMALL_STEP
    } else {
        bytes.div_ceil(LARGE_STEP) * LARGE_STEP
    }
}

impl<D: RawDevice> CachingAllocator<D> {
    pub fn new(device: D) -> Self {
        CachingAllocator {
            device,
            free: BTreeMap::new(),
            pending: Vec::new(),
            live: BTreeMap::new(),
            stats: AllocStats::default(),
        }
    }

    pub fn stats(&self) -> AllocStats {
        self.stats
    }

    pub fn device(&self) -> &D {
        &self.device
    }

    /// A block of at least `bytes` for work on `stream`.
    pub fn alloc(&mut self, bytes: usize, stream: StreamId) -> Result<Block, AllocError> {
        let size = size_class(bytes);
        self.collect_pending()?;
        let (ptr, size) = match self.take_cached(size, stream) {
            Some(found) => {
                self.stats.reuses += 1;
                self.stats.cached -= found.1;
                found
            }
            None => (self.alloc_from_device(size)?, size),
        };
        self.live.insert(ptr, (size, Vec::new()));
        self.stats.in_use += size;
        self.stats.peak_in_use = self.stats.peak_in_use.max(self.stats.in_use);
        Ok(Block {
            ptr,
            requested: bytes,
            size,
            stream,
        })
    }

    /// Notes that `block` is also used by work on `stream` (its free then waits for it).
    pub fn record_use(&mut self, block: &Block, stream: StreamId) -> Result<(), AllocError> {
        let (_, streams) = self
            .live
            .get_mut(&block.ptr)
            .ok_or(AllocError::UnknownBlock { ptr: block.ptr })?;
        if stream != block.stream && !streams.contains(&stream) {
            streams.push(stream);
        }
        Ok(())
    }

    /// Gives a block back. Work already queued may still use it; see the module docs.
    pub fn free(&mut self, block: Block) -> Result<(), AllocError> {
        let (size, others) = self
            .live
            .remove(&block.ptr)
            .ok_or(AllocError::UnknownBlock { ptr: block.ptr })?;
        self.stats.in_use -= size;
        self.stats.cached += size;
        if others.is_empty() {
            self.free
                .insert((size, block.ptr), Owner::Stream(block.stream));
        } else {
            let mut events = Vec::with_capacity(others.len() + 1);
            for stream in std::iter::once(block.stream).chain(others) {
                events.push(self.device.record(stream)?);
            }
            self.pending.push((block.ptr, size, events));
        }
        Ok(())
    }

    /// Returns every cached block that no stream still uses to the device. Blocks still tied to
    /// a stream are kept (their stream's work may not have finished).
    pub fn empty_cache(&mut self) -> Result<(), AllocError> {
        self.collect_pending()?;
        let idle: Vec<(usize, u64)> = self
            .free
            .iter()
            .filter(|(_, owner)| **owner == Owner::Idle)
            .map(|(key, _)| *key)
            .collect();
        for (size, ptr) in idle {
            self.device.free(ptr)?;
            self.free.remove(&(size, ptr));
            self.stats.cached -= size;
        }
        Ok(())
    }

    /// Marks every cached block idle: the caller has synchronised every stream (so no queued work
    /// uses any of them). Pending blocks become idle too.
    pub fn streams_synchronized(&mut self) {
        for owner in self.free.values_mut() {
            *owner = Owner::Idle;
        }
        for (ptr, size, _) in self.pending.drain(..) {
            self.free.insert((size, ptr), Owner::Idle);
        }
    }

    /// Moves pending blocks whose events all completed into the cache as idle.
    fn collect_pending(&mut self) -> Result<(), AllocError> {
        let mut still = Vec::new();
        for (ptr, size, events) in std::mem::take(&mut self.pending) {
            let mut done = true;
            for event in &events {
                done &= self.device.is_complete(event)?;
            }
            if done {
                self.free.insert((size, ptr), Owner::Idle);
            } else {
                still.push((ptr, size, events));
            }
        }
        self.pending = still;
        Ok(())
    }

    /// The smallest cached block in `[size, 2·size]` that `stream` may use.
    fn take_cached(&mut self, size: usize, stream: StreamId) -> Option<(u64, usize)> {
        let key = self
            .free
            .range((size, 0)..=(size.saturating_mul(2), u64::MAX))
            .find(|(_, owner)| matches!(owner, Owner::Idle) || **owner == Owner::Stream(stream))
            .map(|(key, _)| *key)?;
        self.free.remove(&key);
        Some((key.1, key.0))
    }

    /// A fresh block; when the device is out of memory, the idle cache is released and the
    /// allocation retried once.
    fn alloc_from_device(&mut self, size: usize) -> Result<u64, AllocError> {
        if let Some(ptr) = self.device.alloc(size)? {
            self.stats.device_allocs += 1;
            return Ok(ptr);
        }
        self.empty_cache()?;
        match self.device.alloc(size)? {
            Some(ptr) => {
                self.stats.device_allocs += 1;
                Ok(ptr)
            }
            None => Err(AllocError::OutOfMemory {
                bytes: size,
                in_use: self.stats.in_use,
                cached: self.stats.cached,
            }),
        }
    }
}

#[cfg(test)]
#[path = "alloc_tests.rs"]
mod tests;
