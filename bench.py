"""
ParScale's cost claim, measured on the machine in front of you: the memory and latency P streams add, against the
same gain bought by a wider model (arXiv 2505.10475, section 3.3 and Figure 4).

    python bench.py                                   # the lesson at the paper's 1.6B scale: ~5 min on a 2-core CPU
    python bench.py --preset=tiny                     # the same card for a toy model, in seconds
    python bench.py --device=cuda --batch=8           # on one GPU (fused path when it works here), batch 8
    python bench.py --plot=cost.png --json=cost.json  # also the figure (bench_plot.py), and every timing
    python bench.py --mode=step                       # the reference decode step, P = 8 against P = 1 (bench_step.py)
    (no multi-GPU run: every measurement is one model on one device)

For each P: the model with P streams, and the P = 1 model wide enough to hold what P streams are worth by the law;
each latency increase timed in pairs with its own P = 1, beside the machine's roofline (docs/bench.md explains it
all). A mistake the user can fix ends as one `error: ...` line, exit status 1, before anything is measured.
"""

import argparse
import contextlib
import importlib.util
import io
import json
import math
import multiprocessing
import os
import statistics
import sys
import textwrap
import time
from dataclasses import asdict

import torch

from cli import ArgumentParser, RenamedFlag, UserError, entry, int_list, model_config, resolved
from machine import linear_seconds, proc_value, resolve_device, resolve_dtype
from measure import (MIN_PAIRS, PRESETS, decode_paths, increase, kv_bytes, measure_model, model_family, param_counts,
                     read_bandwidth, with_threads_and_dtype)
from model import GPTConfig

PAPER = {1: (22, 6), 2: (12.8, 3.2), 4: (6.9, 1.7), 8: (3.6, 0.9)}  # width's increase over P=8's: memory, latency
RAM_CAP = 12e9  # the lesson's most on a CPU: in fp32 the paper preset would pass it, so auto turns bf16 there
PHASES = {"decode": "decode step @{T}", "long": "decode step @{L}", "prefill": "prefill {T} tokens"}


def roofline(args):
    """This machine's roofline: read bandwidth (bytes/s), and a Linear of the MLP's shape timed at 1 to 512 rows:
    seconds per weight, best FLOP/s, ridge point (FLOP/byte)."""
    w = torch.randn(4 * args.n_embd, args.n_embd, device=args.device, dtype=args.dtype)
    bandwidth = read_bandwidth(args.device)
    per_weight = {r: linear_seconds(w, r, reps=5) / w.numel()
                  for r in sorted({2**i for i in range(10)} | {P * args.batch for P in args.stream_counts})}
    peak = max(2 * r / s for r, s in per_weight.items())
    return dict(shape=list(w.shape), per_weight=per_weight, peak_flops=peak, ridge=peak / bandwidth,
                bandwidth=bandwidth, itemsize=args.dtype.itemsize)


def weight_s(rows, roof):
    """A weight's seconds at `rows` rows: the larger of reading it and its measured compute (scaled past the ladder)."""
    ladder, top = roof["per_weight"], max(roof["per_weight"])
    compute = ladder[min(r for r in ladder if r >= rows)] if rows <= top else ladder[top] * rows / top
    return max(roof["itemsize"] / roof["bandwidth"], compute)


def predicted_s(cfg, args, roof, phase):
    """A phase's seconds by the roofline: the body at P*B rows (P*B*T in the prefill), the LM head at B, the cache."""
    T, rows = args.prompt, cfg.n_streams * args.batch
    kv = kv_bytes(cfg, args.batch, args.long_context if phase == "long" else T, roof["itemsize"])
    return (param_counts(cfg)["non_embedding"] * weight_s(rows * (T if phase == "prefill" else 1), roof)
            + cfg.vocab_size * cfg.n_embd * weight_s(args.batch, roof) + kv / roof["bandwidth"])


