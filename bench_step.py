"""
`python bench.py --mode=step`: the reference decode step (model.py + KVCache) of P = 8 against P = 1 at
GPT-2-small, batch 1, with its targets; bench.py imports this module for that mode alone.

    python bench.py --mode=step                  # about a minute on a 2-core CPU
    python bench.py --mode=step --device=cuda    # on one GPU

At each context of STEP_TARGETS both models' caches hold exactly that context plus the new token, filled
directly; their steps are timed in pairs, one each in turn (measure.paired), until half the budget is spent.
It prints P=8 / P=1 per step (the median per-pair ratio with its 95% bootstrap interval) beside the bytes
ratio (what the step must read) and the target, the bytes a step allocates (torch.profiler, its own output
silenced) and what one block's four Linears cost at 8 rows against 1.
"""

import contextlib
import os
import statistics
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from machine import linear_seconds
from measure import EagerDecoder, build_model, filled_runner, increase, kv_bytes, paired, param_counts
from model import GPTConfig

STEP_TARGETS = {128: 1.25, 960: 2.1}  # P = 8 / P = 1 per decode step at these contexts (docs/bench.md)


@torch.no_grad()
def step_check(args):
    """P = 8 against P = 1 per decode step at the contexts of STEP_TARGETS; returns what it printed."""
    kv = args.n_kv_head or args.n_head
    cfgs = {P: GPTConfig(n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head, n_kv_head=kv, n_streams=P,
                         vocab_size=args.vocab_size, n_prefix=args.n_prefix, block_size=max(STEP_TARGETS) + 1)
            for P in (1, 8)}
    models = {P: build_model(cfg, args.device, args.dtype) for P, cfg in cfgs.items()}
    print(f"decode step, reference path (model.py + KVCache), {args.device_name}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {args.dtype_why}")
    print(f"shape: {args.n_layer} layers, width {args.n_embd}, {args.n_head}/{kv} heads, vocab {args.vocab_size}, "
          f"{args.n_prefix} prefix slots; batch 1; P=1 and P=8 steps in pairs, {args.budget / 2:.0f} s per context")
    print(f"{'ctx':>5} | {'P=1 ms':>6} {'P=8 ms':>6} | {'P=8 / P=1 [95% interval]':>25} {'bytes':>5} {'target':>7} | "
          f"{'pairs':>5} | alloc/step KiB P=1, P=8")
    out, noise = [], torch.randn(2**20, generator=torch.Generator().manual_seed(0)).to(args.device, args.dtype)
    for ctx, target in STEP_TARGETS.items():
        decs = {P: EagerDecoder(m, 1, max_len=ctx + 1) for P, m in models.items()}
        tok = torch.zeros(1, 1, dtype=torch.long, device=args.device)
        runs = {}
        for P, dec in decs.items():
            runs[P] = filled_runner(dec, tok, ctx, args.device, noise)
        base, model = paired(runs[1], runs[8], args.budget / 2)
        med, lo, hi = increase(base, model)
        alloc = {P: step_allocations(models[P], dec, ctx) for P, dec in decs.items()}
        floor = {P: (param_counts(c)["non_embedding"] + c.vocab_size * c.n_embd) * 2 + kv_bytes(c, 1, ctx + 1, 2)
                 for P, c in cfgs.items()}  # bf16 bytes a step reads: the body, the tied LM head, the cache
        r = dict(context=ctx, p1_ms=[1e3 * t for t in base], p8_ms=[1e3 * t for t in model], ratio=1 + med,
                 ratio_lo=1 + lo, ratio_hi=1 + hi, bytes_ratio=floor[8] / floor[1], target=target, ok=1 + med <= target,
                 alloc_p1=alloc[1], alloc_p8=alloc[8])
        out.append(r)
        print(f"{ctx:5d} | {statistics.median(r['p1_ms']):6.1f} {statistics.median(r['p8_ms']):6.1f} | "
              f"{f'{1 + med:.2f} [{1 + lo:.2f}, {1 + hi:.2f}]':>25} {r['bytes_ratio']:5.2f} {f'<= {target}':>7} | "
              f"{len(base):5d} | {alloc[1] / 2**10:,.0f}, {alloc[8] / 2**10:,.0f}")
    # what 8 rows cost over 1 in one block's four Linears, where P = 8 pays beyond its bytes when the cache is short
    block = models[1].transformer.h[0]
    linears = (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj)
    rows = {n: sum(1e3 * linear_seconds(lin.weight, n, reps=30) for lin in linears) for n in (1, 8)}
    print(f"one block's four Linears, median: {rows[1]:.3f} ms for 1 row, {rows[8]:.3f} ms for 8 rows "
          f"({rows[8] / rows[1]:.2f}x)")
    print("targets: " + ", ".join(f"P=8/P=1 at ctx {r['context']} = {r['ratio']:.2f} ({'OK' if r['ok'] else 'MISSED'}, "
                                  f"<= {r['target']})" for r in out))
    return dict(step=out, linear_ms=rows)


def step_allocations(model, dec, ctx):
    """Bytes of every allocation one decode step makes, from torch.profiler's CPU memory events."""
    tok = torch.zeros(dec.cache.k.size(1) // model.config.n_streams, 1, dtype=torch.long, device=dec.cache.k.device)
    dec.cache.pos = ctx
    with quiet(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        dec.decode_step(tok)
    return sum(e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage > 0)


@contextlib.contextmanager
def quiet():
    """What C++ code writes to stdout and stderr meanwhile (the profiler's `USDT: ... profiler_start` lines) goes
    to /dev/null: no profiler output reaches the terminal."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 1)
        os.dup2(null.fileno(), 2)
    try:
        yield
    finally:
        for fd, copy in zip((1, 2), saved):
            os.dup2(copy, fd)
            os.close(copy)
