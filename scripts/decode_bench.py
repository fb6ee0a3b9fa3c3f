"""
Decode latency of one token step: eager reference (model.GPT + KVCache) vs the fused kernels, with and
without CUDA-graph replay, on a GPT-2-small shape with random bf16 weights. Prints a table with the
achieved bandwidth next to the measured HBM peak, then one JSON line.

    python scripts/decode_bench.py                    # full table: P x batch x context
    python scripts/decode_bench.py --stream_counts=1,8 --batches=1 --contexts=128 --steps=50   # quick look
"""
import argparse
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from kernels.fused import FusedDecoder, fused_status  # noqa: E402
from model import GPT, GPTConfig, KVCache  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
# model
parser.add_argument("--n_layer", type=int, default=12)
parser.add_argument("--n_embd", type=int, default=768)
parser.add_argument("--n_head", type=int, default=12)
parser.add_argument("--n_kv_head", type=int, default=None, help="None = n_head (MHA, as GPT-2)")
parser.add_argument("--vocab_size", type=int, default=50257)
parser.add_argument("--n_prefix", type=int, default=48)
# sweep
parser.add_argument("--stream_counts", type=str, default="1,2,4,8", help="P values, comma-separated")
parser.add_argument("--streams", default=None, help=argparse.SUPPRESS)  # the old name: refused, naming the new one
parser.add_argument("--batches", type=str, default="1,8")
parser.add_argument("--contexts", type=str, default="128,1024", help="real tokens cached before the timed step")
parser.add_argument("--steps", type=int, default=100, help="timed fused steps per row (median taken)")
parser.add_argument("--eager_steps", type=int, default=15, help="timed eager-reference steps per row")
parser.add_argument("--warmup", type=int, default=5)
args = parser.parse_args()
if args.streams is not None:
    sys.exit(f"error: --streams is now --stream_counts (the P values: --stream_counts={args.streams})")

dev = torch.device("cuda")
ok, reason = fused_status(dev)
if not ok:
    sys.exit(f"decode_bench needs the fused path: {reason}")
torch.manual_seed(0)
streams, batches, contexts = ([int(v) for v in s.split(",")] for s in (args.stream_counts, args.batches, args.contexts))


def hbm_bandwidth():
    """Device-to-device copy of 1 GiB, read + write bytes counted, median of 10 (B/s)."""
    src = torch.empty(2**30, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    times = []
    for _ in range(12):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    del src, dst
    return 2 * 2**30 / statistics.median(times[2:])


def time_steps(step, n, warmup, reset):
    """Median seconds of step(), each timed with CUDA events; reset() (untimed) restores the context."""
    for _ in range(warmup):
        reset()
        step()
    events = []
    for _ in range(n):
        reset()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        step()
        b.record()
        events.append((a, b))
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) for a, b in events) / 1e3


def floor_bytes(model, B, ctx):
    """Bytes one decode step must move at least: every weight once (tied embedding = LM head once),
    the prefixes once per stream, the KV cache of every row."""
    cfg = model.config
    w = sum(p.numel() for n, p in model.named_parameters() if ".prefix_" not in n and "wpe" not in n)
    kv = cfg.n_layer * cfg.n_streams * cfg.n_kv_head * cfg.head_dim * 2 * (B * (ctx + 1) + cfg.n_prefix_slots)
    return 2 * (w + kv)  # bf16


bw = hbm_bandwidth()
print(f"device: {torch.cuda.get_device_name()}, measured HBM bandwidth {bw / 1e12:.2f} TB/s "
      "(1 GiB D2D copy, read+write)")
