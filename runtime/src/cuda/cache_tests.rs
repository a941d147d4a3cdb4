//! The kernel cache with the real NVRTC (no GPU needed). Without NVRTC these fail saying how to
//! install it, unless `FATHOM_SKIP_NVRTC=1` is set.

#![allow(clippy::unwrap_used)]

use std::sync::{Arc, Barrier};

use fathom_kernels::nvrtc::nvrtc_unless_skipped;
use fathom_kernels::{ArchRequirement, KernelSource};

use super::super::overrides::KernelOverrides;
use super::*;

fn open(dir: &Path) -> Option<KernelCache> {
    let nvrtc = nvrtc_unless_skipped().unwrap_or_else(|e| {
        panic!("{e}\n(set FATHOM_SKIP_NVRTC=1 to skip the CUDA compile checks explicitly)")
    })?;
    Some(KernelCache::new(dir, nvrtc))
}

/// A small kernel; `line3` is its third line (to place an error there).
fn kernel(line3: &str) -> KernelSource {
    let source = format!(
        "// cache test kernel\n\
         extern \"C\" __global__ void cache_test_scale(float* x, float a, int n) {{\n\
         {line3}\n\
         }}\n"
    );
    KernelSource {
        name: "cache_test_scale".to_owned(),
        source,
        entry: "cache_test_scale".to_owned(),
        arch_requirement: ArchRequirement::Sm80OrNewer,
        block_threads: 128,
        dynamic_smem_bytes: 0,
        params: Vec::new(),
    }
}

fn good() -> KernelSource {
    kernel("int i = blockIdx.x * blockDim.x + threadIdx.x; if (i < n) x[i] *= a;")
}

