#!/usr/bin/env python3
"""Fathom against PyTorch running transformers' DeepseekV3, side by side in one run.

    python scripts/bench/compare_pytorch.py [--configs small medium] [--steps 5] [--threads 2]
        [--repeats 3] [--fathom target/release/fathom] [--recompute none|deepseek_v3]

For each configuration (benches/configs/<name>.json, with the batch and sequence length of the
issue: small 4 x 256, medium 2 x 512) it writes one set of random weights with `fathom init`,
then times, with the same weights and thread count:
  - Fathom's compiled CPU training step (forward, next-token loss, backward, AdamW) and forward
    pass (`fathom bench`);
  - PyTorch eager and torch.compile, f32, the same step (`model(ids, labels=ids).loss`,
    `backward`, `AdamW.step`) and forward;
  - PyTorch eager and torch.compile under `torch.autocast(dtype=torch.bfloat16)`.
and prints tokens/s, the ratio Fathom / torch.compile, the achieved fraction of the machine's
f32 GEMM peak, and peak memory (max RSS) of each process. Absolute numbers move by 20% or more
between runs on shared machines: compare within one run. With --repeats N the whole sequence of
measurements runs N times in turn (Fathom and PyTorch alternating, so a slow spell of the machine
falls on both), and the table shows each figure's median, each ratio's median over the rounds
and its range.

Fathom's training step stores every activation its backward reads by default here
(`--recompute none`, passed as FATHOM_RECOMPUTE), as PyTorch's baseline does: like for like.
`--recompute deepseek_v3` times the DeepSeek-V3 recipe instead (RMSNorm outputs and the MLA
up-projections recomputed in backward, `fathom train`'s default), which trades time for memory.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

SHAPES = {"small": (4, 256), "medium": (2, 512)}


def torch_run(model_dir, batch, seq, steps, threads, mode):
    """Runs in a child process (fresh RSS): mode is eager-f32, compile-f32, eager-bf16 or compile-bf16."""
    import torch
    from transformers import DeepseekV3ForCausalLM

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM.from_pretrained(model_dir, attn_implementation="eager", dtype=torch.float32)
    model.train()
    ids = torch.randint(0, model.config.vocab_size, (batch, seq))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0)
    compiled = mode.startswith("compile")
    bf16 = mode.endswith("bf16")
    forward = torch.compile(model) if compiled else model

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = forward(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def infer():
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            forward(input_ids=ids)

    for _ in range(2):  # warm-up (and compilation)
        step()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    train = (time.perf_counter() - t) / steps
    infer()
    t = time.perf_counter()
    for _ in range(steps):
        infer()
    fwd = (time.perf_counter() - t) / steps
    tokens = batch * seq
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"train_tokens_per_second": tokens / train, "forward_tokens_per_second": tokens / fwd, "max_rss_bytes": rss}


def torch_peak(threads):
    import torch

    torch.set_num_threads(threads)
    out = {}
    for dtype, name in [(torch.float32, "f32"), (torch.bfloat16, "bf16")]:
        a = torch.randn(2048, 2048, dtype=dtype)
        b = torch.randn(2048, 2048, dtype=dtype)
        a @ b
        best = min(_timed(lambda: a @ b) for _ in range(3))
        out[name] = 2 * 2048**3 / best / 1e9
    return out


def _timed(f):
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


def child(args):
    """Entry point of the child processes."""
    kind = args.child
    if kind == "peak":
        print(json.dumps(torch_peak(args.threads)))
    else:
        print(json.dumps(torch_run(args.model_dir, args.batch, args.seq, args.steps, args.threads, kind)))


def run_child(kind, **kw):
    cmd = [sys.executable, __file__, "--child", kind]
    for k, v in kw.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", nargs="+", default=["small", "medium"])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--repeats", type=int, default=1, help="rounds of every measurement, in turn; medians shown")
    p.add_argument("--fathom", default="target/release/fathom")
    p.add_argument("--modes", nargs="+", default=["eager-f32", "compile-f32", "eager-bf16", "compile-bf16"])
    p.add_argument("--recompute", default="none", choices=["none", "deepseek_v3"],
                   help="what Fathom's backward recomputes (none: stored, as PyTorch does)")
    p.add_argument("--child")
    p.add_argument("--model-dir")
    p.add_argument("--batch", type=int)
    p.add_argument("--seq", type=int)
    args = p.parse_args()
    if args.child:
        return child(args)

    peak = run_child("peak", threads=args.threads)
    print(f"GEMM peak (torch, 2048^2): f32 {peak['f32']:.0f} GFLOP/s, bf16 {peak['bf16']:.0f} GFLOP/s; threads {args.threads}")
    print(f"Fathom recomputes in backward: {args.recompute}")
    rows = []
    for name in args.configs:
        batch, seq = SHAPES[name]
        config = f"benches/configs/{name}.json"
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run([args.fathom, "init", "--config", config, "--seed", "0", "--out", tmp], check=True, capture_output=True)
            rounds = [measure_round(args, config, tmp, batch, seq) for _ in range(args.repeats)]
        rows.append((name, rounds))

    print()
    for name, rounds in rows:
        flops = rounds[0]["fathom f32"]["matmul_flops_per_token"]
        describe_bf16_gemm(rounds[0]["fathom f32"].get("bf16_gemm"))
        print(f"== {name}: {flops / 1e6:.1f} MFLOP per token (matmuls, counted by Fathom's compiler)")
        if len(rounds) > 1:
            print(f"(medians of {len(rounds)} rounds)")
        print(f"{'':22} {'train tok/s':>12} {'fwd tok/s':>12} {'% of peak':>10} {'max RSS MB':>11}")
        for label in rounds[0]:
            kind = "bf16" if label.endswith("bf16") else "f32"
            train, fwd, rss = (median([r[label][key] for r in rounds])
                               for key in ["train_tokens_per_second", "forward_tokens_per_second", "max_rss_bytes"])
            frac = train * flops / 1e9 / peak[kind] * 100
            print(f"{label:22} {train:12.0f} {fwd:12.0f} {frac:9.0f}% {rss / 2**20:11.0f}")
        for kind in ["f32", "bf16"]:
            ours, base = f"fathom {kind}", f"torch compile-{kind}"
            if ours in rounds[0] and base in rounds[0]:
                ratios = {key: [r[ours][key] / r[base][key] for r in rounds]
                          for key in ["train_tokens_per_second", "forward_tokens_per_second"]}
                train, fwd = (describe(ratios[key]) for key in ratios)
                print(f"Fathom {kind} / torch.compile {kind}: train {train}, forward {fwd}")
        print()


def measure_round(args, config, weights, batch, seq):
    """One measurement of every contender on `config`, in turn: label -> results."""
    results = {}
    # Fathom in f32, and in its bf16 policy when a bf16 mode of torch is compared.
    precisions = ["fp32"] + (["bf16"] if any(m.endswith("bf16") for m in args.modes) else [])
    for precision in precisions:
        fathom_out = subprocess.run(
            ["/usr/bin/time", "-f", "%M", args.fathom, "bench", "--config", config, "--weights", weights,
             "--batch", str(batch), "--seq", str(seq), "--steps", str(args.steps), "--threads", str(args.threads),
             "--precision", precision, "--json"],
            check=True, capture_output=True, text=True, env=dict(os.environ, FATHOM_RECOMPUTE=args.recompute))
        run = json.loads(fathom_out.stdout.strip().splitlines()[-1])
        run["max_rss_bytes"] = int(fathom_out.stderr.strip().splitlines()[-1]) * 1024
        results["fathom f32" if precision == "fp32" else "fathom bf16"] = run
    for mode in args.modes:
        results[f"torch {mode}"] = run_child(mode, model_dir=weights, batch=batch, seq=seq, steps=args.steps, threads=args.threads)
    return results


def describe_bf16_gemm(report):
    """Whether Fathom's bf16 Linear GEMMs ran on its vdpbf16ps kernel, and its speed here."""
    if not report:
        return
    if not report["supported"]:
        print("Fathom's bf16 GEMMs: on the f32 GEMM (this CPU has no AVX512_BF16)")
        return
    ratio = report["vdpbf16ps_over_fma_flop_ratio"]
    rates = ", ".join(f"{'x'.join(map(str, s['m_n_k']))}: {s['bf16_gflops']:.0f} vs {s['f32_gflops']:.0f} GFLOP/s"
                      for s in report["shapes"])
    state = "bf16 kernel" if report["enabled"] else "f32 GEMM"
    measured = f"vdpbf16ps/FMA FLOP rate {ratio:.2f}" if ratio else "forced by FATHOM_BF16_GEMM"
    print(f"Fathom's bf16 GEMMs: on the {state} ({measured}; bf16 kernel vs f32 GEMM {rates})")


def median(values):
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def describe(ratios):
    """A ratio's median, and its range over the rounds when there are several."""
    if len(ratios) == 1:
        return f"{ratios[0]:.2f}x"
    return f"{median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}x)"


if __name__ == "__main__":
    main()
