"""
ParScale's cost claim, measured: the memory and latency that P streams add, against the same gain
bought by making the model wider (arXiv 2505.10475, section 3.3 and Figure 4).

    python bench.py                               # the lesson at the paper's 1.6B scale: ~5 min on a 2-core CPU
    python bench.py --preset=tiny                 # the same table for a toy model, in seconds
    python bench.py --device=cuda --batch=8       # on one GPU (fused path when it works here), batch 8
    python bench.py --plot=cost.png               # also draw increase against P (needs matplotlib)
    python bench.py --mode=step                   # the reference decode step: P = 8 against P = 1 at GPT-2-small
    python experiments/cost_sweep.py              # the research sweep (batches x contexts x MHA/GQA x paths), training cost
    (no multi-GPU run: every measurement is one model on one device)

The lesson (the default). For one base shape and every P it builds the ParScale model with P streams
and a "width-matched" P = 1 model of the same depth whose non-embedding parameter count is closest to
N_base * (1 + k ln P), what P streams are worth by the scaling law (k = 0.39 on code, section 3).
At batch 1 it prefills a 64-token prompt and decodes after it, then decodes at a context near 1,000
tokens, whose cache is filled directly with random keys and values (a 1,000-token prefill takes
minutes on a CPU at P = 8). For each model it prints N, the counted weights and KV cache, the measured
peak memory, the prefill time and the ms per decode step (median [min, max] over the runs), and for
each P the ratio of width scaling's increase over P = 1 to ParScale's, beside the paper's analytic
22x memory and 6x latency (an A100, batch 1). Then one JSON line with everything. ParScale's increase
is measured against its own backbone run as P = 1 in the same process, one step each in turn (the
machine's speed drifts by more than the increase); width's against every P = 1 run of the session.

The "paper" preset is N-matched to the paper's 1.6B model in this codebase's architecture: 36 layers,
width 2048, 16 query heads and 2 key/value heads of head_dim 128, vocabulary 151,936, 48 prefix slots,
a 4x GELU MLP and learned positions; N = 1.549B. The paper's model is 1536 wide with head_dim 96 and a
SwiGLU MLP (and RoPE), so our KV cache per token is 4/3 of its.

Measured memory: on CUDA, the allocator's peak. On a CPU each model runs in its own process, and its
peak is that process's peak resident memory above a baseline process's, which runs the same code on a
one-layer model: it includes the weights, the KV cache, activations and allocator slack, not the
torch runtime. The counted weights and KV cache stand beside it. Floor = the bytes one decode step
must read (every weight once, the LM head included, plus the KV cache) over a read bandwidth measured
in the same run on a buffer larger than the last cache level.
A mistake the user can fix (a bad flag value, a GPU or matplotlib that is not there) ends as one
`error: ...` line naming the flag, exit status 1, before anything is measured.
"""

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time

import torch

from common import UserError, resolve_device, resolve_dtype
from measure import (PRESETS, EagerDecoder, build_model, decode_paths, fill_cache, floor_bytes, free_memory,
                     int_list, kv_bytes, measure_isolated, measure_model, model_family, param_counts, read_bandwidth,
                     resource, rounded, step, step_allocations, synchronize, with_threads_and_dtype)
from model import GPTConfig

try:  # only for --plot; the object-oriented API needs no backend choice (no import-time side effects)
    from matplotlib.figure import Figure
except ImportError:
    Figure = None

# The paper's analytic figures (section 3.3, Figure 4: 1.6B, P = 8, A100): width scaling's memory and
# latency increase over ParScale's, by batch size
PAPER_RATIOS = {1: (22, 6), 2: (12.8, 3.2), 4: (6.9, 1.7), 8: (3.6, 0.9)}


# -----------------------------------------------------------------------------
# the lesson: one shape, one batch, a short and a long context (the default run)

def ratio_spread(width_inc, parscale_inc):
    """
    Width scaling's increase over P = 1 divided by ParScale's, from lists of measured increases: (the
    ratio of the medians, the smallest and the largest over every pair). inf where ParScale's increase
    is not above zero. The spread matters: the ratio divides by a small difference.
    """
    def ratio(w, p):
        return w / p if p > 0 else math.inf

    pairs = [ratio(w, p) for w in width_inc for p in parscale_inc]
    return ratio(statistics.median(width_inc), statistics.median(parscale_inc)), min(pairs), max(pairs)