def ratio(par, wid):
    """Width's increase over ParScale's from (median, lo, hi) increases, as (text, short form): a ratio only where
    ParScale's interval excludes zero, else the bounds; never inf or negative, below 1 "ParScale dearer here"."""
    if par[1] > 0:
        r = wid[0] / par[0]
        return (f"{r:.1f}x",) * 2 if r >= 1 else ("ParScale dearer here", "dearer")
    if par[2] <= 0:
        return "ParScale's increase is not above zero", "none"
    bound, text = wid[1] / par[2], f"ParScale's increase is within noise, below {pct(par[2])}"
    return (f"{text}: at least {bound:.0f}x", f">={bound:.0f}x") if bound >= 1 else (text, "noise")


def pct(x):
    return f"{100 * x:+.1f}%" if abs(x) < 0.1 else f"{100 * x:+.0f}%"


def summarise(family, args, roof, phases):
    """Each model's increase over P = 1 (memory MB, latency, the roofline's); for each P width's over ParScale's."""
    base, ratios = family[0], []
    base["memory_mb"] = [None if v is None else v / 2**20 for v in base["peak"]]  # the base's own peak, above torch
    for m in family[1:]:
        m["memory_mb"] = [None if None in (a, b) else (a - b) / 2**20 for a, b in zip(m["peak"], base["peak"])]
        m["latency"] = {ph: increase(*m[ph]) for ph in phases}
        m["roofline"] = {ph: predicted_s(m["cfg"], args, roof, ph) / predicted_s(base["cfg"], args, roof, ph) - 1
                         for ph in PHASES}
    for par, wide in zip(family[1::2], family[2::2]):  # memory: one measurement each, an interval of none
        mem = [ratio((p,) * 3, (w,) * 3) if p is not None else ("n/a",) * 2
               for p, w in zip(par["memory_mb"], wide["memory_mb"])]
        ratios.append(dict(P=par["P"], memory=mem[0], memory_long=mem[1],
                           **{ph: ratio(par["latency"][ph], wide["latency"][ph]) for ph in phases}))
    return ratios