/// Names in `<root>/<arch>`, sorted.
fn listing(root: &Path, arch: &str) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(root.join(arch))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn a_miss_compiles_and_writes_the_entry_layout() {
    let dir = tempfile::tempdir().unwrap();
    let Some(cache) = open(dir.path()) else {
        return;
    };
    let got = cache.get_or_compile(&good(), "sm_80", &[]).unwrap();
    assert!(!got.hit);
    assert_eq!(cache.counters().compiles, 1);
    let key = cache.key(&good(), "sm_80", &[]);
    assert_eq!(got.dir, dir.path().join("sm_80").join(&key));
    let mut files: Vec<String> = std::fs::read_dir(&got.dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    assert_eq!(
        files,
        ["kernel.cu", "kernel.cubin", "meta.json", "nvrtc.log"]
    );
    let ModuleImage::Cubin(cubin) = &got.image else {
        panic!("expected a CUBIN for sm_80, got {:?}", got.meta.code)
    };
    assert_eq!(&cubin[..4], b"\x7fELF");
    assert_eq!(std::fs::read(got.dir.join("kernel.cubin")).unwrap(), *cubin);
    assert_eq!(
        std::fs::read_to_string(got.dir.join("kernel.cu")).unwrap(),
        good().source
    );
    let meta: EntryMeta =
        serde_json::from_slice(&std::fs::read(got.dir.join("meta.json")).unwrap()).unwrap();
    assert_eq!(meta, got.meta);
    assert_eq!(meta.arch, "sm_80");
    assert!(meta.options.iter().any(|o| o == "--gpu-architecture=sm_80"));
    assert!(meta.registers.is_some(), "ptxas report parsed: {meta:?}");
    // Only the entry: no temporary folder is left behind.
    assert_eq!(listing(dir.path(), "sm_80"), [key]);
}

#[test]
fn a_hit_loads_without_compiling() {
    let dir = tempfile::tempdir().unwrap();
    let Some(first) = open(dir.path()) else {
        return;
    };
    let compiled = first.get_or_compile(&good(), "sm_80", &[]).unwrap();
    // A fresh cache (another process, say) on the same folder.
    let second = open(dir.path()).unwrap();
    let loaded = second.get_or_compile(&good(), "sm_80", &[]).unwrap();
    assert!(loaded.hit);
    assert_eq!(
        second.counters(),
        CacheCounters {
            hits: 1,
            ..Default::default()
        }
    );
    assert_eq!(loaded.image, compiled.image);
    assert_eq!(loaded.meta, compiled.meta);
}

#[test]
fn a_changed_option_or_architecture_is_a_different_entry() {
    let dir = tempfile::tempdir().unwrap();
    let Some(cache) = open(dir.path()) else {
        return;
    };
    let define = vec!["-DFATHOM_CACHE_TEST=1".to_owned()];
    let a = cache.get_or_compile(&good(), "sm_80", &[]).unwrap();
    let b = cache.get_or_compile(&good(), "sm_80", &define).unwrap();
    let c = cache.get_or_compile(&good(), "sm_90a", &[]).unwrap();
    assert!(!a.hit && !b.hit && !c.hit);
    assert_ne!(a.dir, b.dir);
    assert_eq!(a.dir.parent(), b.dir.parent());
    assert_eq!(c.dir.parent(), Some(dir.path().join("sm_90a").as_path()));
    assert!(b.meta.options.contains(&define[0]));
    assert_eq!(cache.counters().compiles, 3);
    // Each is found again under its own key.
    assert!(cache.get_or_compile(&good(), "sm_80", &define).unwrap().hit);
    assert_eq!(cache.counters().hits, 1);
}

#[test]
fn a_virtual_architecture_gives_ptx() {
    let dir = tempfile::tempdir().unwrap();
    let Some(cache) = open(dir.path()) else {
        return;
    };
    let got = cache.get_or_compile(&good(), "compute_80", &[]).unwrap();
    let ModuleImage::Ptx(ptx) = &got.image else {
        panic!("expected PTX for compute_80")
    };
    assert!(ptx.contains(".entry cache_test_scale"), "{ptx}");
    assert!(got.dir.join("kernel.ptx").is_file());
    assert!(
        open(dir.path())
            .unwrap()
            .get_or_compile(&good(), "compute_80", &[])
            .unwrap()
            .hit
    );
}

#[test]
fn damaged_or_partial_entries_are_detected_and_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    let Some(cache) = open(dir.path()) else {
        return;
    };
    let entry = cache.get_or_compile(&good(), "sm_80", &[]).unwrap();
    let cubin = entry.dir.join("kernel.cubin");
    let full = std::fs::read(&cubin).unwrap();

    // A truncated CUBIN.
    std::fs::write(&cubin, &full[..full.len() / 2]).unwrap();
    let fresh = open(dir.path()).unwrap();
    let rebuilt = fresh.get_or_compile(&good(), "sm_80", &[]).unwrap();
    assert!(!rebuilt.hit);
    assert_eq!(
        (fresh.counters().rebuilt, fresh.counters().compiles),
        (1, 1)
    );
    assert_eq!(std::fs::read(&cubin).unwrap(), full);

    // A partial entry (no meta.json), and a garbled meta.json.
    std::fs::remove_file(entry.dir.join("meta.json")).unwrap();
    assert!(!fresh.get_or_compile(&good(), "sm_80", &[]).unwrap().hit);
    std::fs::write(entry.dir.join("meta.json"), b"{ not json").unwrap();
    assert!(!fresh.get_or_compile(&good(), "sm_80", &[]).unwrap().hit);
    assert_eq!(fresh.counters().rebuilt, 3);

    // After the rebuilds the entry is whole again, and only it is in the folder.
    assert!(
        open(dir.path())
            .unwrap()
            .get_or_compile(&good(), "sm_80", &[])
            .unwrap()
            .hit
    );
    assert_eq!(
        listing(dir.path(), "sm_80"),
        [cache.key(&good(), "sm_80", &[])]
    );
}

#[test]
fn two_threads_compiling_the_same_kernel_both_succeed_with_one_entry() {
    let dir = tempfile::tempdir().unwrap();
    let Some(shared) = open(dir.path()) else {
        return;
    };
    let shared = Arc::new(shared);
    let start = Arc::new(Barrier::new(2));
    let threads: Vec<_> = (0..2)
        .map(|_| {
            let (cache, start) = (Arc::clone(&shared), Arc::clone(&start));
            std::thread::spawn(move || {
                start.wait();
                cache.get_or_compile(&good(), "sm_80", &[]).unwrap()
            })
        })
        .collect();
    let results: Vec<CachedKernel> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert_eq!(results[0].image, results[1].image);
    let counters = shared.counters();
    assert_eq!(counters.compiles + counters.hits, 2, "{counters:?}");
    assert!(counters.lost_races <= 1, "{counters:?}");
    assert_eq!(
        listing(dir.path(), "sm_80"),
        [shared.key(&good(), "sm_80", &[])]
    );
    assert!(
        open(dir.path())
            .unwrap()
            .get_or_compile(&good(), "sm_80", &[])
            .unwrap()
            .hit
    );
}