def increases(m, pool, key):
    """A model's increase over P = 1 in every run. ParScale: against its own backbone's run beside it
    (same process, step for step). Width: against every P = 1 run in `pool` (the base's own process and
    every ParScale process's backbone), so that no single process's luck sets the base."""
    if f"base_{key}" in m:
        return [a - b for a, b in zip(m[key], m[f"base_{key}"])]
    return [a - b for a in m[key] for b in pool[key]]


def lesson_rows(family, args):
    """
    Every model's derived numbers (MB, floor, increase) and, for each P > 1, width's increase over
    ParScale's. family: model_family's list, each model with measure_model's results merged in (its
    peaks less the baseline process's). Pure arithmetic: the tests feed it fixed timings.
    """
    item = args.dtype.itemsize
    base = family[0]
    for m in family:
        cfg, counts = m["cfg"], param_counts(m["cfg"])
        m["weights_mb"] = (counts["embedding"] + counts["non_embedding"]) * item / 2**20
        m["prefix_mb"] = counts["prefixes"] * item / 2**20
        for ctx, phase in ((args.prompt, "short"), (args.long_context, "long")):
            m[f"kv_{phase}_mb"] = kv_bytes(cfg, args.batch, ctx, item) / 2**20
            m[f"counted_{phase}"] = m["weights_mb"] + m[f"kv_{phase}_mb"]
            step = statistics.median(m[f"step_{phase}_s"])  # the floor at the runs' mean context
            m[f"floor_{phase}"] = floor_bytes(cfg, counts, args.batch, ctx + args.steps / 2, item) / args.bandwidth / step
        # the paper's protocol: a 64-token prefill, then 64 decode steps (timed at the short context)
        for who in ("", "base_"):
            if f"{who}prefill_s" in m:
                m[f"{who}total_s"] = [p + 64 * s for p, s in zip(m[f"{who}prefill_s"], m[f"{who}step_short_s"])]
    keys = ("prefill_s", "step_short_s", "step_long_s", "total_s")
    pool = {key: base[key] + [t for m in family for t in m.get(f"base_{key}", [])] for key in keys}
    for m in family[1:]:
        m["step_increase"] = statistics.median(increases(m, pool, "step_short_s")) / statistics.median(
            m.get("base_step_short_s", pool["step_short_s"]))
    ratios = []
    for P in sorted({m["P"] for m in family} - {1}):
        par = next(m for m in family if m["side"] == "parscale" and m["P"] == P)
        wid = next(m for m in family if m["side"] == "width" and m["P"] == P)
        r = dict(P=P, target=par["target"], width_N=wid["non_embedding"])
        for key in ("peak_short", "peak_long", "counted_short", "counted_long"):
            r[f"memory_{key}"] = None if base[key] is None else ratio_spread([wid[key] - base[key]], [par[key] - base[key]])[0]
        for key in keys:
            r[key] = ratio_spread(increases(wid, pool, key), increases(par, pool, key))
        ratios.append(r)
    return ratios, pool


