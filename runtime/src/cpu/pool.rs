//! Storage for temporaries, kept between runs of a program.
//!
//! Fresh allocations of large buffers cost a page fault per 4 KiB on first touch, which
//! dominated small steps; so a run takes each temporary's storage from the pool when the
//! temporary starts and gives it back when it dies. A pooled allocation serves buffers of many
//! sizes in turn and is lent whole (the buffer uses a prefix, see `Storage::Pooled`): lending it
//! for a longer buffer than the last one then costs nothing, where a `Vec` truncated for the
//! shorter buffer would fill the difference with zeros again when grown (which cost the small
//! training step about 100 MB of writes, several milliseconds, on every run).

/// Allocations free for the next temporary, each with every element initialised (a vector's
/// length is how much of it has been written, ever).
#[derive(Debug, Default)]
pub(super) struct Pool {
    free: Vec<Vec<f32>>,
}

impl Pool {
    /// Storage for (at least) `len` values, stale or zero: the smallest pooled allocation that
    /// holds them, else a new one. It may be longer than `len`; the caller uses the first `len`
    /// values (every temporary is completely written before it is read) and gives the whole
    /// vector back.
    pub(super) fn take(&mut self, len: usize) -> Vec<f32> {
        let best = self
            .free
            .iter()
            .enumerate()
            .filter(|(_, v)| v.capacity() >= len)
            .min_by_key(|(_, v)| v.capacity())
            .map(|(i, _)| i);
        let mut storage = best.map(|i| self.free.swap_remove(i)).unwrap_or_default();
        if storage.len() < len {
            storage.resize(len, 0.0);
        }
        storage
    }

    /// Takes storage back (from [`Pool::take`] or from elsewhere).
    pub(super) fn give_back(&mut self, storage: Vec<f32>) {
        if storage.capacity() > 0 {
            self.free.push(storage);
        }
    }

    /// The capacities of the free allocations.
    #[cfg(test)]
    pub(super) fn capacities(&self) -> impl Iterator<Item = usize> {
        self.free.iter().map(Vec::capacity)
    }
}

#[cfg(test)]
mod tests {
    use super::Pool;

    #[test]
    fn lending_for_a_longer_buffer_than_the_last_writes_nothing() {
        let mut pool = Pool::default();
        let mut big = pool.take(1000);
        big.iter_mut().enumerate().for_each(|(i, x)| *x = i as f32);
        pool.give_back(big);
        // Lent for 10 values: the whole allocation comes, its first ten are the stale ones.
        let small = pool.take(10);
        assert_eq!(small.len(), 1000);
        assert_eq!(small[..10], (0..10).map(|i| i as f32).collect::<Vec<_>>());
        pool.give_back(small);
        // Lent for 1000 again: the stale values come back, not zeros written over them.
        let again = pool.take(1000);
        assert_eq!(again[999], 999.0);
        pool.give_back(again);
    }

    #[test]
    fn the_smallest_allocation_that_fits_is_lent_and_a_new_one_when_none_fits() {
        let mut pool = Pool::default();
        pool.give_back(vec![1.0; 100]);
        pool.give_back(vec![2.0; 10]);
        let a = pool.take(8);
        assert_eq!((a.len(), a[0]), (10, 2.0));
        let b = pool.take(200);
        assert_eq!((b.len(), b[199]), (200, 0.0));
        assert_eq!(pool.free.len(), 1);
        // An allocation initialised only partly is completed (with zeros) when lent for more.
        let mut c = pool.take(50);
        assert_eq!(c.len(), 100);
        c.truncate(20);
        pool.give_back(c);
        assert_eq!(pool.take(60)[59], 0.0);
        // Empty storage is not kept.
        pool.give_back(a);
        pool.give_back(b);
        pool.give_back(Vec::new());
        assert_eq!(pool.free.len(), 2);
    }
}
