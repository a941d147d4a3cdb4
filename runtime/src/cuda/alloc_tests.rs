//! The allocator's policy against a fake device that records every call.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

use super::*;

/// A device with a capacity, handing out increasing addresses; events complete when told.
#[derive(Debug, Default)]
struct FakeDevice {
    capacity: usize,
    next: u64,
    allocated: BTreeMap<u64, usize>,
    frees: u64,
    /// Completion of every recorded event, by index.
    events: Vec<bool>,
}

impl FakeDevice {
    fn with_capacity(capacity: usize) -> Self {
        FakeDevice {
            capacity,
            next: 0x1000,
            ..Default::default()
        }
    }

    fn used(&self) -> usize {
        self.allocated.values().sum()
    }
}

impl RawDevice for FakeDevice {
    type Event = usize;

    fn alloc(&mut self, bytes: usize) -> Result<Option<u64>, AllocError> {
        if self.used() + bytes > self.capacity {
            return Ok(None);
        }
        let ptr = self.next;
        self.next += bytes as u64;
        self.allocated.insert(ptr, bytes);
        Ok(Some(ptr))
    }

    fn free(&mut self, ptr: u64) -> Result<(), AllocError> {
        self.allocated
            .remove(&ptr)
            .ok_or(AllocError::UnknownBlock { ptr })?;
        self.frees += 1;
        Ok(())
    }

    fn record(&mut self, _stream: StreamId) -> Result<usize, AllocError> {
        self.events.push(false);
        Ok(self.events.len() - 1)
    }

    fn is_complete(&mut self, event: &usize) -> Result<bool, AllocError> {
        Ok(self.events[*event])
    }
}

const S1: StreamId = StreamId(1);
const S2: StreamId = StreamId(2);
const MIB: usize = 1 << 20;

fn allocator() -> CachingAllocator<FakeDevice> {
    CachingAllocator::new(FakeDevice::with_capacity(64 * MIB))
}

#[test]
fn sizes_round_to_classes() {
    assert_eq!(size_class(0), 512);
    assert_eq!(size_class(1), 512);
    assert_eq!(size_class(512), 512);
    assert_eq!(size_class(513), 1024);
    assert_eq!(size_class(MIB), MIB);
    assert_eq!(size_class(MIB + 1), 2 * MIB);
    assert_eq!(size_class(5 * MIB), 6 * MIB);
}

#[test]
fn a_freed_block_is_reused_on_its_stream() {
    let mut a = allocator();
    let first = a.alloc(1000, S1).unwrap();
    let ptr = first.ptr;
    assert_eq!(first.size, 1024);
    a.free(first).unwrap();
    let second = a.alloc(900, S1).unwrap();
    assert_eq!(second.ptr, ptr);
    let stats = a.stats();
    assert_eq!((stats.device_allocs, stats.reuses), (1, 1));
    assert_eq!(stats.in_use, 1024);
    assert_eq!(stats.cached, 0);
    a.free(second).unwrap();
}

#[test]
fn another_stream_waits_until_the_streams_are_synchronized() {
    let mut a = allocator();
    let block = a.alloc(4096, S1).unwrap();
    let ptr = block.ptr;
    a.free(block).unwrap();
    // S1's queued work may still use it: S2 gets fresh memory.
    let other = a.alloc(4096, S2).unwrap();
    assert_ne!(other.ptr, ptr);
    a.free(other).unwrap();
    a.streams_synchronized();
    let reused = a.alloc(4096, S2).unwrap();
    assert!(reused.ptr == ptr || a.stats().reuses == 1);
    assert_eq!(a.stats().device_allocs, 2);
    a.free(reused).unwrap();
}

#[test]
fn a_block_used_on_two_streams_waits_for_both_events() {
    let mut a = allocator();
    let block = a.alloc(8192, S1).unwrap();
    let ptr = block.ptr;
    a.record_use(&block, S2).unwrap();
    a.free(block).unwrap();
    assert_eq!(a.device().events.len(), 2, "one event on each stream");
    // Not even S1 may reuse it before S2's work is done.
    let meanwhile = a.alloc(8192, S1).unwrap();
    assert_ne!(meanwhile.ptr, ptr);
    a.free(meanwhile).unwrap();
    a.device.events[0] = true;
    let still = a.alloc(8192, S2).unwrap();
    assert_ne!(still.ptr, ptr, "one event is not enough");
    a.device.events[1] = true;
    let now = a.alloc(8192, S2).unwrap();
    assert_eq!(now.ptr, ptr);
    a.free(still).unwrap();
    a.free(now).unwrap();
}