def print_lesson(family, ratios, args):
    """The lesson's table: at most 25 lines (what a student reads), each timing with its spread."""
    def mb(b):
        return "n/a" if b is None else f"{b / 2**20:,.0f}"

    def spread(v, scale, fmt):
        return f"{scale * statistics.median(v):{fmt}} [{scale * min(v):{fmt}}, {scale * max(v):{fmt}}]"

    def x(r):
        return "n/a" if r is None else "inf" if r == math.inf else f"{r:.1f}x"

    def n(v):
        return f"{v / 1e9:.3f}B" if v >= 1e9 else f"{v / 1e6:.1f}M" if v >= 1e6 else f"{v / 1e3:.0f}k"

    base, T, L = family[0], args.prompt, args.long_context
    print(f"{'model':10} {'width':>5} {'N':>7} {'weights':>8} {'KV+prefix MB':>13} {'peak MB':>13} | {f'prefill {T} tok, s':>19} | "
          f"{f'decode step @{T}, ms':>24} {'floor':>5} | {f'decode step @{L}, ms':>19} {'floor':>5}")
    print(f"{'':10} {'':>5} {'':>7} {'MB':>8} {f'@{T} / @{L}':>13} {f'@{T} / @{L}':>13} | {'median [min, max]':>19} | "
          f"{'median [min, max] +base':>24} {'':>5} | {'median [min, max]':>19}")
    for m in family:
        kv = f"{m['kv_short_mb'] + m['prefix_mb']:,.1f} / {m['kv_long_mb'] + m['prefix_mb']:,.1f}"
        peak = f"{mb(m['peak_short'])} / {mb(m['peak_long'])}"
        short = spread(m["step_short_s"], 1e3, ",.0f") + ("" if m is base else f" {100 * m['step_increase']:+.0f}%")
        print(f"{m['label']:10} {m['cfg'].n_embd:5d} {n(m['non_embedding']):>7} {m['weights_mb']:8,.1f} {kv:>13} {peak:>13} | "
              f"{spread(m['prefill_s'], 1, '.2f'):>19} | {short:>24} {100 * m['floor_short']:4.0f}% | "
              f"{spread(m['step_long_s'], 1e3, ',.0f'):>19} {100 * m['floor_long']:4.0f}%")
    paper = PAPER_RATIOS.get(args.batch)
    print(f"width scaling's increase over P=1 / ParScale's (> 1: ParScale cheaper); latency: ratio of the median increases "
          f"[min, max over every pair of runs]; the paper (analytic, A100, P=8, batch {args.batch}): "
          + (f"{paper[0]}x memory, {paper[1]}x latency" if paper else "not given for this batch"))
    print(f"{'P':>2} {'target N':>8} {'width N':>8} | {f'memory peak @{T} / @{L}':>22} {f'counted @{T} / @{L}':>19} | "
          f"{f'decode @{T}':>22} {f'decode @{L}':>22} {'prefill + 64 steps':>22}")
    for r in ratios:
        peak = f"{x(r['memory_peak_short'])} / {x(r['memory_peak_long'])}"
        counted = f"{x(r['memory_counted_short'])} / {x(r['memory_counted_long'])}"
        lat = [f"{x(t[0])} [{x(t[1])}, {x(t[2])}]" for t in (r["step_short_s"], r["step_long_s"], r["total_s"])]
        print(f"{r['P']:2d} {n(r['target']):>8} {n(r['width_N']):>8} | {peak:>22} {counted:>19} | "
              f"{lat[0]:>22} {lat[1]:>22} {lat[2]:>22}")


