"""
Measured inference cost of ParScale's P streams against width scaling, and the training cost of P.

    python bench.py --device=cpu                   # CPU toy run: tiny shapes, ~25 s on 2 shared cores
    python -u bench.py --mode=all --time_limit=180 > bench.log   # single GPU: GPT-2-small, full sweep + training cost
    python bench.py --mode=train                   # training cost only: tokens/s and MFU for P = 1, 2, 4, 8
    python bench.py --plot=cost.png                # also draw the paper's cost figure (needs matplotlib)
    (no multi-GPU run: every measurement is one model on one device)
The single-GPU run is estimated at ~3 minutes on an H200; --time_limit skips what is left after that
many seconds of decode sweep, loudly. The last line of the output is one JSON object with everything.
A mistake the user can fix (a bad flag value, a GPU or matplotlib that is not there) ends as one
`error: ...` line naming the flag, exit status 1, before anything is measured.

What is compared (the paper, arXiv 2505.10475, sections 3-4; README, bench.py section). For one base
shape (default GPT-2-small) and every P:
  - the ParScale model with P streams, and
  - a "width-matched" P=1 model of the same depth whose non-embedding parameter count is closest to
    N_base * (1 + k ln P), the parameters P streams are worth by the scaling law (k = 0.39 on code,
    the paper's section 3).
    Width moves in whole heads of the base's head_dim (match_width below).
For each model, batch size and context length it measures the peak GPU memory (weights + KV cache +
activations, from the CUDA allocator) and the end-to-end latency of a prefill followed by L_out decode
steps, for multi-head attention (MHA) and for grouped-query attention (GQA, 2 key/value heads), on the
fused CUDA path (kernels/fused.py, with CUDA graphs) when it is available and on eager PyTorch.

"Context" is the prompt length: the prompt is `context` tokens long, all of them are prefilled into the
KV cache, then L_out tokens are decoded one at a time (greedy). The paper's L_in = 64 is context 64
(`--contexts=64,...`); the defaults 128, 512, 1024 bracket the contexts where ParScale's memory advantage
ends at GPT-2-small's shape (README, bench.py section: P = 8, batch 1, near 260 for MHA, 660 for GQA), as
every stream keeps its own KV cache. Every model is built with block_size = context + L_out, so its KV
cache is sized to the run.

Headline: cost increase = cost(model) - cost(P=1 base) at the same path, batch and context, and the
ratio (width scaling's increase) / (ParScale's increase): > 1 means ParScale is cheaper. The paper's
22x memory / 6x latency (section 4, its cost analysis: 1.6B, GQA, P=8, batch 1) is analytic for an A100;
here it is measured.

Width matching keeps head_dim: with GQA the wider model keeps its 2 key/value heads, so its KV cache
does not grow (the paper's family kept 16 heads and grew head_dim). Steps are whole heads, so the
achieved count can miss the target by several percent; both are printed.
On CPU the allocator keeps no peak: memory there is weights + KV cache (activations not counted).
MFU (--mode=train) is model.GPT.estimate_mfu against model.peak_flops, the datasheet bf16 peak of the
GPU by name; n/a on CPU or an unlisted GPU unless --peak_flops gives one.
"""

import argparse
import dataclasses
import gc
import json
import math
import os
import statistics
import sys
import time
from contextlib import nullcontext

import torch

from kernels.fused import fused_decoder_for, fused_status  # the hand-written CUDA path; which one runs is printed
from model import GPT, GPTConfig, KVCache, UserError, peak_flops

try:  # only for --plot; the object-oriented API needs no backend choice (no import-time side effects)
    from matplotlib.figure import Figure
except ImportError:
    Figure = None

PRESETS = {
    # GPT-2-small (124M; README, bench.py section): the default on CUDA
    "gpt2": dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_prefix=48,
                 batches=[1, 2, 4, 8], contexts=[128, 512, 1024], l_out=64, repeats=3,
                 train_batch=4, train_seq=1024, train_steps=10),
    # a toy shape for a quick look on CPU; 12 heads as GPT-2, so width still moves in small steps
    "tiny": dict(n_layer=2, n_embd=96, n_head=12, vocab_size=512, n_prefix=4,
                 batches=[1, 2, 4, 8], contexts=[32, 128], l_out=16, repeats=3,
                 train_batch=4, train_seq=64, train_steps=3),
}
H200_HBM_BYTES = 4.8e12  # H200 HBM3e bandwidth (spec); ~4.3e12 is what a copy achieves


# -----------------------------------------------------------------------------
# width matching: the P=1 model that has the parameters P streams are worth

def param_counts(cfg):
    """Exact GPT(cfg).param_report(), from a model built on the meta device (no memory, no init)."""
    with torch.device("meta"):
        return GPT(cfg).param_report()


def equivalent_params(n_base, n_streams, k):
    """The scaling law's worth of P streams in parameters: N_base * (1 + k ln P), from the paper's
    L = E + (A / (N (k ln P + 1)))^alpha (arXiv 2505.10475, section 3)."""
    return n_base * (1 + k * math.log(n_streams))


