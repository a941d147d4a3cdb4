//! A model of the FP8 GEMM's pipeline protocol (`cuda/fp8_gemm.cuh`), explored over many random
//! interleavings: one producer thread and the math warps of each block of a cluster, the
//! `full` and `empty` mbarriers of every stage with the PTX ISA's phase, arrival and
//! transaction-count semantics, and TMA loads (B multicast to both blocks of a cluster) that
//! complete at any later moment. A GPU can only run the kernel; this checks the protocol's
//! design where it may hang or race, without one:
//! - every schedule finishes (no deadlock), with nothing left in flight;
//! - a math warp reads a stage only when it holds its own A tile and both halves of B for the
//!   K block it expects (no stage is refilled before every reader of both blocks released it);
//! - nothing arrives on, or loads into, a block that has exited (the producer's drain).
//!
//! The kernel's barrier code, transcribed: the producer waits `empty[s]` for parity
//! `phase ^ 1`, arrives on `full[s]` expecting the stage's bytes, loads A (its own) and its half
//! of B (into both blocks); a math warp waits `full[s]` for `phase`, reads, and arrives on
//! `empty[s]` of every block of the cluster; with clusters, the producer finally waits out its
//! last `STAGES` releases. Units may sum different numbers of K blocks, none included (a
//! K-grouped GEMM's tiles sum their group's, an empty group's none): producer and math warps
//! agree on each unit's count, so the ring stays in step.

use std::collections::HashSet;

/// One mbarrier: completed phases, arrivals still expected in the current one, and its
/// transaction count (which may go below zero when bytes land before they are expected).
#[derive(Clone, Debug)]
struct Barrier {
    completed: u32,
    count: u32,
    pending: u32,
    tx: i64,
}

impl Barrier {
    fn new(count: u32) -> Self {
        Barrier {
            completed: 0,
            count,
            pending: count,
            tx: 0,
        }
    }

    fn settle(&mut self) {
        if self.pending == 0 && self.tx == 0 {
            self.completed += 1;
            self.pending = self.count;
        }
    }

    fn arrive(&mut self, expect_tx: i64) {
        assert!(
            self.pending > 0,
            "more arrivals than the barrier's count in one phase"
        );
        self.tx += expect_tx;
        self.pending -= 1;
        self.settle();
    }

    fn complete_tx(&mut self, bytes: i64) {
        self.tx -= bytes;
        self.settle();
    }

    /// `mbarrier.try_wait.parity`: the phase of that parity has completed, i.e. the current
    /// phase's parity differs.
    fn try_wait(&self, parity: u32) -> bool {
        self.completed % 2 != parity
    }
}

/// A K block's identity: (unit, k block).
type Tag = (u32, u32);

/// A TMA load in flight: into `stage` of each block in `targets`, completing `bytes` on their
/// `full` barriers and leaving `tag` in the parts (`0`: A, `1 + half`: a half of B) it fills.
#[derive(Clone, Debug)]
struct Load {
    targets: Vec<usize>,
    stage: usize,
    parts: Vec<usize>,
    tag: Tag,
    bytes: i64,
}

#[derive(Clone, Copy, Debug)]
struct Config {
    cluster: usize,
    stages: usize,
    warps: usize,
    units: u32,
    /// K blocks of unit `u`: `k_blocks[u % len]`.
    k_blocks: &'static [u32],
    /// The producer waits out its last releases before its block exits (the kernel does, with
    /// clusters); turned off to show the check finds what it is for.
    drain: bool,
}

const A_BYTES: i64 = 16;
const B_HALF_BYTES: i64 = 8;