def plot_lesson(family, ratios, pool, args):
    """Memory and decode-latency increase over P = 1 against P, both ways of scaling, and their ratio
    beside the paper's analytic points."""
    fig = Figure(figsize=(12, 3.6), layout="constrained")
    ax_mem, ax_lat, ax_ratio = fig.subplots(1, 3)
    base = family[0]
    for side, style, name in (("parscale", "-o", "ParScale (P streams)"), ("width", "--s", "width (N_base(1 + k ln P))")):
        ms = [m for m in family if m["side"] == side]
        Ps = [1] + [m["P"] for m in ms]
        if base["peak_short"] is not None:
            ax_mem.plot(Ps, [0] + [(m["peak_short"] - base["peak_short"]) / 2**20 for m in ms], style, label=name)
        ax_lat.plot(Ps, [0] + [1e3 * statistics.median(increases(m, pool, "step_short_s")) for m in ms], style, label=name)
    Ps = [r["P"] for r in ratios]
    if ratios[0]["memory_peak_short"] is not None:
        ax_ratio.plot(Ps, [r["memory_peak_short"] for r in ratios], "-o", label="memory (peak), measured")
    cap = 100.0  # a ratio whose ParScale increase was not above zero (inf) is drawn at the cap
    lat = [[min(v, cap) for v in r["step_short_s"]] for r in ratios]
    ax_ratio.errorbar(Ps, [t[0] for t in lat], yerr=[[t[0] - t[1] for t in lat], [t[2] - t[0] for t in lat]],
                      fmt="-s", capsize=3, label=f"decode step, measured [min, max]; inf drawn at {cap:.0f}")
    paper = PAPER_RATIOS.get(args.batch)
    if paper:
        ax_ratio.plot([8, 8], paper, "k*", markersize=10, label=f"paper, analytic ({paper[0]}x, {paper[1]}x)")
    for ax, title, unit in ((ax_mem, f"peak memory increase, context {args.prompt}", "MB"),
                            (ax_lat, f"decode step increase, context {args.prompt}", "ms"),
                            (ax_ratio, "width's increase / ParScale's", "x")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("P")
        ax.set_ylabel(unit)
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    ax_ratio.set_yscale("log")
    fig.suptitle(f"ParScale vs width scaling, measured: {args.preset_name} preset, batch {args.batch}, {args.device_name}, "
                 f"{str(args.dtype).removeprefix('torch.')}", fontsize=10)
    fig.savefig(args.plot, dpi=120)


def lesson(args):
    """The default run: measure every model of the family, print the table; returns the JSON's dict."""
    kv = args.n_kv_head or args.n_head
    base_cfg = GPTConfig(n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head, n_kv_head=kv, vocab_size=args.vocab_size,
                         n_prefix=args.n_prefix, dropout=0.0, block_size=args.long_context + args.steps)
    family = model_family(base_cfg, args.streams, args.k)
    args.bandwidth, bw_how = read_bandwidth(args.device)
    isolate = args.device.type == "cpu" and resource is not None
    spec = dict(device=str(args.device), dtype=str(args.dtype).removeprefix("torch."), batch=args.batch, prompt=args.prompt,
                long_context=args.long_context, steps=args.steps, repeats=args.repeats, seed=args.seed,
                threads=torch.get_num_threads(), path=args.paths[0])
    print(f"ParScale vs width scaling at the {args.preset_name} preset: {args.n_layer} layers, width {args.n_embd}, "
          f"{args.n_head}/{kv} heads of {args.n_embd // args.n_head}, vocab {args.vocab_size}, {args.n_prefix} prefix slots; "
          f"k = {args.k}")
    print(f"{args.device_name}, torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype_why}, "
          f"{args.paths[0]} path ({args.fused_reason}); read bandwidth {args.bandwidth / 1e9:.1f} GB/s ({bw_how})")
    print(f"batch {args.batch}; prompt {args.prompt} tokens, prefilled; decode steps after it (@{args.prompt}) and at "
          f"@{args.long_context} (that cache filled directly with random keys/values, not prefilled); "
          f"{args.repeats} runs x {args.steps} steps; ParScale's increase is paired with its own backbone run as P=1 beside it, "
          f"width's is against every P=1 run; peak = "
          + ("CUDA allocator peak" if args.device.type == "cuda" else
             "peak RSS of the model's own process above a baseline process's" if isolate else "n/a (no resource module)"))
    baseline = 0
    if isolate:
        tiny = dataclasses.replace(base_cfg, n_layer=1, n_embd=64, n_head=1, n_kv_head=1, vocab_size=256, n_streams=1, n_prefix=0)
        baseline = measure_isolated({**spec, "config": dataclasses.asdict(tiny), "pair": False})["peak_long"]
    t_start = time.time()
    for i, m in enumerate(family):
        print(f"[bench] {i + 1}/{len(family)}: {m['label']} (width {m['cfg'].n_embd}), {time.time() - t_start:.0f} s so far",
              file=sys.stderr, flush=True)
        run = (measure_isolated if isolate else measure_model)({**spec, "config": dataclasses.asdict(m["cfg"]),
                                                                "pair": m["side"] == "parscale"})
        for key in ("peak_short", "peak_long"):
            if run[key] is not None:
                run[key] -= baseline
        m.update(run)
        free_memory(args.device)
    ratios, pool = lesson_rows(family, args)
    print_lesson(family, ratios, args)
    if args.plot:
        plot_lesson(family, ratios, pool, args)
    models = [{k: v for k, v in m.items() if k != "cfg"} | dict(n_embd=m["cfg"].n_embd, n_head=m["cfg"].n_head,
                                                                    n_kv_head=m["cfg"].n_kv_head) for m in family]
    return dict(preset=args.preset_name, batch=args.batch, prompt=args.prompt, long_context=args.long_context, steps=args.steps,
                repeats=args.repeats, dtype=str(args.dtype), dtype_why=args.dtype_why, bandwidth=args.bandwidth,
                bandwidth_how=bw_how, path=args.paths[0], baseline_peak=baseline, models=models, ratios=ratios, base_pool=pool,
                paper=PAPER_RATIOS.get(args.batch))


# -----------------------------------------------------------------------------
# --mode=step: the reference decode step of P = 8 against P = 1, with its targets

STEP_TARGETS = {128: 1.25, 960: 2.1}  # P = 8 / P = 1 per decode step at these contexts (README, bench.py section)


@torch.no_grad()
def step_check(args):
    """
    P = 8 against P = 1 per decode step on the reference path (model.py + KVCache), batch 1, at the
    contexts of STEP_TARGETS, with the two models' steps interleaved so that the machine's drift hits
    both alike. Each cache holds exactly the context plus the new token, filled directly. Prints the
    ratio (median of per-round ratios, [min, max]) beside the bytes ratio (the floor) and the target.
    """
    kv = args.n_kv_head or args.n_head
    cfgs = {P: GPTConfig(n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head, n_kv_head=kv, vocab_size=args.vocab_size,
                         n_prefix=args.n_prefix, n_streams=P, dropout=0.0, block_size=max(STEP_TARGETS) + 1) for P in (1, 8)}
    models = {P: build_model(cfg, args.device, args.dtype, args.seed) for P, cfg in cfgs.items()}
    rounds = args.steps * args.repeats
    print(f"decode step, reference path (model.py + KVCache), {args.device_name}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {args.dtype_why}")
    print(f"shape: {args.n_layer} layers, width {args.n_embd}, {args.n_head}/{kv} heads, vocab {args.vocab_size}, "
          f"{args.n_prefix} prefix slots; batch 1; {rounds} rounds of one P=1 step then one P=8 step per context")
    print(f"{'ctx':>5} | {'P=1 ms':>18} | {'P=8 ms':>18} | {'P=8 / P=1':>18} {'bytes':>5} {'target':>6} | alloc/step KiB P=1, P=8")
    out = []
    for ctx, target in STEP_TARGETS.items():
        decs = {P: EagerDecoder(m, 1, max_len=ctx + 1) for P, m in models.items()}
        for dec in decs.values():
            fill_cache(dec, ctx, args.seed)
        alloc = {P: step_allocations(models[P], dec) for P, dec in decs.items()}
        times = {1: [], 8: []}
        tok = torch.zeros(1, 1, dtype=torch.long, device=args.device)
        for i in range(rounds + 2):  # two warm-up rounds
            for P, dec in decs.items():
                dec.cache.pos = ctx
                t = step(dec, tok, args.device)[0]
                if i >= 2:
                    times[P].append(t)
        per_round = [b / a for a, b in zip(times[1], times[8])]
        counts = {P: param_counts(cfg) for P, cfg in cfgs.items()}
        floor = (floor_bytes(cfgs[8], counts[8], 1, ctx + 1, args.dtype.itemsize)
                 / floor_bytes(cfgs[1], counts[1], 1, ctx + 1, args.dtype.itemsize))
        r = dict(context=ctx, p1_ms=[1e3 * t for t in times[1]], p8_ms=[1e3 * t for t in times[8]],
                 ratio=statistics.median(per_round), ratio_min=min(per_round), ratio_max=max(per_round),
                 bytes_ratio=floor, target=target, ok=statistics.median(per_round) <= target,
                 alloc_p1=alloc[1], alloc_p8=alloc[8])
        out.append(r)
        ms = lambda v: f"{statistics.median(v):6.1f} [{min(v):4.1f}, {max(v):4.1f}]"  # noqa: E731
        print(f"{ctx:5d} | {ms(r['p1_ms']):>18} | {ms(r['p8_ms']):>18} | {r['ratio']:6.2f} [{r['ratio_min']:.2f}, {r['ratio_max']:.2f}] "
              f"{floor:5.2f} {'<= ' + str(target):>6} | {alloc[1] / 2**10:,.0f}, {alloc[8] / 2**10:,.0f}")
    # what 8 rows cost over 1 in one block's four Linears, where P = 8 pays beyond its bytes when the cache is short
    block = models[1].transformer.h[0]
    rows = {n: sum(linear_time(lin, n, args.device) for lin in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc,
                                                               block.mlp.c_proj)) for n in (1, 8)}
    print(f"one block's four Linears, median: {rows[1]:.3f} ms for 1 row, {rows[8]:.3f} ms for 8 rows ({rows[8] / rows[1]:.2f}x)")
    print("targets: " + ", ".join(f"P=8/P=1 at ctx {r['context']} = {r['ratio']:.2f} ({'OK' if r['ok'] else 'MISSED'}, <= {r['target']})"
                                  for r in out))
    return dict(step=out, linear_ms=rows)


