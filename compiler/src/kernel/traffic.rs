//! What the loop nests move through memory: the estimate `fathom inspect` prints, and the
//! table of where it goes (`14-traffic.txt` of a compilation's artifacts).

use std::collections::BTreeMap;
use std::fmt::Write;

use super::{KernelBody, LoopNest, Program, Stmt, View};

impl LoopNest {
    /// Bytes the nest reads and writes when each distinct view it loads or stores is moved
    /// once, whole: a view covers the domain's axes along which it has a nonzero stride (a
    /// broadcast axis reads the same elements again, from cache), and a row store skips the
    /// innermost axis. Every buffer holds 4-byte values. An estimate of DRAM traffic: a
    /// kernel whose views overlap, or whose working set misses the cache, moves more.
    pub fn bytes_moved(&self) -> u64 {
        // (view, whether it is a row store), each once.
        let mut views: Vec<(View, bool)> = Vec::new();
        let mut note = |view: &View, per_row: bool| {
            if !views.iter().any(|(v, r)| v == view && *r == per_row) {
                views.push((view.clone(), per_row));
            }
        };
        for stmt in &self.body {
            match stmt {
                Stmt::Reduce { value, .. } => value.for_each_load(&mut |v| note(v, false)),
                Stmt::Store { view, value } => {
                    value.for_each_load(&mut |v| note(v, false));
                    note(view, false);
                }
                Stmt::StoreRow { view, value } => {
                    value.for_each_load(&mut |v| note(v, false));
                    note(view, true);
                }
            }
        }
        let axes = self.domain.len();
        let elements = |(view, per_row): &(View, bool)| -> u64 {
            let covered = (self.domain.iter().zip(&view.strides).enumerate())
                .filter(|&(axis, (_, &stride))| stride != 0 && !(*per_row && axis + 1 == axes))
                .map(|(_, (&extent, _))| extent as u64);
            covered.product()
        };
        4 * views.iter().map(elements).sum::<u64>()
    }
}

impl Program {
    /// Bytes the loop nests read and write in one run, each view of a kernel counted once
    /// ([`LoopNest::bytes_moved`]): the memory traffic of the elementwise and reduction work,
    /// what fusion and in-place reads cut (the library calls are not counted).
    pub fn loop_bytes(&self) -> u64 {
        (self.kernels.iter())
            .filter_map(|kernel| match &kernel.body {
                KernelBody::Loop(nest) => Some(nest.bytes_moved()),
                KernelBody::Library(_) => None,
            })
            .sum()
    }

    /// The loop nests' traffic per run, by kind of kernel (its name without its number and
    /// layer index: the same work in every layer) and the largest kernels, most first.
    pub fn traffic_table(&self) -> String {
        // Each loop nest with its name and the bytes it moves.
        let nests: Vec<(&str, &LoopNest, u64)> = (self.kernels.iter())
            .filter_map(|k| match &k.body {
                KernelBody::Loop(nest) => Some((k.name.as_str(), nest, nest.bytes_moved())),
                KernelBody::Library(_) => None,
            })
            .collect();
        let total: u64 = nests.iter().map(|(_, _, bytes)| bytes).sum();
        let mut text = format!(
            "{} read and written per run by {} loop nests (each view once)\n\nby kind:\n",
            with_prefix(total, "B"),
            nests.len()
        );
        let mut kinds: BTreeMap<String, (u64, usize)> = BTreeMap::new();
        for (name, _, bytes) in &nests {
            let kind = kinds.entry(kernel_kind(name)).or_default();
            kind.0 += bytes;
            kind.1 += 1;
        }
        let mut kinds: Vec<_> = kinds.into_iter().collect();
        kinds.sort_by(|a, b| b.1.0.cmp(&a.1.0).then_with(|| a.0.cmp(&b.0)));
        let share = |bytes: u64| 100.0 * bytes as f64 / total.max(1) as f64;
        for (kind, (bytes, count)) in kinds.iter().take(40) {
            let bytes_text = with_prefix(*bytes, "B");
            let _ = writeln!(
                text,
                "  {bytes_text:>9} {:5.1}% {count:6}  {kind}",
                share(*bytes)
            );
        }
        let _ = writeln!(text, "\nlargest kernels:");
        let mut largest = nests;
        largest.sort_by(|a, b| b.2.cmp(&a.2).then_with(|| a.0.cmp(b.0)));
        for (name, nest, bytes) in largest.iter().take(40) {
            let bytes_text = with_prefix(*bytes, "B");
            let _ = writeln!(text, "  {bytes_text:>9}  {name}  loop {:?}", nest.domain);
        }
        text
    }
}

/// A kernel's name without its number and with its layer index as `N`:
/// `k7812_mul_backward_model_layers_30_mlp_experts` is `mul_backward_model_layers_N_mlp_experts`.
fn kernel_kind(name: &str) -> String {
    let unnumbered = match name.split_once('_') {
        Some((number, rest)) if number.starts_with('k') => rest,
        _ => name,
    };
    let words: Vec<&str> = unnumbered.split('_').collect();
    let words: Vec<&str> = (words.iter().enumerate())
        .map(|(i, w)| {
            let after_layers = i > 0 && words[i - 1] == "layers";
            if after_layers && w.chars().all(|c| c.is_ascii_digit()) {
                "N"
            } else {
                w
            }
        })
        .collect();
    words.join("_")
}

/// `count` of `unit` with a decimal prefix and three significant digits: `1.29 TB`, `112 k`,
/// `950 B`.
pub fn with_prefix(count: u64, unit: &str) -> String {
    let value = count as f64;
    let Some((scale, prefix)) = [(1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")]
        .into_iter()
        .find(|(scale, _)| value >= *scale)
    else {
        return format!("{count} {unit}").trim_end().to_owned();
    };
    let scaled = value / scale;
    let digits = match scaled {
        s if s >= 100.0 => 0,
        s if s >= 10.0 => 1,
        _ => 2,
    };
    format!("{scaled:.digits$} {prefix}{unit}")
}
