"""
The research cost sweep: memory and latency of P streams against width scaling over batches x contexts x
attention kinds x decode paths, where ParScale stops winning, and the training cost of every P. bench.py's
lesson measures the paper's claim at one shape; this maps where it holds.

    python experiments/cost_sweep.py --device=cpu               # the tiny shape on a CPU, in seconds
    python experiments/cost_sweep.py                            # GPT-2-small on one GPU: batch 1-8 x context 128-1024
    python experiments/cost_sweep.py --mode=train               # training cost: tokens/s and MFU for P = 1, 2, 4, 8
    python experiments/cost_sweep.py --mode=all --time_limit=140 --plot=cost.png   # both, on one GPU
    (no multi-GPU run: every measurement is one model on one device)

For each attention kind (--kv_heads) it builds the P = 1 base, each P-stream model and its width-matched
P = 1 model (measure.model_family: N_base (1 + k ln P), arXiv 2505.10475 section 3), then measures the
prefill of `context` tokens and l_out greedy decode steps (median of --repeats runs after a warm-up), on the
fused path and on eager PyTorch. Memory: on CUDA the allocator's peak, on a CPU the weights plus the KV
cache. It prints the table, the ratios and crossovers (crossovers.py), the cell nearest the paper's 22x / 6x,
and one JSON line. The models, decoders and timing helpers are measure.py's, as bench.py's are. A mistake
the user can fix ends as one `error: ...` line naming the flag, exit status 1, before anything is measured.
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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as a script: `python experiments/cost_sweep.py` from anywhere
    sys.path.insert(0, ROOT)
from cli import ArgumentParser, RenamedFlag, UserError, entry, int_list, model_config, resolved  # noqa: E402
from counts import estimate_mfu, flops_per_token  # noqa: E402
from machine import peak_flops, resolve_device, resolve_dtype, synchronize  # noqa: E402
from experiments import plots  # noqa: E402
from experiments.crossovers import paper_comparison, print_summary, summarise  # noqa: E402
from measure import PRESETS, build_model, decode_paths, make_decoder, model_family, with_threads_and_dtype  # noqa
from model import GPT, GPTConfig  # noqa: E402

# the sweep's sizes for each of measure.py's shapes (its PRESETS give n_layer, n_embd, n_head, vocab_size, n_prefix);
# gpt2 is the default on CUDA (the paper's L_out of 64), tiny on a CPU
SIZES = {
    "paper": dict(batches=[1], contexts=[64, 512], l_out=16, repeats=4, train_batch=1, train_seq=512, train_steps=2),
    "gpt2": dict(batches=[1, 2, 4, 8], contexts=[128, 512, 1024], l_out=64, repeats=3, train_batch=4, train_seq=1024,
                 train_steps=10),
    "tiny": dict(batches=[1, 2, 4, 8], contexts=[32, 128], l_out=16, repeats=3, train_batch=4, train_seq=64,
                 train_steps=3),
}
SHAPE = ("n_layer", "n_embd", "n_head", "vocab_size", "n_prefix")  # what the sweep takes from measure.PRESETS
H200_HBM_BYTES = 4.8e12  # H200 HBM3e bandwidth (spec): the default --peak_bw


# -----------------------------------------------------------------------------
# decode: batches x contexts x attention kinds x paths

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
    cache at the run's mean length (docs/fused.md's decode table: the "floor" column)."""
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
    dec = make_decoder(path, model, batch_size, args.dtype, model.config.block_size)
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
        families[kind] = model_family(base_cfg, args.stream_counts, args.law_k)
        print_family(kind, families[kind], args.law_k)
    cuda = args.device.type == "cuda"
    mem = ("peak allocated (weights + decoder state + activations)" if cuda else
           "weights + KV cache (CPU: no allocator peak)")
    print(f"\ndecode: prefill `context` prompt tokens, then {args.l_out} greedy decode steps; {args.repeats} timed "
          f"runs after a warm-up. mem = {mem}; "
          f"weights = parameter bytes; state = what the decoder allocates (KV cache, ...); "
          f"floor% = bandwidth floor / measured ms per token"
          + (f" (stated peak {args.peak_bw / 1e12:.2f} TB/s)" if cuda else " (n/a on CPU)"))
    print(f"{'attn':5} {'path':5} {'model':9} {'width':>5} {'B':>2} {'ctx':>5} | {'mem MB':>8} {'weights':>8} "
          f"{'state':>8} | {'latency ms: median [min, max]':>32} {'prefill':>8} {'ms/tok':>7} {'floor%':>6} | "
          "elapsed", flush=True)
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
                    cfg = dataclasses.replace(m["cfg"], block_size=context + args.l_out)  # the cache fits the run
                    model = build_model(cfg, args.device, args.dtype, args.seed)
                    resident = torch.cuda.memory_allocated(args.device) - baseline if cuda else 0
                    for batch_size in args.batches:
                        if out_of_time():
                            skipped += 1
                            continue
                        try:
                            r = measure(model, path, batch_size, context, args, resident)
                        except UserError as e:  # the fused path refused this model: eager measures it
                            notes.append(f"fused path not used for {kind} {m['label']}: {e}: measured on the eager "
                                         "path only")
                            print(f"!!! {notes[-1]}", flush=True)
                            break
                        except Exception as e:  # a failing path or shape is reported, and the sweep goes on
                            notes.append(f"FAILED {kind} {path} {m['label']} B={batch_size} ctx={context}: "
                                         f"{type(e).__name__}: {e}")
                            print(f"!!! {notes[-1]} (skipping this model's larger batches)", flush=True)
                            if cuda and not cuda_still_works(args.device):
                                notes.append("the CUDA context is broken after that failure: sweep stopped")
                                print(f"!!! {notes[-1]}", flush=True)
                                return rows, families, notes
                            break
                        floor = (decode_floor_seconds(cfg, m["non_embedding"], batch_size, context, args)
                                 if cuda else None)
                        r.update(attn=kind, path=path, side=m["side"], P=m["P"], label=m["label"], n_embd=cfg.n_embd,
                                 batch=batch_size, context=context,
                                 roofline=None if floor is None else floor / r["ms_per_token"] * 1e3)
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
            f"{r['ms']:10.2f} [{r['ms_min']:9.2f}, {r['ms_max']:9.2f}] {r['prefill_ms']:8.2f} "
            f"{r['ms_per_token']:7.3f} {floor:>6}")