def card(family, ratios, args, roof, need, phases):
    """The card: at most 24 lines, none over 120 characters."""
    T, L, B, base, dt = args.prompt, args.long_context, args.batch, family[0], str(args.dtype)[6:]
    pw, top, paper = roof["per_weight"], max(args.stream_counts) * B, PAPER.get(B)
    # nearly free: the most rows (P*B, P whole) whose Linear costs within 10% of what B rows cost
    free = max(r for r in pw if r % B == 0 and weight_s(r, roof) <= 1.1 * weight_s(B, roof)) // B
    n, why = [len(m[ph][0]) for m in family[1:] for ph in phases], f"ridge point {roof['ridge']:.0f} FLOP/byte"
    more = weight_s(2 * free * B, roof) / weight_s(B, roof)  # what twice as many rows cost
    lines = [f"P streams against width, the {args.preset_name} preset: {args.n_layer} layers, width {args.n_embd}, "
             f"{args.n_head}/{args.n_kv_head or args.n_head} heads, vocab {args.vocab_size}, {args.n_prefix} prefix "
             "slots",
             f"{args.device_name}, torch {torch.__version__}, {torch.get_num_threads()} threads, batch {B}; "
             f"{args.paths[0]} path ({args.fused_reason}); dtype {args.dtype_why}",
             f"roofline: reads {roof['bandwidth'] / 1e9:.1f} GB/s; a {roof['shape'][1]}x{roof['shape'][0]} {dt} Linear:"
             " "
             f"{1e3 * pw[1] * 4 * args.n_embd**2:.2f} ms at 1 row, {pw[top] / pw[1]:.1f}x at {top}; best "
             f"{roof['peak_flops'] / 1e12:.2f} TFLOP/s: {why}",
             f"So streams stay nearly free here up to P={free} at batch {B}: a {free * B}-row Linear costs what reading"
             f" its weights costs ({free * B * 2 // args.dtype.itemsize} FLOP per byte of {dt} weights, {why}); a "
             f"{2 * free * B}-row one, {more:.1f}x.",
             f"latency: median increase over the model's own P=1 [95% bootstrap interval], {min(n)}-{max(n)} pairs "
             "each; pred = the roofline's" + "".join(f"; {PHASES[p].format(T=T, L=L)} not timed ({MIN_PAIRS} pairs: "
                                                     f"~{need[p]:.0f} s)" for p in PHASES if p not in phases)]
    lines = [line for t in lines for line in textwrap.wrap(t, 120, subsequent_indent="  ")]
    lines.append(f"{'model':9} {'width':>5} {'N':>5} | {f'MB @{T} / @{L}':>15} | " + " | ".join(
        f"{PHASES[ph].format(T=T, L=L) + ('' if ph == 'prefill' else ' pred'):>24}" for ph in phases))
    for m in family:
        x, mb = m.get("latency"), ["n/a" if v is None else f"{v:{'+' * (m is not base)},.0f}" for v in m["memory_mb"]]
        cells = [f"{1e3 * statistics.median(t for o in family[1:] for t in o[ph][0]):,.1f} ms" if m is base else
                 "{} [{:.{d}f}, {:.{d}f}]".format(pct(x[ph][0]), *(100 * v for v in x[ph][1:]), d=+(abs(x[ph][0]) < .1))
                 + ("" if ph == "prefill" else f" {pct(m['roofline'][ph]):>5}") for ph in phases]
        lines.append(f"{m['label']:9} {m['cfg'].n_embd:5d} {m['non_embedding'] / 1e9:4.2f}B | {' / '.join(mb):>15} | "
                     + " | ".join(f"{c:>24}" for c in cells))
    p8 = [f" (paper {paper[i]}x)" if paper and r["P"] == 8 else "" for r in ratios for i in (0, 1)]
    note = f" (the paper's for P=8, batch {B}: computed, A100)" if paper else ""
    lines.append(f"width's increase over ParScale's, measured here{note}")
    lines.append("memory: " + ", ".join(f"P={r['P']} {r['memory'][1]}{p8[2 * i]}" for i, r in enumerate(ratios))
                 + f" at {T} tokens; " + ", ".join(r["memory_long"][1] for r in ratios) + f" at {L}")
    lines += [f"P={r['P']} decode step @{T}: {r['decode'][0]}{p8[2 * i + 1]}" for i, r in enumerate(ratios)]
    r, par, late = ratios[-1], family[-2], ("", "latency not timed")
    holds = r["decode"][1].endswith("x") and r["memory"][1].endswith("x")
    prefill = f"{r['prefill'][1]}: ParScale {pct(par['latency']['prefill'][0])}" if "prefill" in r else "not timed"
    return lines + textwrap.wrap(
        f"So here the claim {'holds' if holds else 'does not hold'} at batch {B}, {T} tokens (P={r['P']}: "
        f"{r['memory'][1]} memory, {r['decode'][1]} latency); it weakens with context ({L} tokens: "
        f"{r['memory_long'][1]}, {r.get('long', late)[1]}), in the prefill ({prefill}) and with batch (P*B rows stay "
        f"free up to {free * B} here).", 120, subsequent_indent="  ")


def lesson(args, t0):
    """The default run: measure, print the card; returns everything (the --json file)."""
    cfg = GPTConfig(n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head, n_kv_head=args.n_kv_head,
                    vocab_size=args.vocab_size, n_prefix=args.n_prefix, block_size=args.long_context + 1)
    family = model_family(cfg, args.stream_counts, args.law_k)
    args = memory_fit(family, args)
    roof = roofline(args)
    spec = dict(device=str(args.device), dtype=str(args.dtype)[6:], batch=args.batch, prompt=args.prompt,
                path=args.paths[0], long_context=args.long_context, threads=torch.get_num_threads(), base=asdict(cfg))
    # the long context and the prefill are timed where the roofline says MIN_PAIRS pairs of each fit a third of budget
    need = {ph: MIN_PAIRS * sum(predicted_s(c, args, roof, ph) for m in family[1:] for c in (m["cfg"], cfg))
            for ph in PHASES}
    phases = ["decode"] + [ph for ph in ("long", "prefill") if need[ph] <= args.budget / 3]
    seconds = args.budget / (len(family) - 1) / len(phases)  # for each increase, beyond its MIN_PAIRS pairs
    for i, m in enumerate(family):  # each in a process of its own
        print(f"[bench] {i + 1}/{len(family)}: {m['label']}, {time.time() - t0:.0f} s", file=sys.stderr)
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            m.update(pool.apply(measure_model, ({**spec, "config": asdict(m["cfg"]),
                                                 "phases": {ph: seconds for ph in phases} if i else {}},)))
    ratios = summarise(family, args, roof, phases)
    print("\n".join(card(family, ratios, args, roof, need, phases)))
    if args.plot:
        import bench_plot  # the figure's code and matplotlib, for --plot alone
        bench_plot.plot_lesson(family, args, phases)
    return dict(models=[{k: v for k, v in m.items() if k != "cfg"} | dict(config=asdict(m["cfg"])) for m in family],
                ratios=ratios, pair_seconds=seconds, roofline=roof, phases=phases, dtype=str(args.dtype)[6:],
                dtype_why=args.dtype_why)


