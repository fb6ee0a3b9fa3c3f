"""
Where one fused decode step's GPU time goes, kernel by kernel (torch.profiler, CUDA activity only),
next to the step's wall time with and without CUDA-graph replay. GPT-2-small shape, random bf16 weights.

    python scripts/profile_decode.py                          # P = 1 and 8, B = 1, context 128
    python scripts/profile_decode.py --stream_counts=4 --batch=8 --context=1024
"""
import argparse
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from kernels.fused import FusedDecoder  # noqa: E402
from model import GPT, GPTConfig, KVCache  # noqa: E402

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--stream_counts", default="1,8", help="P values, comma-separated")
p.add_argument("--streams", default=None, help=argparse.SUPPRESS)  # the old name: refused, naming the new one
p.add_argument("--batch", type=int, default=1)
p.add_argument("--context", type=int, default=128, help="tokens cached before the profiled steps")
p.add_argument("--steps", type=int, default=20, help="profiled steps")
args = p.parse_args()
if args.streams is not None:
    sys.exit(f"error: --streams is now --stream_counts (the P values: --stream_counts={args.streams})")


def step_us(dec, tok, n):
    """Median wall time of one decode_step, by CUDA events."""
    times = []
    for _ in range(n):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dec.decode_step(tok)
        b.record()
        torch.cuda.synchronize()
        times.append(1000 * a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


for P in map(int, args.stream_counts.split(",")):
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=12, n_head=12, n_embd=768, vocab_size=50257, n_streams=P, n_prefix=48,
                    block_size=args.context + 3 * args.steps + 16)
    model = GPT(cfg).cuda().eval()
    idx = torch.randint(0, cfg.vocab_size, (args.batch, args.context), device="cuda")
    tok = idx[:, -1:].contiguous()
    wall = {}
    for graph in (False, True):
        dec = FusedDecoder(model, args.batch, dtype=torch.bfloat16, cuda_graph=graph)
        dec.prefill(idx)
        step_us(dec, tok, 3)  # warm-up (and graph capture)
        wall[graph] = step_us(dec, tok, args.steps)
    dec = FusedDecoder(model, args.batch, dtype=torch.bfloat16, cuda_graph=False)
    dec.prefill(idx)
    step_us(dec, tok, 3)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            dec.decode_step(tok)
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "self_device_time_total", None)
        t = getattr(e, "self_cuda_time_total", 0) if t is None else t
        if t > 0:
            rows.append((t / args.steps, e.count / args.steps, e.key))
    rows.sort(reverse=True)
    busy = sum(r[0] for r in rows)
    print(f"\nP={P} B={args.batch} context {args.context}: step {wall[False]:.0f} us eager launches, "
          f"{wall[True]:.0f} us graph replay; kernels busy {busy:.0f} us per step")
    print(f"{'us/step':>8} {'calls':>6} {'us/call':>8}  kernel")
    for t, n, name in rows[:14]:
        print(f"{t:8.1f} {n:6.1f} {t / max(n, 1e-9):8.2f}  {name[:90]}")

    # the eager reference (model.GPT + KVCache, bf16): host-side time per op, since eager decoding is launch-bound
    ref = model.to(torch.bfloat16)
    with torch.no_grad():
        cache = KVCache(ref, args.batch)
        ref(idx, cache=cache)
        for _ in range(3):
            ref(tok, cache=cache)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                ref(tok, cache=cache)
            torch.cuda.synchronize()
    rows = sorted(((e.self_cpu_time_total / 10, e.count / 10, e.key) for e in prof.key_averages()), reverse=True)
    print(f"eager reference, P={P}: host time per step {sum(r[0] for r in rows):.0f} us; top ops:")
    for t, n, name in rows[:10]:
        print(f"{t:8.1f} {n:6.1f}  {name[:90]}")