/// A block: its barriers and stage contents, its producer's and warps' progress.
struct Block {
    full: Vec<Barrier>,
    empty: Vec<Barrier>,
    /// Per stage: what its A and B halves hold.
    contents: Vec<[Option<Tag>; 3]>,
    /// The producer's position: `use_index` over all (unit, k block) uses, then drain steps; and
    /// whether it has arrived on `full` for the current use (its step is two actions).
    producer_use: u32,
    producer_armed: bool,
    drained: usize,
    /// Each warp's position, and whether it has read the current use (then it releases).
    warp_use: Vec<u32>,
    warp_read: Vec<bool>,
}

fn run(config: Config, seed: u64) -> Result<(), String> {
    let Config {
        cluster,
        stages,
        warps,
        units,
        k_blocks,
        drain,
    } = config;
    // Every (unit, k block) in the order both sides walk them.
    let tags: Vec<Tag> = (0..units)
        .flat_map(|unit| (0..k_blocks[unit as usize % k_blocks.len()]).map(move |kb| (unit, kb)))
        .collect();
    let uses = tags.len() as u32;
    let stage_of = |u: u32| u as usize % stages;
    let parity_of = |u: u32| (u / stages as u32) % 2;
    let tag_of = |u: u32| tags[u as usize];
    // Each block's `full` expects its A and the whole B (its half and the peer's).
    let tx_bytes = A_BYTES + B_HALF_BYTES * 2;
    let mut blocks: Vec<Block> = (0..cluster)
        .map(|_| Block {
            full: vec![Barrier::new(1); stages],
            empty: vec![Barrier::new((cluster * warps) as u32); stages],
            contents: vec![[None; 3]; stages],
            producer_use: 0,
            producer_armed: false,
            drained: 0,
            warp_use: vec![0; warps],
            warp_read: vec![false; warps],
        })
        .collect();
    let producer_done =
        |b: &Block| b.producer_use == uses && (!drain || cluster == 1 || b.drained == stages);
    let alive = |b: &Block| !producer_done(b) || b.warp_use.iter().any(|&u| u < uses);
    let mut in_flight: Vec<Load> = Vec::new();
    let mut state = seed | 1;
    let mut random = |n: usize| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % n as u64) as usize
    };
    loop {
        // Every action that can happen now: (kind, block, index).
        let mut enabled: Vec<(u8, usize, usize)> = Vec::new();
        for (c, block) in blocks.iter().enumerate() {
            let u = block.producer_use;
            if u < uses {
                if block.producer_armed || block.empty[stage_of(u)].try_wait(parity_of(u) ^ 1) {
                    enabled.push((0, c, 0));
                }
            } else if drain && cluster > 1 && block.drained < stages {
                let d = uses + block.drained as u32;
                if block.empty[stage_of(d)].try_wait(parity_of(d) ^ 1) {
                    enabled.push((1, c, 0));
                }
            }
            for w in 0..warps {
                let u = block.warp_use[w];
                if u < uses
                    && (block.warp_read[w] || block.full[stage_of(u)].try_wait(parity_of(u)))
                {
                    enabled.push((2, c, w));
                }
            }
        }
        for i in 0..in_flight.len() {
            enabled.push((3, 0, i));
        }
        if enabled.is_empty() {
            let done = blocks.iter().all(|b| !alive(b));
            return if done {
                Ok(())
            } else {
                Err(format!(
                    "deadlock: {:?}",
                    blocks
                        .iter()
                        .map(|b| (b.producer_use, b.drained, b.warp_use.clone()))
                        .collect::<Vec<_>>()
                ))
            };
        }
        let (kind, c, i) = enabled[random(enabled.len())];
        match kind {
            // Producer: arrive on `full` expecting the bytes, then issue the loads.
            0 => {
                let u = blocks[c].producer_use;
                let s = stage_of(u);
                if !blocks[c].producer_armed {
                    blocks[c].full[s].arrive(tx_bytes);
                    blocks[c].producer_armed = true;
                } else {
                    let tag = tag_of(u);
                    in_flight.push(Load {
                        targets: vec![c],
                        stage: s,
                        parts: vec![0],
                        tag,
                        bytes: A_BYTES,
                    });
                    // Alone, one load fills B; in a cluster, this block's half, into every block.
                    in_flight.push(if cluster == 1 {
                        Load {
                            targets: vec![c],
                            stage: s,
                            parts: vec![1, 2],
                            tag,
                            bytes: 2 * B_HALF_BYTES,
                        }
                    } else {
                        Load {
                            targets: (0..cluster).collect(),
                            stage: s,
                            parts: vec![1 + c],
                            tag,
                            bytes: B_HALF_BYTES,
                        }
                    });
                    blocks[c].producer_armed = false;
                    blocks[c].producer_use += 1;
                }
            }
            1 => blocks[c].drained += 1,
            // A math warp: read the stage, then release it in every block of the cluster.
            2 => {
                let u = blocks[c].warp_use[i];
                let s = stage_of(u);
                if !blocks[c].warp_read[i] {
                    let want = Some(tag_of(u));
                    let got = blocks[c].contents[s];
                    if got.iter().any(|part| *part != want) {
                        return Err(format!(
                            "block {c} warp {i} read stage {s} for {want:?} holding {got:?}"
                        ));
                    }
                    blocks[c].warp_read[i] = true;
                } else {
                    let targets: Vec<usize> = if cluster == 1 {
                        vec![c]
                    } else {
                        (0..cluster).collect()
                    };
                    for t in targets {
                        if !alive(&blocks[t]) {
                            return Err(format!("block {c} arrived on exited block {t}"));
                        }
                        blocks[t].empty[s].arrive(0);
                    }
                    blocks[c].warp_read[i] = false;
                    blocks[c].warp_use[i] += 1;
                }
            }
            // A load lands.
            _ => {
                let load = in_flight.swap_remove(i);
                for t in load.targets {
                    if !alive(&blocks[t]) {
                        return Err(format!("a load landed in exited block {t}"));
                    }
                    for &part in &load.parts {
                        blocks[t].contents[load.stage][part] = Some(load.tag);
                    }
                    blocks[t].full[load.stage].complete_tx(load.bytes);
                }
            }
        }
    }
}