def linear_time(linear, rows, device, reps=30):
    """Median ms of one Linear on `rows` rows (after 5 warm-up calls)."""
    x = torch.randn(rows, linear.in_features, device=device, dtype=linear.weight.dtype)
    times = []
    for _ in range(reps + 5):
        t0 = time.perf_counter()
        linear(x)
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[5:]) * 1e3


# -----------------------------------------------------------------------------

def check_args(args):
    """Values argparse cannot check, after the preset filled the gaps: one `error:` line each, naming the flag."""
    for flag, low in [("n_layer", 1), ("n_embd", 1), ("n_head", 1), ("n_kv_head", 0), ("vocab_size", 1), ("n_prefix", 0),
                      ("repeats", 1), ("batch", 1), ("prompt", 1), ("long_context", 1), ("steps", 1)]:
        if getattr(args, flag) < low:
            raise UserError(f"--{flag} must be >= {low}, got {getattr(args, flag)}")
    if args.n_embd % args.n_head:
        raise UserError(f"--n_embd={args.n_embd} must be a multiple of --n_head={args.n_head} (head_dim = n_embd / n_head)")
    if args.n_kv_head and args.n_head % args.n_kv_head:
        raise UserError(f"--n_kv_head={args.n_kv_head} must divide --n_head={args.n_head} (0 = n_head, multi-head attention)")
    if not args.streams or min(args.streams) < 1:
        raise UserError(f"--streams must list integers >= 1, comma-separated; got {args.streams}")
    if max(args.streams) > 1 and args.n_prefix < 1:
        raise UserError(f"--n_prefix must be >= 1 when --streams has a P > 1 (without a prefix every stream is the same), got {args.n_prefix}")
    if not (math.isfinite(args.k) and args.k >= 0):
        raise UserError(f"--k must be a finite number >= 0 (the paper fits 0.39 on code, 0.33 on the Pile), got {args.k}")
    if args.threads == 0 or args.threads < -1:
        raise UserError(f"--threads must be >= 1, or -1 for all cores; got {args.threads}")
    if args.plot:
        if Figure is None:
            raise UserError(f"--plot={args.plot} needs matplotlib, which is not importable here; pip install matplotlib, or drop --plot")
        if args.mode == "step":
            raise UserError(f"--plot draws the lesson's cost figure; --mode={args.mode} has none")
        if not os.path.isdir(os.path.dirname(os.path.abspath(args.plot))):
            raise UserError(f"--plot={args.plot}: its folder does not exist; create it or choose another path")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["lesson", "step"], default="lesson",
                   help="lesson: the cost claim at one shape (default); step: the reference decode step, P=8 vs P=1 "
                        "(the research sweep and the training cost: experiments/cost_sweep.py)")
    p.add_argument("--preset", choices=["auto", *PRESETS], default="auto",
                   help="shapes and sizes; auto = paper for the lesson, gpt2 for step; flags below override it")
    # model
    p.add_argument("--n_layer", type=int, default=None, help="None = preset")
    p.add_argument("--n_embd", type=int, default=None, help="None = preset")
    p.add_argument("--n_head", type=int, default=None, help="None = preset; head_dim = n_embd / n_head stays fixed when width scales")
    p.add_argument("--n_kv_head", type=int, default=None, help="lesson and step: kv heads, 0 = n_head (MHA); None = preset (paper: 2)")
    p.add_argument("--vocab_size", type=int, default=None, help="None = preset (paper: 151936, gpt2: 50257)")
    p.add_argument("--n_prefix", type=int, default=None, help="prefix slots per layer per stream; None = preset (48, the paper's)")
    p.add_argument("--streams", type=int_list, default=[1, 2, 4, 8], help="P values, comma-separated; P=1 is the base")
    p.add_argument("--k", type=float, default=0.39, help="scaling-law k: P streams are worth N_base(1 + k ln P) (0.39 code, 0.33 Pile)")
    p.add_argument("--seed", type=int, default=0, help="the random weights' seed (their values do not matter for cost)")
    # the lesson (and step)
    p.add_argument("--batch", type=int, default=1, help="lesson: batch size (the paper's claim is for batch 1)")
    p.add_argument("--prompt", type=int, default=None, help="lesson: prompt tokens, prefilled; None = preset (paper: 64, the paper's L_in)")
    p.add_argument("--long_context", type=int, default=None, help="lesson: the long context, its cache filled directly; None = preset (1000)")
    p.add_argument("--steps", type=int, default=None, help="lesson: decode steps per run; step: rounds = steps x repeats; None = preset")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per measurement (median, min, max reported); None = preset")
    p.add_argument("--paths", default="auto", choices=["auto", "fused", "eager"],
                   help="auto = fused when kernels/fused.py works here, else eager; fused errors out if unavailable")
    p.add_argument("--plot", default="", help="write the cost figure to this PNG (needs matplotlib); empty = no figure")
    # system
    p.add_argument("--device", default="auto", help="auto = cuda when available, else cpu")
    p.add_argument("--threads", type=int, default=-1, help="torch CPU threads; -1 = every core this process may use")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                   help="decode dtype; auto = bfloat16 on CUDA; on CPU bfloat16 where a start-up probe finds torch's bf16 "
                        "matmul at least as fast as fp32, else float32")
    args = p.parse_args(argv)

    args.device = torch.device(resolve_device(args.device, allowed=("cpu", "cuda"), who="bench.py"))
    cuda = args.device.type == "cuda"
    args.preset_name = args.preset if args.preset != "auto" else {"lesson": "paper", "step": "gpt2"}[args.mode]
    for key, value in PRESETS[args.preset_name].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    check_args(args)
    if args.dtype != "auto":  # checked before anything is measured; auto is resolved in main, threads set
        resolve_dtype(args.dtype, args.device)
    args.device_name = torch.cuda.get_device_name(args.device) if cuda else "CPU"
    if 1 not in args.streams:
        args.streams = [1] + args.streams  # the P=1 base is what every increase is measured from

    args.paths, args.fused_reason = decode_paths(args.paths, args.device)
    return args


def main(argv=None):
    return with_threads_and_dtype(parse_args(argv), run)


def run(args):
    t0 = time.time()
    result = dict(mode=args.mode, device=args.device_name, torch=torch.__version__, threads=torch.get_num_threads(),
                  dtype=str(args.dtype).removeprefix("torch."), paths=args.paths, fused_reason=args.fused_reason,
                  shape=dict(n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head, vocab_size=args.vocab_size,
                             n_prefix=args.n_prefix), streams=args.streams, k=args.k)
    if args.mode == "lesson":
        result.update(lesson(args))
    else:
        result.update(step_check(args))
    result["elapsed_s"] = time.time() - t0
    print(f"elapsed {result['elapsed_s']:.1f} s")
    print(json.dumps(rounded(result)), flush=True)
    return result


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except UserError as e:  # a mistake the user can fix: one line, no traceback; anything else is a bug
        sys.exit("error: " + " ".join(str(e).split("\n")))