def match_width(base_cfg, target_non_embedding):
    """
    The P=1 model of base_cfg's depth and head_dim whose non-embedding parameter count is closest
    to target_non_embedding. Width moves in whole heads: with multi-head attention (n_kv_head =
    n_head) n_kv_head follows n_head; with GQA n_kv_head stays and n_head moves in multiples of it,
    so every key/value head keeps serving a whole group of query heads.
    """
    head_dim, mha = base_cfg.head_dim, base_cfg.n_kv_head == base_cfg.n_head
    step = 1 if mha else base_cfg.n_kv_head

    def cfg_for(n_head):
        return dataclasses.replace(base_cfg, n_streams=1, n_head=n_head, n_embd=n_head * head_dim,
                                   n_kv_head=n_head if mha else base_cfg.n_kv_head)

    counts = {}

    def count(n_head):
        if n_head not in counts:
            counts[n_head] = param_counts(cfg_for(n_head))["non_embedding"]
        return counts[n_head]

    # the count grows with n_head: walk from the base to the last width not above the target
    n_head = max(step, base_cfg.n_head // step * step)
    while n_head > step and count(n_head) > target_non_embedding:
        n_head -= step
    while count(n_head + step) <= target_non_embedding:
        n_head += step
    best = min((n_head, n_head + step), key=lambda h: abs(count(h) - target_non_embedding))
    return cfg_for(best)


def model_family(base_cfg, streams, k):
    """The models compared at one attention kind, base first so that partial sweeps still pair up:
    the P=1 base, then for each P > 1 the ParScale model and its width-matched P=1 model."""
    base = dataclasses.replace(base_cfg, n_streams=1)
    n_base = param_counts(base)["backbone"]
    family = [dict(side="base", P=1, label="base", cfg=base, target=n_base)]
    for P in sorted(set(streams) - {1}):
        target = equivalent_params(n_base, P, k)
        family.append(dict(side="parscale", P=P, label=f"P={P}", cfg=dataclasses.replace(base_cfg, n_streams=P), target=target))
        family.append(dict(side="width", P=P, label=f"width~P{P}", cfg=match_width(base_cfg, target), target=target))
    for m in family:
        r = param_counts(m["cfg"])
        m["non_embedding"], m["total"] = r["non_embedding"], r["total"]
    return family


def attn_label(cfg):
    return "MHA" if cfg.n_kv_head == cfg.n_head else f"GQA{cfg.n_kv_head}"


# -----------------------------------------------------------------------------
# decode latency and memory

class EagerDecoder:
    """model.GPT with a KVCache behind FusedDecoder's interface, so both paths share one timing loop."""

    def __init__(self, model, batch_size):
        self.model, self.cache = model, KVCache(model, batch_size)

    def prefill(self, idx):
        # rewinding is enough: attention reads only the first pos cached tokens (the prefix is not
        # in the cache), so stale tokens past pos are never seen
        self.cache.pos = 0
        return self.model(idx, cache=self.cache)[0][:, -1]  # (B, vocab)

    def decode_step(self, tok):
        return self.model(tok, cache=self.cache)[0][:, -1]  # (B, 1) -> (B, vocab)


def make_decoder(path, model, batch_size, dtype):
    """The decoder a path times. A model the fused kernels refuse raises UserError with the reason."""
    if path == "fused":
        dec, why = fused_decoder_for(model, batch_size, dtype, model.config.block_size)
        if dec is None:
            raise UserError(why)
        return dec
    return EagerDecoder(model, batch_size)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def generate_once(dec, prompt, n_steps, device):
    """Prefill the prompt, then n_steps greedy decode steps. Returns (prefill seconds, decode seconds)."""
    synchronize(device)
    t0 = time.perf_counter()
    tok = dec.prefill(prompt).argmax(dim=-1, keepdim=True)  # (B, 1); stays on the device, no host sync
    synchronize(device)
    t1 = time.perf_counter()
    for _ in range(n_steps):
        tok = dec.decode_step(tok).argmax(dim=-1, keepdim=True)
    synchronize(device)
    return t1 - t0, time.perf_counter() - t1


def decode_floor_seconds(cfg, n_non_embedding, batch_size, context, args):
    """Bandwidth floor of one decode step: every weight read once (for all P*B rows) plus the KV
    cache at the run's mean length (README, fused GPU decode path section: the "floor" column)."""
    weights = n_non_embedding + cfg.vocab_size * cfg.n_embd  # the body and the LM head
    kv_len = cfg.n_prefix_slots + context + args.l_out / 2
    kv = 2 * cfg.n_layer * cfg.n_streams * batch_size * cfg.n_kv_head * kv_len * cfg.head_dim
    return (weights + kv) * args.dtype.itemsize / args.peak_bw


@torch.no_grad()
def measure(model, path, batch_size, context, args, resident):
    """
    One row of the table: memory and latency of a prefill of `context` tokens plus args.l_out decode
    steps, median of args.repeats timed runs after a short warm-up. resident: bytes the model took
    on the GPU when it was built (its weights). Peak memory = resident + the most allocated on top of
    what was allocated before the decoder existed, less what outlives the decoder: process-wide
    one-offs such as a cuBLAS workspace for a new stream are nobody's cost.
    """
    device, cuda = args.device, args.device.type == "cuda"
    gen = torch.Generator().manual_seed(1000 * batch_size + context)
    prompt = torch.randint(model.config.vocab_size, (batch_size, context), generator=gen).to(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    dec = make_decoder(path, model, batch_size, args.dtype)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    if cuda:
        state = torch.cuda.memory_allocated(device) - before  # KV cache and whatever else the decoder holds
    else:
        state = dec.cache.k.nbytes + dec.cache.v.nbytes
    generate_once(dec, prompt, min(args.l_out, 4), device)  # warm-up: kernel choice, compilation, graph capture
    runs = [generate_once(dec, prompt, args.l_out, device) for _ in range(args.repeats)]
    del dec
    peak = leftover = None
    if cuda:
        leftover = torch.cuda.memory_allocated(device) - before
        if leftover:  # a reference cycle could keep the decoder alive until collected
            gc.collect()
            leftover = torch.cuda.memory_allocated(device) - before
        peak = resident + torch.cuda.max_memory_allocated(device) - before - leftover
    totals = [(a + b) * 1e3 for a, b in runs]
    return dict(
        mem_mb=(peak if cuda else weights + state) / 2**20, peak_mb=None if peak is None else peak / 2**20,
        weights_mb=weights / 2**20, state_mb=state / 2**20, leftover_mb=None if leftover is None else leftover / 2**20,
        ms=statistics.median(totals), ms_min=min(totals), ms_max=max(totals),
        prefill_ms=statistics.median(a for a, _ in runs) * 1e3,
        ms_per_token=statistics.median(b for _, b in runs) * 1e3 / args.l_out)


def build(cfg, device, dtype):
    torch.manual_seed(0)  # random weights are fine for cost; the same ones every run
    with torch.device(device):
        model = GPT(cfg)  # built in place on the device: no host init, no copy
    return model.to(dtype).eval()


def free_memory(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def cuda_still_works(device):
    try:
        torch.cuda.synchronize(device)
        return True
    except RuntimeError:
        return False


def bench_decode(args, base_cfgs):
    """The sweep: path -> attention kind -> context -> model -> batch. Returns (rows, families, notes)."""
    rows, notes, families, skipped = [], [], {}, 0
    for base_cfg in base_cfgs:
        kind = attn_label(base_cfg)
        families[kind] = model_family(base_cfg, args.streams, args.k)
        print_family(kind, families[kind], args.k)
    cuda = args.device.type == "cuda"
    print(f"\ndecode: prefill `context` prompt tokens, then {args.l_out} greedy decode steps; {args.repeats} timed runs "
          f"after a warm-up. mem = {'peak allocated (weights + decoder state + activations)' if cuda else 'weights + KV cache (CPU: no allocator peak)'}; "
          f"weights = parameter bytes; state = what the decoder allocates (KV cache, ...); "
          f"floor% = bandwidth floor / measured ms per token"
          + (f" (stated peak {args.peak_bw / 1e12:.2f} TB/s)" if cuda else " (n/a on CPU)"))
    print(f"{'attn':5} {'path':5} {'model':9} {'width':>5} {'B':>2} {'ctx':>5} | {'mem MB':>8} {'weights':>8} {'state':>8} | "
          f"{'latency ms: median [min, max]':>32} {'prefill':>8} {'ms/tok':>7} {'floor%':>6} | elapsed", flush=True)
    t_start = time.time()

    def out_of_time():
        return args.time_limit > 0 and time.time() - t_start > args.time_limit

    for path in args.paths:
        for base_cfg in base_cfgs:
            kind = attn_label(base_cfg)
            for context in args.contexts:
                for m in families[kind]:
                    if out_of_time():
                        skipped += len(args.batches)
                        continue
                    free_memory(args.device)
                    baseline = torch.cuda.memory_allocated(args.device) if cuda else 0
                    cfg = dataclasses.replace(m["cfg"], block_size=context + args.l_out)  # the cache fits this run exactly
                    model = build(cfg, args.device, args.dtype)
                    resident = torch.cuda.memory_allocated(args.device) - baseline if cuda else 0
                    for batch_size in args.batches:
                        if out_of_time():
                            skipped += 1
                            continue
                        try:
                            r = measure(model, path, batch_size, context, args, resident)
                        except UserError as e:  # the fused path refused this model: eager measures it
                            notes.append(f"fused path not used for {kind} {m['label']}: {e}: measured on the eager path only")
                            print(f"!!! {notes[-1]}", flush=True)
                            break
                        except Exception as e:  # a failing path or shape is reported, and the sweep goes on
                            notes.append(f"FAILED {kind} {path} {m['label']} B={batch_size} ctx={context}: {type(e).__name__}: {e}")
                            print(f"!!! {notes[-1]} (skipping this model's larger batches)", flush=True)
                            if cuda and not cuda_still_works(args.device):
                                notes.append("the CUDA context is broken after that failure: sweep stopped")
                                print(f"!!! {notes[-1]}", flush=True)
                                return rows, families, notes
                            break
                        floor = decode_floor_seconds(cfg, m["non_embedding"], batch_size, context, args) if cuda else None
                        r.update(attn=kind, path=path, side=m["side"], P=m["P"], label=m["label"], n_embd=cfg.n_embd,
                                 batch=batch_size, context=context, roofline=None if floor is None else floor / r["ms_per_token"] * 1e3)
                        rows.append(r)
                        print(format_row(r) + f" | {time.time() - t_start:6.1f}s", flush=True)
                    del model
    if skipped:
        notes.append(f"TIME LIMIT ({args.time_limit:.0f} s) reached: {skipped} measurements skipped")
        print(f"!!! {notes[-1]}", flush=True)
    return rows, families, notes


def print_family(kind, family, k):
    print(f"\n{kind} models: N = non-embedding parameters; target = N_base * (1 + {k} ln P)")
    print(f"{'model':9} {'n_embd':>6} {'heads q/kv':>10} {'N':>13} {'target':>13} {'N/target':>8} {'total':>13}")
    for m in family:
        c = m["cfg"]
        print(f"{m['label']:9} {c.n_embd:6d} {f'{c.n_head}/{c.n_kv_head}':>10} {m['non_embedding']:13,d} "
              f"{m['target']:13,.0f} {m['non_embedding'] / m['target']:8.3f} {m['total']:13,d}")


def format_row(r):
    floor = "n/a" if r["roofline"] is None else f"{100 * r['roofline']:.0f}"
    return (f"{r['attn']:5} {r['path']:5} {r['label']:9} {r['n_embd']:5d} {r['batch']:2d} {r['context']:5d} | "
            f"{r['mem_mb']:8.1f} {r['weights_mb']:8.1f} {r['state_mb']:8.1f} | "
            f"{r['ms']:10.2f} [{r['ms_min']:9.2f}, {r['ms_max']:9.2f}] {r['prefill_ms']:8.2f} {r['ms_per_token']:7.3f} {floor:>6}")


# -----------------------------------------------------------------------------
# headline ratios and crossovers

def increase_ratio(width_inc, parscale_inc):
    """Width scaling's cost increase over ParScale's; None when ParScale adds nothing measurable."""
    return width_inc / parscale_inc if parscale_inc > 0 else None


def crossover(xs, margins):
    """
    Where ParScale stops winning along xs (contexts or batch sizes), margins[i] = width's cost -
    ParScale's at xs[i] (> 0: ParScale cheaper). Returns (status, x): 'wins throughout',
    'loses throughout', or 'stops winning' at x interpolated linearly between the two points
    around the first sign change.
    """
    if margins[0] <= 0:
        return "loses throughout", None
    for i in range(1, len(xs)):
        if margins[i] <= 0:
            x0, x1, m0, m1 = xs[i - 1], xs[i], margins[i - 1], margins[i]
            return "stops winning", x0 + (x1 - x0) * m0 / (m0 - m1)
    return "wins throughout", None


def summarise(rows, args):
    """Headline ratios for every P > 1, batch and context; crossovers along context and along batch."""
    at = {(r["attn"], r["path"], r["side"], r["P"], r["batch"], r["context"]): r for r in rows}
    metrics = {"memory": "mem_mb", "latency": "ms"}
    headline, crossovers = [], []
    kinds = list(dict.fromkeys(r["attn"] for r in rows))  # in sweep order
    for path in args.paths:
        for kind in kinds:
            for P in sorted(set(args.streams) - {1}):
                margins = {}  # (metric, batch, context) -> width cost - ParScale cost
                for B in args.batches:
                    for ctx in args.contexts:
                        base, par, wid = (at.get((kind, path, side, p, B, ctx)) for side, p in
                                          (("base", 1), ("parscale", P), ("width", P)))
                        if base is None or par is None or wid is None:
                            continue
                        h = dict(attn=kind, path=path, P=P, batch=B, context=ctx)
                        for name, key in metrics.items():
                            pi, wi = par[key] - base[key], wid[key] - base[key]
                            h[f"{name}_increase_parscale"], h[f"{name}_increase_width"] = pi, wi
                            h[f"{name}_ratio"] = increase_ratio(wi, pi)
                            margins[name, B, ctx] = wi - pi
                        headline.append(h)
                for name in metrics:
                    for B in args.batches:
                        xs = [c for c in args.contexts if (name, B, c) in margins]
                        if xs:
                            status, x = crossover(xs, [margins[name, B, c] for c in xs])
                            crossovers.append(dict(attn=kind, path=path, metric=name, P=P, along="context", batch=B, status=status, at=x))
                    for ctx in args.contexts:
                        xs = [b for b in args.batches if (name, b, ctx) in margins]
                        if xs:
                            status, x = crossover(xs, [margins[name, b, ctx] for b in xs])
                            crossovers.append(dict(attn=kind, path=path, metric=name, P=P, along="batch", context=ctx, status=status, at=x))
    return headline, crossovers


def format_ratio(ratio, width_inc):
    if ratio is None:
        return "inf" if width_inc > 0 else "n/a"  # ParScale adds nothing: infinitely cheaper, or both flat
    return f"{ratio:.1f}x"


def print_summary(headline, crossovers, args):
    print("\nheadline: width scaling's cost increase / ParScale's (> 1: ParScale cheaper); "
          "increase = cost(model) - cost(P=1 base); cells are memory ratio, latency ratio")
    groups = {}
    for h in headline:
        groups.setdefault((h["attn"], h["path"]), []).append(h)
    for (kind, path), hs in groups.items():
        print(f"\n{kind}, {path}")
        print(" P  B | " + " | ".join(f"{f'ctx {c}':^17}" for c in args.contexts))
        for P in sorted({h["P"] for h in hs}):
            for B in args.batches:
                cells = {h["context"]: h for h in hs if h["P"] == P and h["batch"] == B}
                if not cells:
                    continue
                line = " | ".join(
                    f"{format_ratio(cells[c]['memory_ratio'], cells[c]['memory_increase_width']):>8} "
                    f"{format_ratio(cells[c]['latency_ratio'], cells[c]['latency_increase_width']):>8}"
                    if c in cells else f"{'-':^17}" for c in args.contexts)
                print(f"{P:2d} {B:2d} | {line}")
    print("\ncrossovers: where ParScale stops being cheaper than width scaling (linear interpolation between measured points)")
    lines = {}
    for c in crossovers:
        where = f"B={c['batch']}" if c["along"] == "context" else f"ctx={c['context']}"
        what = c["status"] if c["at"] is None else f"stops near {'ctx' if c['along'] == 'context' else 'B'} {c['at']:.3g}"
        lines.setdefault((c["attn"], c["path"], c["metric"], c["P"], c["along"]), []).append(f"{where}: {what}")
    for (kind, path, metric, P, along), parts in lines.items():
        print(f"{kind:5} {path:5} {metric:7} P={P} along {along:7}: " + " | ".join(parts))


def paper_comparison(headline, args):
    """The cell closest to the paper's headline: GQA, largest P, batch 1, shortest context, fastest path."""
    gqa = [h for h in headline if h["attn"].startswith("GQA") and h["path"] == args.paths[0]]
    if not gqa:
        return None
    P = max(h["P"] for h in gqa)
    h = min((h for h in gqa if h["P"] == P), key=lambda h: (h["batch"], h["context"]))
    print("\npaper (A100, analytic, 1.6B backbone, GQA, P=8, batch 1, L_in/L_out 64..512): 22x memory, 6x latency")
    print(f"here  ({args.device_name}, measured, {h['attn']}, P={P}, batch {h['batch']}, context {h['context']}, "
          f"{args.l_out} out, {h['path']}): {format_ratio(h['memory_ratio'], h['memory_increase_width'])} memory, "
          f"{format_ratio(h['latency_ratio'], h['latency_increase_width'])} latency")
    return h


def plot(rows, families, args):
    """The paper's cost figure, measured: cost increase over P=1 against P, ParScale vs width, per batch size."""
    path, ctx = args.paths[0], args.contexts[0]
    fig = Figure(figsize=(3.2 * len(args.batches), 6), layout="constrained")
    axes = fig.subplots(2, len(args.batches), squeeze=False)
    at = {(r["attn"], r["path"], r["side"], r["P"], r["batch"], r["context"]): r for r in rows}
    for col, B in enumerate(args.batches):
        for row, (name, key, unit) in enumerate((("memory", "mem_mb", "MB"), ("latency", "ms", "ms"))):
            ax = axes[row][col]
            for i, kind in enumerate(families):
                base = at.get((kind, path, "base", 1, B, ctx))
                for side, style in (("parscale", "-o"), ("width", "--s")):
                    pts = [(P, at[kind, path, side, P, B, ctx][key] - base[key]) for P in sorted(set(args.streams) - {1})
                           if base is not None and (kind, path, side, P, B, ctx) in at]
                    if pts:
                        ax.plot(*zip(*pts), style, color=f"C{i}", label=f"{kind} {'ParScale' if side == 'parscale' else 'width'}")
            ax.set_xscale("log", base=2)
            ax.set_title(f"{name}, batch {B}", fontsize=9)
            ax.set_xlabel("P (width side: N_base(1 + k ln P))", fontsize=8)
            ax.set_ylabel(f"increase over P=1 ({unit})", fontsize=8)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"measured cost increase, {path} path, context {ctx}, {args.l_out} decode steps, {args.device_name}")
    fig.savefig(args.plot, dpi=120)
    print(f"figure written to {args.plot}")


# -----------------------------------------------------------------------------
# training cost

def bench_train(args, base_cfgs):
    """Tokens/s and MFU of one training step (forward + backward + AdamW) for every P at a fixed shape."""
    cuda = args.device.type == "cuda"
    peak = args.peak_flops
    B, T = args.train_batch, args.train_seq
    print(f"\ntrain: batch {B} x {T} tokens, forward + backward + AdamW, {'bf16 autocast' if cuda else 'float32'}, "
          f"eager (no torch.compile); median of {args.train_steps} steps after 2 warm-up steps; MFU "
          + (f"against {peak / 1e12:.0f} TFLOP/s ({args.peak_flops_source})" if peak else
             f"n/a (no datasheet peak for {args.device_name}; --peak_flops gives one)"))
    print(f"{'attn':5} {'P':>2} | {'tok/s':>10} {'vs P=1':>6} | {'step ms':>8} | {'TFLOP/s':>8} {'MFU':>6} | {'peak GB':>7}")
    out = []
    for base_cfg in base_cfgs:
        for P in args.streams:
            free_memory(args.device)
            torch.manual_seed(0)
            cfg = dataclasses.replace(base_cfg, n_streams=P, block_size=T)
            with torch.device(args.device):
                model = GPT(cfg)  # float32 master weights; autocast runs the matmuls in bf16
            optimizer = model.configure_optimizers(0.1, 6e-4, (0.9, 0.95), args.device.type)
            x = torch.randint(cfg.vocab_size, (B, T), device=args.device)
            y = torch.randint(cfg.vocab_size, (B, T), device=args.device)
            amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()
            if cuda:
                torch.cuda.reset_peak_memory_stats(args.device)
            times = []
            try:
                for _ in range(2 + args.train_steps):
                    synchronize(args.device)
                    t0 = time.perf_counter()
                    with amp:
                        _, loss = model(x, y)
                    loss.backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    synchronize(args.device)
                    times.append(time.perf_counter() - t0)
            except Exception as e:  # e.g. out of memory at a large P: reported, and the other P still run
                print(f"!!! train FAILED {attn_label(base_cfg)} P={P}: {type(e).__name__}: {e}", flush=True)
                out.append(dict(attn=attn_label(base_cfg), P=P, error=f"{type(e).__name__}: {e}"))
                model = optimizer = loss = None  # let the next P start from free memory
                continue
            step = statistics.median(times[2:])
            tok_s = B * T / step
            flops = model.flops_per_token(T) * tok_s
            r = dict(attn=attn_label(base_cfg), P=P, tokens_per_s=tok_s, step_ms=step * 1e3, flops_per_s=flops,
                     mfu=model.estimate_mfu(tok_s, T, peak),
                     peak_gb=torch.cuda.max_memory_allocated(args.device) / 2**30 if cuda else None)
            first = next((o for o in out if o["attn"] == r["attn"] and "error" not in o), r)  # normally P=1
            mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
            peak_gb = "n/a" if r["peak_gb"] is None else f"{r['peak_gb']:.2f}"
            print(f"{r['attn']:5} {P:2d} | {tok_s:10,.0f} {tok_s / first['tokens_per_s']:6.2f} | {r['step_ms']:8.1f} | "
                  f"{flops / 1e12:8.2f} {mfu:>6} | {peak_gb:>7}", flush=True)
            out.append(r)
            del model, optimizer
    return out


# -----------------------------------------------------------------------------

def rounded(obj):
    """Floats to 5 significant digits, for a JSON line that stays readable."""
    if isinstance(obj, float):
        return float(f"{obj:.5g}")
    if isinstance(obj, dict):
        return {k: rounded(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [rounded(v) for v in obj]
    return obj


def int_list(s):
    try:
        return [int(v) for v in s.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 1,2,4, got {s!r}") from None


def bench_device(name):
    """--device as a torch.device, checked against this machine: the sweep runs on cpu or cuda."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device={name} is not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise UserError(f"--device={name}: bench.py measures on cpu or cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device={name}, but torch.cuda.is_available() is False (no GPU, or a CPU-only torch build); "
                        "use --device=cpu")
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise UserError(f"--device={name}, but this machine has {torch.cuda.device_count()} GPU(s), cuda:0 and up")
    return dev


def check_args(args):
    """Values argparse cannot check, after the preset filled the gaps: one `error:` line each, naming the flag."""
    for flag, low in [("n_layer", 1), ("n_embd", 1), ("n_head", 1), ("vocab_size", 1), ("n_prefix", 0), ("l_out", 1),
                      ("repeats", 1), ("train_batch", 1), ("train_seq", 1), ("train_steps", 1)]:
        if getattr(args, flag) < low:
            raise UserError(f"--{flag} must be >= {low}, got {getattr(args, flag)}")
    if args.n_embd % args.n_head:
        raise UserError(f"--n_embd={args.n_embd} must be a multiple of --n_head={args.n_head} (head_dim = n_embd / n_head)")
    for flag, low in [("batches", 1), ("contexts", 1), ("streams", 1), ("kv_heads", 0)]:
        values = getattr(args, flag)
        if not values or min(values) < low:
            raise UserError(f"--{flag} must list integers >= {low}, comma-separated; got {values}")
    for kv in args.kv_heads:
        if kv and args.n_head % kv:
            raise UserError(f"--kv_heads={kv} must divide --n_head={args.n_head} (0 = n_head, multi-head attention)")
    if max(args.streams) > 1 and args.n_prefix < 1:
        raise UserError(f"--n_prefix must be >= 1 when --streams has a P > 1 (without a prefix every stream is the same), got {args.n_prefix}")
    if not (math.isfinite(args.k) and args.k >= 0):
        raise UserError(f"--k must be a finite number >= 0 (the paper fits 0.39 on code, 0.33 on the Pile), got {args.k}")
    if not (args.time_limit > 0 or args.time_limit == -1):
        raise UserError(f"--time_limit must be a number of seconds > 0, or -1 for never; got {args.time_limit}")
    if args.threads == 0 or args.threads < -1:
        raise UserError(f"--threads must be >= 1, or -1 for the default; got {args.threads}")
    if not (math.isfinite(args.peak_flops) and args.peak_flops > 0 or args.peak_flops == -1):
        raise UserError(f"--peak_flops must be a positive number of FLOP/s, or -1 to look up the GPU; got {args.peak_flops}")
    if not (math.isfinite(args.peak_bw) and args.peak_bw > 0):
        raise UserError(f"--peak_bw must be a positive number of bytes/s, got {args.peak_bw}")
    if args.plot:
        if Figure is None:
            raise UserError(f"--plot={args.plot} needs matplotlib, which is not importable here; pip install matplotlib, or drop --plot")
        if args.mode == "train":
            raise UserError("--plot draws the decode sweep's cost figure; use it with --mode=decode or --mode=all")
        if not os.path.isdir(os.path.dirname(os.path.abspath(args.plot))):
            raise UserError(f"--plot={args.plot}: its folder does not exist; create it or choose another path")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["decode", "train", "all"], default="decode", help="decode sweep, training step, or both")
    p.add_argument("--preset", choices=["auto", "gpt2", "tiny"], default="auto",
                   help="shapes and sweep sizes; auto = gpt2 on CUDA, tiny on CPU; flags below override it")
    # model
    p.add_argument("--n_layer", type=int, default=None, help="None = preset")
    p.add_argument("--n_embd", type=int, default=None, help="None = preset")
    p.add_argument("--n_head", type=int, default=None, help="None = preset; head_dim = n_embd / n_head stays fixed when width scales")
    p.add_argument("--vocab_size", type=int, default=None, help="None = preset (gpt2: 50257)")
    p.add_argument("--n_prefix", type=int, default=None, help="prefix slots per layer per stream; None = preset (gpt2: 48, the paper's)")
    p.add_argument("--kv_heads", type=int_list, default=[0, 2], help="attention kinds, comma-separated n_kv_head; 0 = n_head (multi-head attention)")
    p.add_argument("--streams", type=int_list, default=[1, 2, 4, 8], help="P values, comma-separated; P=1 is the base")
    p.add_argument("--k", type=float, default=0.39, help="scaling-law k: P streams are worth N_base(1 + k ln P) (0.39 code, 0.33 Pile)")
    # decode sweep
    p.add_argument("--batches", type=int_list, default=None, help="batch sizes, comma-separated; None = preset")
    p.add_argument("--contexts", type=int_list, default=None, help="prompt lengths prefilled before decoding; None = preset")
    p.add_argument("--l_out", type=int, default=None, help="decode steps after the prefill; None = preset (gpt2: 64, the paper's)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per measurement (median, min, max reported); None = preset")
    p.add_argument("--paths", default="auto", choices=["auto", "fused", "eager"],
                   help="auto = fused (when kernels/fused.py works here) then eager; fused errors out if unavailable")
    p.add_argument("--time_limit", type=float, default=-1, help="seconds after which remaining decode measurements are skipped (loudly); -1 = never")
    p.add_argument("--plot", default="", help="write the cost figure to this PNG (needs matplotlib); empty = no figure")
    # training cost
    p.add_argument("--train_batch", type=int, default=None, help="sequences per step; None = preset")
    p.add_argument("--train_seq", type=int, default=None, help="tokens per sequence; None = preset")
    p.add_argument("--train_steps", type=int, default=None, help="timed steps per P; None = preset")
    # system
    p.add_argument("--device", default="auto", help="auto = cuda when available, else cpu")
    p.add_argument("--threads", type=int, default=-1, help="torch CPU threads; -1 = 1 on CPU (toy shapes gain nothing from more, "
                   "and on shared cores OpenMP threads stall each other), torch's default on CUDA")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"], help="decode dtype; auto = bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--peak_flops", type=float, default=-1,
                   help="peak FLOP/s for MFU; -1 = the GPU's datasheet bf16 peak (model.peak_flops: H100/H200 989e12), none on CPU")
    p.add_argument("--peak_bw", type=float, default=H200_HBM_BYTES, help="stated memory bandwidth for the decode floor, bytes/s (H200: 4.8e12)")
    args = p.parse_args(argv)

    args.device = bench_device(args.device)
    cuda = args.device.type == "cuda"
    preset = PRESETS[args.preset if args.preset != "auto" else "gpt2" if cuda else "tiny"]
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    check_args(args)
    if args.dtype == "float16" and not cuda:
        raise UserError("--dtype=float16 is for GPUs: on CPU torch runs it slowly and with float16's narrow range; "
                        "use --dtype=float32 (the default there) or bfloat16")
    if args.dtype == "bfloat16" and cuda and not torch.cuda.is_bf16_supported():
        raise UserError(f"--dtype=bfloat16, but {torch.cuda.get_device_name(args.device)} has no bfloat16; use float16 or float32")
    args.dtype = getattr(torch, args.dtype) if args.dtype != "auto" else torch.bfloat16 if cuda else torch.float32
    args.device_name = torch.cuda.get_device_name(args.device) if cuda else "CPU"
    # MFU's denominator: the flag, else model.py's datasheet table (None on CPU or an unlisted GPU)
    args.peak_flops_source = "--peak_flops" if args.peak_flops > 0 else f"datasheet bf16 peak of {args.device_name}"
    args.peak_flops = args.peak_flops if args.peak_flops > 0 else peak_flops(args.device_name)
    if 1 not in args.streams:
        args.streams = [1] + args.streams  # the P=1 base is what every increase is measured from

    # which decode paths run, and why: said once, never silently changed
    fused_ok, why = fused_status(args.device)
    if args.paths == "fused" and not fused_ok:
        raise UserError(f"--paths=fused, but the fused path is unavailable: {why}; use --paths=auto or --paths=eager")
    args.paths = ["fused", "eager"] if args.paths == "auto" and fused_ok else ["eager"] if args.paths != "fused" else ["fused"]
    args.fused_reason = why
    return args


def base_configs(args):
    """One base config per attention kind in --kv_heads, block_size set per run."""
    return [GPTConfig(n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head, vocab_size=args.vocab_size,
                      n_kv_head=kv or args.n_head, n_prefix=args.n_prefix, dropout=0.0) for kv in args.kv_heads]


def main(argv=None):
    args = parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads if args.threads > 0 else 1 if args.device.type == "cpu" else threads)
    try:
        return run(args)
    finally:
        torch.set_num_threads(threads)  # main() is also called from tests: leave the process as found


def run(args):
    t0 = time.time()
    cfgs = base_configs(args)
    print(f"device {args.device} ({args.device_name}), torch {torch.__version__}, {torch.get_num_threads()} CPU thread(s), "
          f"decode dtype {str(args.dtype).removeprefix('torch.')}")
    print(f"shape: {args.n_layer} layers, width {args.n_embd}, {args.n_head} heads (head_dim {args.n_embd // args.n_head}), "
          f"vocab {args.vocab_size}, {args.n_prefix} prefix slots; attention kinds: {', '.join(attn_label(c) for c in cfgs)}")
    print(f"decode paths: {', '.join(args.paths)} (fused path: {args.fused_reason})")
    result = dict(mode=args.mode, device=args.device_name, torch=torch.__version__, paths=args.paths,
                  fused_reason=args.fused_reason, shape=dict(n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head,
                  vocab_size=args.vocab_size, n_prefix=args.n_prefix), kv_heads=args.kv_heads, streams=args.streams, k=args.k)
    if args.mode in ("decode", "all"):
        rows, families, notes = bench_decode(args, cfgs)
        headline, crossovers = summarise(rows, args)
        print_summary(headline, crossovers, args)
        paper = paper_comparison(headline, args)
        if args.plot:
            plot(rows, families, args)
        result.update(batches=args.batches, contexts=args.contexts, l_out=args.l_out, repeats=args.repeats,
                      models={kind: [dict(label=m["label"], side=m["side"], P=m["P"], n_embd=m["cfg"].n_embd, n_head=m["cfg"].n_head,
                                          n_kv_head=m["cfg"].n_kv_head, non_embedding=m["non_embedding"], target=round(m["target"]),
                                          total=m["total"]) for m in fam] for kind, fam in families.items()},
                      results=rows, headline=headline, crossovers=crossovers, paper_cell=paper, notes=notes)
        for note in notes:
            print(f"!!! {note}")
    if args.mode in ("train", "all"):
        result.update(train=bench_train(args, cfgs), peak_flops=args.peak_flops)
    result["elapsed_s"] = time.time() - t0
    print(f"\nelapsed {result['elapsed_s']:.1f} s")
    print(json.dumps(rounded(result)), flush=True)
    return result


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except UserError as e:  # a mistake the user can fix: one line, no traceback; anything else is a bug
        sys.exit("error: " + " ".join(str(e).split("\n")))