/// Per-unit K block counts: dense (every unit alike), and K-grouped with empty groups between.
const K_BLOCKS: [&[u32]; 6] = [&[1], &[2], &[3], &[5], &[2, 0, 1], &[0, 3, 0, 0, 1]];

fn configs(drain: bool) -> Vec<Config> {
    let mut out = Vec::new();
    for cluster in [1, 2] {
        for stages in [1, 2, 3, 4] {
            for warps in [1, 2] {
                for units in [0, 1, 2, 3] {
                    for k_blocks in K_BLOCKS {
                        out.push(Config {
                            cluster,
                            stages,
                            warps,
                            units,
                            k_blocks,
                            drain,
                        });
                    }
                }
            }
        }
    }
    out
}

#[test]
fn the_pipeline_protocol_finishes_and_never_races_in_any_explored_schedule() {
    let mut schedules = 0;
    for config in configs(true) {
        for seed in 0..60 {
            if let Err(e) = run(config, seed * 7919 + 1) {
                panic!("{config:?}, seed {seed}: {e}");
            }
            schedules += 1;
        }
    }
    assert_eq!(schedules, 2 * 4 * 2 * 4 * K_BLOCKS.len() * 60);
}

/// Without the producer's drain a block of a cluster can exit while its peer still releases
/// stages into its barriers: the model must find that, or it checks nothing.
#[test]
fn without_the_drain_a_cluster_block_can_exit_under_its_peer() {
    let mut found = HashSet::new();
    for config in configs(false)
        .into_iter()
        .filter(|c| c.cluster == 2 && c.units > 0)
    {
        for seed in 0..60 {
            if let Err(e) = run(config, seed * 7919 + 1) {
                found.insert(e);
            }
        }
    }
    assert!(
        found.iter().any(|e| e.contains("arrived on exited block")),
        "found only {found:?}"
    );
}