def memory_fit(family, args):
    """On a CPU: auto turns bf16 where fp32 passes RAM_CAP (a copy of args says so); too little free RAM is an error
    naming a smaller preset."""
    def need(itemsize):  # the largest process holds a model and its base; ~1 GB more for the runtimes
        return 1e9 + itemsize * max(m["total"] + family[0]["total"] for m in family)

    if args.device.type == "cpu" and args.dtype == torch.float32 and args.dtype_auto and need(4) > RAM_CAP:
        measured = args.dtype_why.partition("measured: ")[2] or args.dtype_why  # the card's line has room for this
        args = resolved(args, dtype=torch.bfloat16, dtype_why=f"bf16, as fp32 needs {need(4) / 1e9:.0f} GB; {measured}")
    free = int((proc_value("/proc/meminfo", "MemAvailable") or "0").split()[0]) * 1024  # 0: not Linux, not checked
    if args.device.type == "cpu" and 0 < free < need(args.dtype.itemsize):
        smaller = {"paper": "--preset=gpt2", "gpt2": "--preset=tiny"}.get(args.preset_name, "a smaller --n_embd")
        raise UserError(f"the {args.preset_name} preset needs ~{need(args.dtype.itemsize) / 1e9:.1f} GB of free memory,"
                        f" this machine has {free / 1e9:.1f} GB available: try {smaller}")
    return args


def summary(result):
    """The last line: every increase (%, MB) and ratio, compact (at most 1,000 characters: 3 digits)."""
    ms = result["models"][1:]
    return json.dumps(dict(
        preset=result["preset"], device=result["device"], dtype=result["dtype"], batch=result["batch"],
        memory={m["label"]: [v if v is None else round(v) for v in m["memory_mb"]] for m in ms},
        latency={m["label"]: {ph: [round(100 * v, 1 if abs(v) < .1 else None) for v in x]
                              for ph, x in m["latency"].items()} for m in ms},
        ratio={r["P"]: {k: v[1] for k, v in r.items() if k != "P"} for r in result["ratios"]}), separators=(",", ":"))