# -----------------------------------------------------------------------------
# training cost

def bench_train(args, base_cfgs):
    """Tokens/s and MFU of one training step (forward + backward + AdamW) for every P at a fixed shape."""
    cuda = args.device.type == "cuda"
    peak = args.peak_flops
    B, T = args.train_batch, args.train_seq
    print(f"\ntrain: batch {B} x {T} tokens, forward + backward + AdamW, {'bf16 autocast' if cuda else 'float32'}, "
          f"eager (no graph compiler); median of {args.train_steps} steps after 2 warm-up steps; MFU "
          + (f"against {peak / 1e12:.0f} TFLOP/s ({args.peak_flops_source})" if peak else
             f"n/a (no datasheet peak for {args.device_name}; --peak_flops gives one)"))
    print(f"{'attn':5} {'P':>2} | {'tok/s':>10} {'vs P=1':>6} | {'step ms':>8} | {'TFLOP/s':>8} {'MFU':>6} | "
          f"{'peak GB':>7}")
    out = []
    for base_cfg in base_cfgs:
        for P in args.stream_counts:
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
            flops = flops_per_token(model, T) * tok_s
            r = dict(attn=attn_label(base_cfg), P=P, tokens_per_s=tok_s, step_ms=step * 1e3, flops_per_s=flops,
                     mfu=estimate_mfu(model, tok_s, T, peak),
                     peak_gb=torch.cuda.max_memory_allocated(args.device) / 2**30 if cuda else None)
            first = next((o for o in out if o["attn"] == r["attn"] and "error" not in o), r)  # normally P=1
            mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
            peak_gb = "n/a" if r["peak_gb"] is None else f"{r['peak_gb']:.2f}"
            print(f"{r['attn']:5} {P:2d} | {tok_s:10,.0f} {tok_s / first['tokens_per_s']:6.2f} | {r['step_ms']:8.1f} | "
                  f"{flops / 1e12:8.2f} {mfu:>6} | {peak_gb:>7}", flush=True)
            out.append(r)
            del model, optimizer
    return out


def attn_label(cfg):
    return "MHA" if cfg.n_kv_head == cfg.n_head else f"GQA{cfg.n_kv_head}"