#[test]
fn best_fit_within_twice_the_size() {
    let mut a = allocator();
    let big = a.alloc(4 * MIB, S1).unwrap();
    let mid = a.alloc(512 * 1024, S1).unwrap();
    let small = a.alloc(256 * 1024, S1).unwrap();
    let (big_ptr, mid_ptr) = (big.ptr, mid.ptr);
    for b in [big, mid, small] {
        a.free(b).unwrap();
    }
    // 300 KiB: the 256 KiB block is too small, 512 KiB fits, 4 MiB is more than twice.
    let got = a.alloc(300 * 1024, S1).unwrap();
    assert_eq!(got.ptr, mid_ptr);
    // 1 KiB: nothing within twice its size; a new block.
    let tiny = a.alloc(1024, S1).unwrap();
    assert!(tiny.ptr != big_ptr && tiny.ptr != mid_ptr);
    assert_eq!(a.stats().device_allocs, 4);
    a.free(got).unwrap();
    a.free(tiny).unwrap();
}

#[test]
fn stats_count_use_peak_and_cache_and_empty_cache_returns_idle_blocks() {
    let mut a = allocator();
    let x = a.alloc(MIB, S1).unwrap();
    let y = a.alloc(3 * MIB, S1).unwrap();
    assert_eq!(a.stats().in_use, 5 * MIB, "3 MiB rounds to 4 MiB");
    a.free(x).unwrap();
    let s = a.stats();
    assert_eq!((s.in_use, s.peak_in_use, s.cached), (4 * MIB, 5 * MIB, MIB));
    // Still tied to S1: empty_cache keeps it.
    a.empty_cache().unwrap();
    assert_eq!(a.stats().cached, MIB);
    assert_eq!(a.device().frees, 0);
    a.streams_synchronized();
    a.empty_cache().unwrap();
    assert_eq!(a.stats().cached, 0);
    assert_eq!(a.device().frees, 1);
    assert_eq!(a.device().used(), 4 * MIB);
    a.free(y).unwrap();
}

#[test]
fn out_of_memory_releases_the_idle_cache_then_fails_clearly() {
    let mut a = CachingAllocator::new(FakeDevice::with_capacity(8 * MIB));
    let x = a.alloc(6 * MIB, S1).unwrap();
    a.free(x).unwrap();
    a.streams_synchronized();
    // 1 KiB: the cached 6 MiB block is far more than twice that; the device has room.
    let small = a.alloc(1024, S1).unwrap();
    assert_eq!(a.stats().device_allocs, 2);
    // 7 MiB (class 8 MiB): the cached block is too small and the device is full, so the idle
    // cache is released and the allocation retried; 8 MiB beside the 1 KiB block still fails.
    let error = a.alloc(7 * MIB, S1).unwrap_err();
    assert_eq!(
        a.device().frees,
        1,
        "the idle cache was released before failing"
    );
    assert!(matches!(error, AllocError::OutOfMemory { bytes, .. } if bytes == 8 * MIB));
    assert!(error.to_string().contains("out of device memory"));
    assert_eq!(a.stats().cached, 0);
    a.free(small).unwrap();
    a.streams_synchronized();
    // The retry path succeeds once enough is released: the 1 KiB block goes back on demand.
    let all = a.alloc(7 * MIB, S1).unwrap();
    assert_eq!(a.device().frees, 2);
    a.free(all).unwrap();
}

#[test]
fn freeing_an_unknown_block_is_an_error() {
    let mut a = allocator();
    let forged = Block {
        ptr: 0xdead,
        requested: 4,
        size: 512,
        stream: S1,
    };
    assert_eq!(
        a.free(forged).unwrap_err(),
        AllocError::UnknownBlock { ptr: 0xdead }
    );
}