def parse_args(argv):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["lesson", "step"], default="lesson",
                   help="lesson: the cost claim at one shape (default); step: the reference decode step, P=8 vs P=1")
    p.add_argument("--preset", choices=["auto", *PRESETS], default="auto", help="auto: paper (lesson), gpt2 (step)")
    # model: None = the preset's
    for name in ("n_layer", "n_embd", "n_head", "n_kv_head", "vocab_size", "n_prefix"):
        p.add_argument(f"--{name}", type=int, default=None)
    p.add_argument("--stream_counts", type=int_list, default=[1, 2, 4, 8], help="the P values; P=1 is the base")
    p.add_argument("--streams", action=RenamedFlag, new="--stream_counts", why="the P values; --streams is a file")
    p.add_argument("--law_k", type=float, default=0.39, help="P streams are worth N_base(1 + k ln P) (the paper: 0.39)")
    p.add_argument("--k", action=RenamedFlag, new="--law_k", why="the scaling law's k")
    # the lesson: None = the preset's
    p.add_argument("--batch", type=int, default=1, help="batch size (the paper's claim is for batch 1)")
    p.add_argument("--prompt", type=int, default=None, help="prompt tokens: the short context, and the prefill")
    p.add_argument("--long_context", type=int, default=None, help="the long context's tokens")
    p.add_argument("--budget", type=float, default=None, help=f"seconds of pairs beyond {MIN_PAIRS} each (paper: 200)")
    p.add_argument("--paths", default="auto", choices=["auto", "fused", "eager"], help="auto = fused where it works")
    p.add_argument("--plot", default="", help="write the cost figure to this PNG (needs matplotlib)")
    p.add_argument("--json", default="", help="write everything (every timing, the machine, the flags) to this file")
    # system
    p.add_argument("--device", default="auto", help="auto = cuda when available, else cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                   help="auto = bf16 on CUDA; on CPU bf16 if a probe finds it no slower than fp32, or fp32 needs 12 GB")
    args = p.parse_args(argv)
    device = torch.device(resolve_device(args.device, allowed=("cpu", "cuda"), who="bench.py"))
    preset = args.preset if args.preset != "auto" else {"lesson": "paper", "step": "gpt2"}[args.mode]
    sizes = {k: v if getattr(args, k) is None else getattr(args, k) for k, v in PRESETS[preset].items()}  # None: its
    if max(args.stream_counts) < 2:
        raise UserError(f"--stream_counts must list a P > 1 (P=1 is the base); got {args.stream_counts}")
    for flag, low in [("batch", 1), ("prompt", 1), ("long_context", 1), ("budget", 0), ("law_k", 0)]:
        if not (math.isfinite(sizes.get(flag, getattr(args, flag))) and sizes.get(flag, getattr(args, flag)) >= low):
            raise UserError(f"--{flag} must be >= {low}, got {sizes.get(flag, getattr(args, flag))}")
    model_config("the model flags", **{k: v for k, v in sizes.items() if k in GPTConfig.__dataclass_fields__},
                 n_streams=max(args.stream_counts))  # names a bad one
    for flag in ("plot", "json"):
        if getattr(args, flag) and not os.path.isdir(os.path.dirname(os.path.abspath(getattr(args, flag)))):
            raise UserError(f"--{flag}={getattr(args, flag)}: its folder does not exist; create it or choose another")
    if args.plot and (args.mode == "step" or importlib.util.find_spec("matplotlib") is None):
        raise UserError(f"--plot={args.plot}: " + ("--mode=step has no figure" if args.mode == "step" else
                                                   "it needs matplotlib; pip install it, or drop --plot"))
    if args.dtype != "auto":  # checked before anything is measured; auto is resolved in main, threads set
        resolve_dtype(args.dtype, device)
    cpu = proc_value("/proc/cpuinfo", "model name") or "CPU"
    with contextlib.redirect_stdout(io.StringIO()):  # kernels/fused.py's own line about it: the card says it, shorter
        paths, fused_reason = decode_paths(args.paths, device)
    return resolved(args, **sizes, device=device, preset_name=preset, threads=-1, dtype_auto=args.dtype == "auto",
                    device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else cpu,
                    stream_counts=sorted(set(args.stream_counts) | {1}), paths=paths, fused_reason=fused_reason)


def main(argv=None):
    return with_threads_and_dtype(parse_args(argv), run)


def run(args):
    t0 = time.time()
    result = dict(mode=args.mode, preset=args.preset_name, device=args.device_name, torch=torch.__version__,
                  batch=args.batch, threads=torch.get_num_threads(), paths=args.paths, fused_reason=args.fused_reason,
                  flags={k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, list, type(None)))})
    result.update(dtype=str(args.dtype)[6:], dtype_why=args.dtype_why)  # the lesson may turn bf16 (memory_fit)
    if args.mode == "lesson":
        result.update(lesson(args, t0))
    else:
        import bench_step  # --mode=step's code, for that mode alone: the lesson does not carry it
        result.update(bench_step.step_check(args))
    result.update(elapsed_s=time.time() - t0)
    print(f"[bench] elapsed {result['elapsed_s']:.1f} s", file=sys.stderr, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f)
    print(summary(result) if args.mode == "lesson" else json.dumps(result["step"], separators=(",", ":")), flush=True)
    return result


if __name__ == "__main__":
    entry(main)