rows = []
max_ctx = max(contexts)
for P in streams:
    cfg = GPTConfig(n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head, n_kv_head=args.n_kv_head,
                    vocab_size=args.vocab_size, block_size=max_ctx + 8, n_streams=P, n_prefix=args.n_prefix)
    with torch.device(dev):
        model = GPT(cfg)
    model = model.to(torch.bfloat16).eval()
    for B in batches:
        fused_eager = FusedDecoder(model, B, dtype=torch.bfloat16, cuda_graph=False)
        fused_graph = FusedDecoder(model, B, dtype=torch.bfloat16, cuda_graph=True)
        for ctx in contexts:
            idx = torch.randint(0, cfg.vocab_size, (B, ctx), device=dev)
            tok = torch.randint(0, cfg.vocab_size, (B, 1), device=dev)
            with torch.no_grad():
                cache = KVCache(model, B)
                model(idx, cache=cache)

                def eager_reset():
                    cache.pos = ctx  # the timed token always lands at position ctx

                t_eager = time_steps(lambda: model(tok, cache=cache), args.eager_steps, 2, eager_reset)
                del cache
            times = {}
            for name, dec in (("fused", fused_eager), ("graph", fused_graph)):
                dec.prefill(idx)

                def reset(dec=dec):
                    dec.pos.fill_(ctx)  # untimed: keep `ctx` tokens cached before every timed step
                    dec.cache.pos = ctx

                n = args.steps if name == "graph" else max(10, args.steps // 3)
                times[name] = time_steps(lambda dec=dec: dec.decode_step(tok), n, args.warmup, reset)
            nbytes = floor_bytes(model, B, ctx)
            row = dict(P=P, B=B, ctx=ctx, eager_us=t_eager * 1e6, fused_us=times["fused"] * 1e6,
                       graph_us=times["graph"] * 1e6, floor_us=nbytes / bw * 1e6, mbytes=nbytes / 1e6,
                       graph_gbps=nbytes / times["graph"] / 1e9)
            row["graph_pct_floor"] = 100 * row["floor_us"] / row["graph_us"]
            row["speedup_vs_eager"] = row["eager_us"] / row["graph_us"]
            rows.append(row)
            print(f"P={P} B={B} ctx={ctx}: eager {row['eager_us']:.0f} us, fused {row['fused_us']:.0f} us, "
                  f"fused+graph {row['graph_us']:.0f} us (floor {row['floor_us']:.0f} us)", flush=True)
        del fused_eager, fused_graph
    del model
    torch.cuda.empty_cache()

print(f"\npeak (measured): {bw / 1e9:.0f} GB/s; floor = (weights + prefixes + KV bytes) / peak")
hdr = (f"{'P':>2} {'B':>2} {'ctx':>5} | {'eager us':>9} {'fused us':>9} {'graph us':>9} | {'floor us':>8} "
       f"{'MB/step':>8} {'GB/s':>6} {'% floor':>7} {'x eager':>7}")
print(hdr)
print("-" * len(hdr))
for r in rows:
    print(f"{r['P']:>2} {r['B']:>2} {r['ctx']:>5} | {r['eager_us']:>9.0f} {r['fused_us']:>9.0f} "
          f"{r['graph_us']:>9.0f} | {r['floor_us']:>8.1f} {r['mbytes']:>8.1f} {r['graph_gbps']:>6.0f} "
          f"{r['graph_pct_floor']:>6.1f}% {r['speedup_vs_eager']:>6.1f}x")


def find(P, B, ctx):
    return next((r for r in rows if (r["P"], r["B"], r["ctx"]) == (P, B, ctx)), None)


targets = {}
if (r1 := find(1, 1, 128)) is not None:
    targets["graph_P1_B1_ctx128_le_150us"] = dict(value=round(r1["graph_us"], 1), ok=r1["graph_us"] <= 150)
    if (r8 := find(8, 1, 128)) is not None:
        ratio = r8["graph_us"] / r1["graph_us"]
        targets["graph_P8_over_P1_ctx128_le_1.25"] = dict(value=round(ratio, 3), ok=ratio <= 1.25)
b1 = [r for r in rows if r["B"] == 1]
if b1:
    worst = min(r["speedup_vs_eager"] for r in b1)
    targets["graph_ge_10x_eager_at_B1"] = dict(value=round(worst, 1), ok=worst >= 10)
print("\ntargets:", ", ".join(f"{k} = {v['value']} ({'OK' if v['ok'] else 'MISSED'})" for k, v in targets.items()))
print(json.dumps(dict(bench="decode", device=torch.cuda.get_device_name(), hbm_gbps=round(bw / 1e9, 1),
                      rows=[{k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items()} for r in rows],
                      targets=targets)))