#[test]
fn a_compile_error_shows_the_log_and_the_line_and_writes_the_source() {
    let dir = tempfile::tempdir().unwrap();
    let Some(cache) = open(dir.path()) else {
        return;
    };
    let broken = kernel("x[0] = undefined_thing;");
    let error = cache.get_or_compile(&broken, "sm_80", &[]).unwrap_err();
    let CacheError::Compile { source_file, .. } = &error else {
        panic!("expected a compile error, got {error}")
    };
    let text = error.to_string();
    assert!(
        text.contains("identifier \"undefined_thing\" is undefined"),
        "{text}"
    );
    assert!(text.contains(">    3 | x[0] = undefined_thing;"), "{text}");
    assert!(text.contains(&source_file.display().to_string()), "{text}");
    assert_eq!(std::fs::read_to_string(source_file).unwrap(), broken.source);
    assert!(source_file.with_file_name("nvrtc.log").is_file());
    // Nothing was stored as an entry.
    assert_eq!(listing(dir.path(), "sm_80"), ["failed"]);
}

#[test]
fn a_hand_edited_override_is_compiled_in_place_of_the_source_and_each_edit_anew() {
    let dir = tempfile::tempdir().unwrap();
    let edits = tempfile::tempdir().unwrap();
    let Some(cache) = open(dir.path()) else {
        return;
    };
    let cache = cache.with_overrides(Some(KernelOverrides::new(edits.path())));
    let generated = cache.get_or_compile(&good(), "sm_80", &[]).unwrap();
    assert_eq!(generated.overridden_by, None, "no file yet");

    let file = edits.path().join("cache_test_scale.cu");
    let edited = kernel("int i = threadIdx.x; if (i < n) x[i] *= 2.0f * a;");
    std::fs::write(&file, &edited.source).unwrap();
    let got = cache.get_or_compile(&good(), "sm_80", &[]).unwrap();
    assert_eq!(got.overridden_by.as_deref(), Some(file.as_path()));
    assert!(!got.hit, "a new source compiles");
    assert_ne!(got.dir, generated.dir);
    assert_eq!(
        std::fs::read_to_string(got.dir.join("kernel.cu")).unwrap(),
        edited.source,
        "the entry holds the edited text"
    );
    assert!(cache.get_or_compile(&good(), "sm_80", &[]).unwrap().hit);

    // The next edit compiles again; removing the file brings back the generated kernel's entry.
    let again = kernel("int i = threadIdx.x; if (i < n) x[i] *= 3.0f * a;");
    std::fs::write(&file, &again.source).unwrap();
    let got = cache.get_or_compile(&good(), "sm_80", &[]).unwrap();
    assert!(!got.hit);
    std::fs::remove_file(&file).unwrap();
    let back = cache.get_or_compile(&good(), "sm_80", &[]).unwrap();
    assert!(back.hit && back.dir == generated.dir && back.overridden_by.is_none());

    // An edit that renamed the entry point is refused with the file's name, before NVRTC.
    std::fs::write(
        &file,
        edited
            .source
            .replace("cache_test_scale", "cache_test_scale2"),
    )
    .unwrap();
    let compiles = cache.counters().compiles;
    let err = cache.get_or_compile(&good(), "sm_80", &[]).unwrap_err();
    assert!(matches!(err, CacheError::Override(_)), "{err}");
    assert!(
        err.to_string().contains(&file.display().to_string()),
        "{err}"
    );
    assert_eq!(cache.counters().compiles, compiles);
}

/// Many kernels compile on several threads, in their order, a broken one giving its error
/// without stopping the others; the second time every one is a hit.
#[test]
fn many_kernels_compile_at_once_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let Some(cache) = open(dir.path()) else {
        return;
    };
    let scaled = |a: f32| {
        kernel(&format!(
            "if (threadIdx.x < n) x[threadIdx.x] *= a * {a:.1}f;"
        ))
    };
    let mut kernels: Vec<KernelSource> = (1..=5).map(|i| scaled(i as f32)).collect();
    kernels.insert(2, kernel("this is not C++"));
    let results = cache.get_or_compile_many(&kernels, "sm_80");
    assert_eq!(results.len(), 6);
    for (i, result) in results.iter().enumerate() {
        match (i, result) {
            (2, Err(CacheError::Compile { .. })) => {}
            (2, other) => panic!("the broken kernel: {other:?}"),
            (_, Ok(cached)) => {
                assert!(!cached.hit);
                // Each result is its own kernel's entry.
                let written = std::fs::read_to_string(cached.dir.join("kernel.cu")).unwrap();
                assert_eq!(written, kernels[i].source);
            }
            (_, Err(e)) => panic!("kernel {i}: {e}"),
        }
    }
    assert_eq!(cache.counters().compiles, 6);
    let again = cache.get_or_compile_many(&kernels, "sm_80");
    let hits = again
        .iter()
        .filter(|r| r.as_ref().is_ok_and(|c| c.hit))
        .count();
    assert_eq!(hits, 5);
    assert!(cache.get_or_compile_many(&[], "sm_80").is_empty());
}