def free_memory(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def rounded(obj):
    """Floats to 5 significant digits (inf as None), for a JSON line that stays readable and valid."""
    if isinstance(obj, float):
        return float(f"{obj:.5g}") if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: rounded(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [rounded(v) for v in obj]
    return obj


def base_configs(args):
    """The sweep: one base config per attention kind in --kv_heads, block_size set per run."""
    return [GPTConfig(n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head, vocab_size=args.vocab_size,
                      n_kv_head=kv, n_prefix=args.n_prefix, dropout=0.0) for kv in args.kv_heads]




# -----------------------------------------------------------------------------
# the command line

def check_args(args):
    """Values argparse cannot check, after the preset filled the gaps: one `error:` line each, naming the flag."""
    for flag in ("l_out", "repeats", "train_batch", "train_seq", "train_steps"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    for kv in args.kv_heads:  # model.py's own rules, through the one place that makes them the user's
        model_config(f"the model flags (--kv_heads={kv})", n_layer=args.n_layer, n_embd=args.n_embd,
                     n_head=args.n_head, n_kv_head=kv, vocab_size=args.vocab_size, n_prefix=args.n_prefix,
                     n_streams=max(args.stream_counts))
    if not (math.isfinite(args.law_k) and args.law_k >= 0):
        raise UserError(f"--law_k must be a finite number >= 0 (the paper fits 0.39 on code, 0.33 on the Pile), "
                        f"got {args.law_k}")
    if not (args.time_limit > 0 or args.time_limit == -1):
        raise UserError(f"--time_limit must be a number of seconds > 0, or -1 for never; got {args.time_limit}")
    if args.threads == 0 or args.threads < -1:
        raise UserError(f"--threads must be >= 1, or -1 for all cores; got {args.threads}")
    if not (math.isfinite(args.peak_flops) and args.peak_flops > 0 or args.peak_flops == -1):
        raise UserError(f"--peak_flops must be a positive number of FLOP/s, or -1 to look up the GPU; "
                        f"got {args.peak_flops}")
    if not (math.isfinite(args.peak_bw) and args.peak_bw > 0):
        raise UserError(f"--peak_bw must be a positive number of bytes/s, got {args.peak_bw}")
    if args.plot:
        if plots.Figure is None:
            raise UserError(f"--plot={args.plot} needs matplotlib, which is not importable here; pip install "
                            "matplotlib, or drop --plot")
        if args.mode == "train":
            raise UserError(f"--plot draws the sweep's cost figure; --mode={args.mode} has none")
        if not os.path.isdir(os.path.dirname(os.path.abspath(args.plot))):
            raise UserError(f"--plot={args.plot}: its folder does not exist; create it or choose another path")


def parse_args(argv):
    p = ArgumentParser(prog="cost_sweep.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["decode", "train", "all"], default="decode",
                   help="decode: batches x contexts x attention kinds x paths; train: training cost; all: both")
    p.add_argument("--preset", choices=["auto", *PRESETS], default="auto",
                   help="measure.py's shapes; auto = gpt2 on CUDA, tiny on CPU; flags below override it")
    # model
    p.add_argument("--n_layer", type=int, default=None, help="None = preset")
    p.add_argument("--n_embd", type=int, default=None, help="None = preset")
    p.add_argument("--n_head", type=int, default=None,
                   help="None = preset; head_dim = n_embd / n_head stays fixed when width scales")
    p.add_argument("--vocab_size", type=int, default=None, help="None = preset (paper: 151936, gpt2: 50257)")
    p.add_argument("--n_prefix", type=int, default=None,
                   help="prefix slots per layer per stream; None = preset (48, the paper's)")
    p.add_argument("--kv_heads", type=int_list, default=None,
                   help="attention kinds, comma-separated n_kv_head (n_head = MHA); None = n_head and 2")
    p.add_argument("--stream_counts", type=int_list, default=[1, 2, 4, 8],
                   help="P values, comma-separated; P=1 is the base")
    p.add_argument("--streams", action=RenamedFlag, new="--stream_counts", why="the P values; --streams is a file")
    p.add_argument("--law_k", type=float, default=0.39,
                   help="the scaling law's k: P streams are worth N_base(1 + k ln P) (0.39 code, 0.33 Pile)")
    p.add_argument("--k", action=RenamedFlag, new="--law_k", why="the scaling law's k")
    p.add_argument("--seed", type=int, default=0, help="the random weights' seed (their values do not matter for cost)")
    # decode
    p.add_argument("--batches", type=int_list, default=None, help="batch sizes, comma-separated; None = preset")
    p.add_argument("--contexts", type=int_list, default=None,
                   help="prompt lengths prefilled before decoding; None = preset")
    p.add_argument("--l_out", type=int, default=None,
                   help="decode steps after the prefill; None = preset (gpt2: 64, the paper's)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed runs per measurement (median, min, max reported); None = preset")
    p.add_argument("--paths", default="auto", choices=["auto", "fused", "eager"],
                   help="auto = fused (when kernels/fused.py works here), then eager; fused errors out if unavailable")
    p.add_argument("--time_limit", type=float, default=-1,
                   help="seconds after which remaining measurements are skipped (loudly); -1 = never")
    p.add_argument("--peak_bw", type=float, default=H200_HBM_BYTES,
                   help="stated memory bandwidth for the floor, bytes/s (H200: 4.8e12)")
    p.add_argument("--plot", default="", help="write the cost figure to this PNG (needs matplotlib); empty = no figure")
    # training cost
    p.add_argument("--train_batch", type=int, default=None, help="sequences per step; None = preset")
    p.add_argument("--train_seq", type=int, default=None, help="tokens per sequence; None = preset")
    p.add_argument("--train_steps", type=int, default=None, help="timed steps per P; None = preset")
    p.add_argument("--peak_flops", type=float, default=-1,
                   help="peak FLOP/s for MFU; -1 = the GPU's datasheet bf16 peak (machine.peak_flops: H100/H200 "
                        "989e12), none on CPU")
    # system
    p.add_argument("--device", default="auto", help="auto = cuda when available, else cpu")
    p.add_argument("--threads", type=int, default=-1, help="torch CPU threads; -1 = every core this process may use")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                   help="decode dtype; auto = bfloat16 on CUDA; on CPU bfloat16 where a start-up probe finds "
                        "torch's bf16 matmul at least as fast as fp32, else float32")
    args = p.parse_args(argv)
    device = torch.device(resolve_device(args.device, allowed=("cpu", "cuda"), who="cost_sweep.py"))
    preset = args.preset if args.preset != "auto" else "gpt2" if device.type == "cuda" else "tiny"
    sizes = {key: PRESETS[preset][key] for key in SHAPE} | SIZES[preset]
    sizes = {key: value if getattr(args, key) is None else getattr(args, key) for key, value in sizes.items()}
    sizes["kv_heads"] = args.kv_heads or [sizes["n_head"], 2]  # MHA and GQA with 2 kv heads
    check_args(resolved(args, **sizes))
    if args.dtype != "auto":  # checked before anything is measured; auto is resolved in main, threads set
        resolve_dtype(args.dtype, device)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    # MFU's denominator: the flag, else machine.py's datasheet table (None on CPU or an unlisted GPU)
    peak = (args.peak_flops, "--peak_flops") if args.peak_flops > 0 else (peak_flops(device_name),
                                                                          f"datasheet bf16 peak of {device_name}")
    paths, fused_reason = decode_paths(args.paths, device)
    return resolved(args, **sizes, device=device, preset_name=preset, device_name=device_name, peak_flops=peak[0],
                    peak_flops_source=peak[1], stream_counts=sorted(set(args.stream_counts) | {1}),
                    paths=paths, fused_reason=fused_reason)


def main(argv=None):
    return with_threads_and_dtype(parse_args(argv), run)


def run(args):
    """The decode sweep, the training cost, or both; then one JSON line with everything."""
    t0 = time.time()
    cfgs = base_configs(args)
    result = dict(mode=args.mode, device=args.device_name, torch=torch.__version__, threads=torch.get_num_threads(),
                  dtype=str(args.dtype).removeprefix("torch."), paths=args.paths, fused_reason=args.fused_reason,
                  shape=dict(n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head, vocab_size=args.vocab_size,
                             n_prefix=args.n_prefix), stream_counts=args.stream_counts, law_k=args.law_k,
                  kv_heads=args.kv_heads)
    print(f"device {args.device} ({args.device_name}), torch {torch.__version__}, {torch.get_num_threads()} CPU "
          f"thread(s), decode dtype {args.dtype_why}")
    print(f"shape: {args.n_layer} layers, width {args.n_embd}, {args.n_head} heads (head_dim "
          f"{args.n_embd // args.n_head}), vocab {args.vocab_size}, {args.n_prefix} prefix slots; attention kinds: "
          f"{', '.join(attn_label(c) for c in cfgs)}")
    print(f"decode paths: {', '.join(args.paths)} (fused path: {args.fused_reason})")
    if args.mode in ("decode", "all"):
        rows, families, notes = bench_decode(args, cfgs)
        headline, crossovers = summarise(rows, args)
        print_summary(headline, crossovers, args)
        paper = paper_comparison(headline, args)
        if args.plot:
            plots.plot_cost(rows, families, args)
        result.update(batches=args.batches, contexts=args.contexts, l_out=args.l_out, repeats=args.repeats,
                      models={kind: [dict(label=m["label"], side=m["side"], P=m["P"], n_embd=m["cfg"].n_embd,
                                          n_head=m["cfg"].n_head, n_kv_head=m["cfg"].n_kv_head,
                                          non_embedding=m["non_embedding"], target=round(m["target"]), total=m["total"])
                                     for m in fam] for kind, fam in families.items()},
                      results=rows, headline=headline, crossovers=crossovers, paper_cell=paper, notes=notes)
        for note in notes:
            print(f"!!! {note}")
    if args.mode in ("train", "all"):
        result.update(train=bench_train(args, cfgs), peak_flops=args.peak_flops)
    result["elapsed_s"] = time.time() - t0
    print(f"elapsed {result['elapsed_s']:.1f} s")
    print(json.dumps(rounded(result)), flush=True)
    return result


if __name__ == "__main__":
    entry(main)
