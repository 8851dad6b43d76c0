//! Single-writer counter cells shared between one producer thread and its readers.
//!
//! The producer is the only writer, so an increment is a relaxed load plus a relaxed
//! store: no locked read-modify-write (which costs 10-20 ns on x86 and bounces the line).
//! Readers never write; each keeps its own previous snapshot and takes differences, which is
//! why counters are cumulative instead of being swapped to zero at window close (a swap
//! racing with load+store would lose the reset and count a window twice). So any number of
//! readers (the window closer, the metrics) can share the one count.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

/// Aligned to a cache line so that two producers' cells never share one.
#[repr(align(64))]
struct Cells<const N: usize>([AtomicU64; N]);

/// The producer's handle. Not `Clone` and mutated through `&mut self`: that is what keeps
/// it the single writer.
pub(crate) struct CellWriter<const N: usize>(Arc<Cells<N>>);

/// Read access to the cells, for as many readers as want one.
#[derive(Clone)]
pub(crate) struct CellTotals<const N: usize>(Arc<Cells<N>>);

pub(crate) struct CellReader<const N: usize> {
    cells: Arc<Cells<N>>,
    last: [u64; N],
}

pub(crate) fn cells<const N: usize>() -> (CellWriter<N>, CellTotals<N>) {
    let cells = Arc::new(Cells([const { AtomicU64::new(0) }; N]));
    (CellWriter(Arc::clone(&cells)), CellTotals(cells))
}

impl<const N: usize> CellTotals<N> {
    /// Every cell's value now.
    pub(crate) fn current(&self) -> [u64; N] {
        std::array::from_fn(|i| self.0 .0[i].load(Relaxed))
    }

    /// A reader whose first delta counts from now.
    pub(crate) fn reader(&self) -> CellReader<N> {
        CellReader {
            cells: Arc::clone(&self.0),
            last: self.current(),
        }
    }
}

impl<const N: usize> CellWriter<N> {
    #[inline(always)]
    pub(crate) fn add(&mut self, i: usize, n: u64) {
        let c = &self.0 .0[i];
        c.store(c.load(Relaxed).wrapping_add(n), Relaxed);
    }
}

impl<const N: usize> CellReader<N> {
    /// Growth of every cell since the previous call, written into `out` (no copy of the
    /// whole array on the way).
    pub(crate) fn delta_into(&mut self, out: &mut [u64; N]) {
        for ((o, last), cell) in out.iter_mut().zip(self.last.iter_mut()).zip(&self.cells.0) {
            let now = cell.load(Relaxed);
            *o = now.wrapping_sub(*last);
            *last = now;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl<const N: usize> CellReader<N> {
        fn delta(&mut self) -> [u64; N] {
            let mut out = [0; N];
            self.delta_into(&mut out);
            out
        }
    }

    #[test]
    fn reader_sees_deltas_not_totals() {
        let (mut w, totals) = cells::<3>();
        w.add(2, 1);
        // A reader counts from when it was made.
        let mut r = totals.reader();
        w.add(0, 2);
        w.add(2, 4);
        assert_eq!(r.delta(), [2, 0, 4]);
        w.add(0, 1);
        assert_eq!(r.delta(), [1, 0, 0]);
        assert_eq!(r.delta(), [0, 0, 0]);
        assert_eq!(totals.current(), [3, 0, 5]);
    }

    #[test]
    fn concurrent_writer_loses_nothing() {
        let (mut w, totals) = cells::<1>();
        let mut r = totals.reader();
        let t = std::thread::spawn(move || {
            for _ in 0..200_000 {
                w.add(0, 1);
            }
        });
        let mut seen = 0;
        while !t.is_finished() {
            seen += r.delta()[0];
        }
        t.join().unwrap();
        seen += r.delta()[0];
        assert_eq!(seen, 200_000);
    }

    #[test]
    fn wrapping_counter_still_gives_delta() {
        let (mut w, totals) = cells::<1>();
        w.add(0, u64::MAX - 1);
        let mut r = totals.reader();
        w.add(0, 3);
        assert_eq!(r.delta()[0], 3);
    }
}
