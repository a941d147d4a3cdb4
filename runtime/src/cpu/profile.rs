//! An opt-in per-kernel timing table (`FATHOM_PROFILE=1`): wall time of every kernel and of the
//! host work around them (copying feeds in, results out), summed over all runs of a program and
//! printed to stderr when the program is dropped, largest first, by kernel and by kind of kernel
//! (its fusion group's label, e.g. `rmsnorm`, `matmul`): the 30 slowest kernels, or every one
//! with `FATHOM_PROFILE=all`. Off by default; when off, nothing is timed.
//!
//! The first run is left out of the table once there are others: it faults every temporary's
//! memory in, which made copies look several times slower than they run afterwards (a third of
//! a medium training step's copy time, averaged over three runs, was the first run's).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use fathom_compiler::kernel::{KernelBody, Program};

/// The environment variable that turns the table on (any value but empty or `0`).
pub const PROFILE_ENV: &str = "FATHOM_PROFILE";

/// Kernels listed one by one unless `FATHOM_PROFILE=all`.
const TOP_KERNELS: usize = 30;

/// Whether `FATHOM_PROFILE` asks for the table.
pub(super) fn enabled_by_env() -> bool {
    std::env::var(PROFILE_ENV).is_ok_and(|v| !v.is_empty() && v != "0")
}

/// How many kernels the table lists one by one.
fn listed_by_env() -> usize {
    match std::env::var(PROFILE_ENV) {
        Ok(v) if v == "all" => usize::MAX,
        _ => TOP_KERNELS,
    }
}

/// Host phases of a run timed besides the kernels.
#[derive(Clone, Copy, Debug)]
pub(super) enum Phase {
    /// Inputs, parameters and constants made ready for the kernels.
    Feeds,
    /// Outputs handed back as host tensors.
    Outputs,
}

#[derive(Debug, Default)]
struct Totals {
    runs: u64,
    total: Duration,
    kernels: Vec<Duration>,
    feeds: Duration,
    outputs: Duration,
}

impl Totals {
    /// Empty totals for the first run and for the later ones, over `kernels` kernels.
    fn first_and_later(kernels: usize) -> Mutex<[Totals; 2]> {
        Mutex::new(std::array::from_fn(|_| Totals {
            kernels: vec![Duration::ZERO; kernels],
            ..Totals::default()
        }))
    }
}

/// Times accumulated over the runs of one program.
#[derive(Debug)]
pub(super) struct Profile {
    name: String,
    /// Per kernel: display name and kind.
    kernels: Vec<(String, String)>,
    /// Per kernel: its matmul FLOPs (0 for other kernels), shown as the GFLOP/s it reached.
    flops: Vec<u64>,
    /// The first run's times, and the later runs' summed.
    totals: Mutex<[Totals; 2]>,
}

impl Profile {
    /// The profile of `program`, whose loop kernel `i` runs compiled when `compiled(i)`
    /// (else on the row evaluator, labelled so: a slow kernel may be a fallback).
    pub(super) fn new(program: &Program, compiled: impl Fn(usize) -> bool) -> Profile {
        let kernels = program
            .kernels
            .iter()
            .enumerate()
            .map(|(i, k)| {
                let kind = kind_of(&k.name, &k.origin);
                let body = match &k.body {
                    KernelBody::Loop(_) if compiled(i) => "loop",
                    KernelBody::Loop(_) => "evaluator",
                    KernelBody::Library(_) => "library",
                };
                (k.name.clone(), format!("{kind} ({body})"))
            })
            .collect();
        Profile {
            name: program.name.clone(),
            totals: Totals::first_and_later(program.kernels.len()),
            kernels,
            flops: program
                .kernels
                .iter()
                .map(|k| program.flops_of(k))
                .collect(),
        }
    }

    /// Adds one run: its total time, each kernel's and the host phases'.
    pub(super) fn add_run(
        &self,
        total: Duration,
        kernels: &[Duration],
        phases: &[(Phase, Duration)],
    ) {
        let Ok(mut totals) = self.totals.lock() else {
            return;
        };
        let [first, later] = &mut *totals;
        let t = if first.runs == 0 { first } else { later };
        t.runs += 1;
        t.total += total;
        for (sum, d) in t.kernels.iter_mut().zip(kernels) {
            *sum += *d;
        }
        for &(phase, d) in phases {
            match phase {
                Phase::Feeds => t.feeds += d,
                Phase::Outputs => t.outputs += d,
            }
        }
    }

    /// The table, or `None` before the first run.
    pub(super) fn table(&self) -> Option<String> {
        let totals = self.totals.lock().ok()?;
        let [first, later] = &*totals;
        let (t, mut out) = match (first.runs, later.runs) {
            (0, _) => return None,
            (_, 0) => (first, format!("FATHOM_PROFILE {}: 1 run", self.name)),
            (_, runs) => (
                later,
                format!(
                    "FATHOM_PROFILE {}: {} runs after the first (which took {:.1} ms)",
                    self.name,
                    runs,
                    first.total.as_secs_f64() * 1e3
                ),
            ),
        };
        let ms = |d: Duration| d.as_secs_f64() * 1e3 / t.runs as f64;
        let total = ms(t.total).max(f64::MIN_POSITIVE);
        out += &format!(", {total:.1} ms per run\n");
        let mut by_kind: HashMap<&str, (Duration, usize)> = HashMap::new();
        for ((_, kind), d) in self.kernels.iter().zip(&t.kernels) {
            let e = by_kind.entry(kind).or_default();
            e.0 += *d;
            e.1 += 1;
        }
        by_kind.insert("host: feeds in", (t.feeds, 1));
        by_kind.insert("host: outputs out", (t.outputs, 1));
        let mut kinds: Vec<_> = by_kind.into_iter().collect();
        kinds.sort_by(|a, b| b.1.0.cmp(&a.1.0).then(a.0.cmp(b.0)));
        out += "  by kind              ms/run      %  kernels\n";
        for (kind, (d, n)) in &kinds {
            let v = ms(*d);
            out += &format!("  {v:>10.2} {:>6.1}%  {n:>5}  {kind}\n", 100.0 * v / total);
        }
        let mut order: Vec<usize> = (0..self.kernels.len()).collect();
        order.sort_by(|&a, &b| t.kernels[b].cmp(&t.kernels[a]).then(a.cmp(&b)));
        out += "  top kernels          ms/run      %  GFLOP/s\n";
        for &i in order.iter().take(listed_by_env()) {
            let v = ms(t.kernels[i]);
            // A matmul's achieved rate, to compare with the machine's GEMM peak.
            let rate = match self.flops[i] {
                0 => String::new(),
                flops => format!("{:.0}", flops as f64 / (v * 1e6)),
            };
            out += &format!(
                "  {v:>10.2} {:>6.1}%  {rate:>7}  {}\n",
                100.0 * v / total,
                self.kernels[i].0
            );
        }
        Some(out)
    }
}

/// The label of a kernel's fusion group: its name without the `k<index>_` prefix and the
/// `_<origin>` suffix the lowering adds.
fn kind_of(name: &str, origin: &str) -> String {
    let rest = name
        .strip_prefix('k')
        .map(|r| r.trim_start_matches(|c: char| c.is_ascii_digit()))
        .and_then(|r| r.strip_prefix('_'))
        .unwrap_or(name);
    let place: String = origin
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    rest.strip_suffix(&place)
        .map(|r| r.trim_end_matches('_'))
        .filter(|r| !r.is_empty())
        .unwrap_or(rest)
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::{Profile, Totals, kind_of};
    use std::time::Duration;

    #[test]
    fn the_first_run_is_left_out_once_there_are_others() {
        let profile = Profile {
            name: "p".into(),
            kernels: vec![
                ("k0_copy".into(), "copy (loop)".into()),
                ("k1_matmul".into(), "matmul (library)".into()),
            ],
            flops: vec![0, 4_000_000_000],
            totals: Totals::first_and_later(2),
        };
        let ms = Duration::from_millis;
        assert_eq!(profile.table(), None);
        profile.add_run(ms(90), &[ms(80), ms(1)], &[]);
        let table = profile.table().unwrap();
        assert!(
            table.starts_with("FATHOM_PROFILE p: 1 run, 90.0 ms per run"),
            "{table}"
        );
        profile.add_run(ms(10), &[ms(6), ms(2)], &[]);
        profile.add_run(ms(20), &[ms(8), ms(2)], &[]);
        let table = profile.table().unwrap();
        assert!(
            table.starts_with(
                "FATHOM_PROFILE p: 2 runs after the first (which took 90.0 ms), 15.0 ms per run"
            ),
            "{table}"
        );
        assert!(
            table.contains("7.00   46.7%      1  copy (loop)"),
            "{table}"
        );
        // 4 GFLOP in 2 ms: 2000 GFLOP/s, shown for the matmul only.
        assert!(
            table.contains("2.00   13.3%     2000  k1_matmul\n"),
            "{table}"
        );
        assert!(table.contains("46.7%           k0_copy\n"), "{table}");
    }

    #[test]
    fn kinds_drop_the_index_and_the_origin() {
        assert_eq!(
            kind_of(
                "k12_rmsnorm_model_layers_0_input_layernorm",
                "model.layers.0.input_layernorm"
            ),
            "rmsnorm"
        );
        assert_eq!(kind_of("k3_matmul", ""), "matmul");
        assert_eq!(kind_of("odd", "x"), "odd");
    }
}
