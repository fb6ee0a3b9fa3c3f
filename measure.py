"""
How bench.py (and experiments/cost_sweep.py) measure what a model costs: the shapes, the width-matched
family of models, models with random weights built cheaply in the decode dtype, one decoder interface for
the reference and the fused path, the machine's read bandwidth and peak memory, the bytes a decode step must
read, and one model's timed runs (in a process of its own on a CPU, so that its peak memory is its own).
bench.py turns these into the lesson's table; read it first.
"""

import argparse
import dataclasses
import gc
import glob
import math
import multiprocessing
import os
import statistics
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from common import UserError, param_report, resolve_dtype
from kernels.fused import FusedDecoder, fused_decoder_for, fused_status
from model import GPT, GPTConfig, KVCache

try:  # peak resident memory of a process; absent on Windows, where the CPU peak is not measured
    import resource
except ImportError:
    resource = None

PRESETS = {  # the shapes measured, and the lesson's sizes for each (the cost sweep has its own sizes)
    # N-matched to the paper's 1.6B (bench.py's docstring): the lesson's default
    "paper": dict(n_layer=36, n_embd=2048, n_head=16, n_kv_head=2, vocab_size=151936, n_prefix=48,
                  prompt=64, long_context=1000, steps=4, repeats=4),
    # GPT-2-small (124M, multi-head attention): --mode=step's shape, and the cost sweep's default on CUDA
    "gpt2": dict(n_layer=12, n_embd=768, n_head=12, n_kv_head=0, vocab_size=50257, n_prefix=48,
                 prompt=64, long_context=1000, steps=8, repeats=3),
    # a toy shape for a quick look; 12 heads as GPT-2, so width still moves in small steps
    "tiny": dict(n_layer=2, n_embd=96, n_head=12, n_kv_head=2, vocab_size=512, n_prefix=4,
                 prompt=16, long_context=100, steps=4, repeats=3),
}


# -----------------------------------------------------------------------------
# width matching: the P = 1 model that has the parameters P streams are worth

_COUNTS = {}


def param_counts(cfg):
    """Exact common.param_report(GPT(cfg)), from a model built on the meta device (no memory), once per config:
    even on meta the init costs ~0.1 s a model, and width matching asks for the same configs many times."""
    key = repr(cfg)  # a dataclass's repr names every field
    if key not in _COUNTS:
        with torch.device("meta"):
            _COUNTS[key] = param_report(GPT(cfg))
    return dict(_COUNTS[key])


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
# models with random weights, and one decoder interface for both paths

def build_model(cfg, device, dtype, seed=0):
    """
    A model with random weights, made directly in `dtype` on `device`, cheaply: built on the meta
    device, given uninitialised storage, then filled by tiling one block of N(0, 0.02) draws (LayerNorm
    weights 1, biases 0). No fp32 copy and no random number per weight: a 3B model is ready in seconds.
    The weights are finite, normal numbers (garbage from torch.empty can be slow on a CPU); for cost,
    any random weights do.
    """
    with torch.device("meta"):
        model = GPT(cfg)
    model = model.to(dtype).to_empty(device=device)
    model.lm_head.weight = model.transformer.wte.weight  # to_empty unties them; the dropped copy was never touched
    gen = torch.Generator().manual_seed(seed)
    block = (torch.randn(2**20, generator=gen) * 0.02).to(device=device, dtype=dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                tile_(p, block)
            else:
                p.fill_(1.0 if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")) else 0.0)
    return model.eval()


def tile_(t, block):
    """Fill the contiguous tensor t in place with copies of the 1-D block."""
    flat, m = t.view(-1), block.numel()
    whole = flat.numel() // m * m
    flat[:whole].view(-1, m).copy_(block)
    flat[whole:].copy_(block[:flat.numel() - whole])


class EagerDecoder:
    """model.GPT with a KVCache behind FusedDecoder's interface, so both paths share one timing loop."""

    def __init__(self, model, batch_size, max_len=None):
        self.model, self.cache = model, KVCache(model, batch_size, max_len=max_len)

    def prefill(self, idx):
        self.cache.pos = 0  # rewinding is enough: a step masks out every slot past pos
        return self.model(idx, cache=self.cache)[0][:, -1]  # (B, vocab)

    def decode_step(self, tok):
        return self.model(tok, cache=self.cache)[0][:, -1]  # (B, 1) -> (B, vocab)


def make_decoder(path, model, batch_size, dtype, max_len):
    """The decoder a path times, for up to max_len tokens. A model the fused kernels refuse raises
    UserError with the reason."""
    if path == "fused":
        dec, why = fused_decoder_for(model, batch_size, dtype, max_len)
        if dec is None:
            raise UserError(why)
        return dec
    return EagerDecoder(model, batch_size, max_len)


def fill_cache(dec, context, seed=0):
    """Stand in for a prefill of `context` tokens (minutes on a CPU at P = 8): random keys and values
    of unit scale in the decoder's cache, whose next step then runs at position `context`."""
    block = torch.randn(2**20, generator=torch.Generator().manual_seed(seed)).to(dec.cache.k.device, dec.cache.k.dtype)
    tile_(dec.cache.k, block)
    tile_(dec.cache.v, block)
    dec.cache.pos = context
    if isinstance(dec, FusedDecoder):
        dec.pos.fill_(context)  # the fused decoder keeps the position on the device too


def backbone_of(model):
    """The P = 1 model inside a P-stream model: the very same backbone tensors, no copy (no memory)."""
    with torch.device("meta"):
        base = GPT(dataclasses.replace(model.config, n_streams=1))
    base.load_state_dict(model.state_dict(), strict=False, assign=True)
    base.lm_head.weight = base.transformer.wte.weight
    return base.eval()


# -----------------------------------------------------------------------------
# the machine: read bandwidth, peak memory, synchronisation

def last_cache_bytes(device):
    """The last cache level's size (CPU: from /sys, Linux only; CUDA: the L2), or None when unknown."""
    if device.type == "cuda":
        return getattr(torch.cuda.get_device_properties(device), "L2_cache_size", None)
    sizes = {}
    for d in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*"):
        try:
            with open(f"{d}/level") as f_level, open(f"{d}/size") as f_size:
                level, size = int(f_level.read()), f_size.read().strip()
        except (OSError, ValueError):
            continue
        unit = {"K": 2**10, "M": 2**20, "G": 2**30}.get(size[-1:], 1)
        sizes[level] = int(size.rstrip("KMG")) * unit
    return sizes[max(sizes)] if sizes else None


def read_bandwidth(device):
    """(bytes/s, how it was measured): the best of 5 torch sums over a float32 buffer of
    max(1 GiB, 4x the last cache level), so that every byte comes from memory, not a cache."""
    llc = last_cache_bytes(device)
    nbytes = max(2**30, 4 * (llc or 0))
    buf = torch.ones(nbytes // 4, device=device)
    times = []
    for _ in range(6):  # the first is a warm-up
        synchronize(device)
        t0 = time.perf_counter()
        buf.sum()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    del buf
    llc_text = f"last cache level {llc / 2**20:.0f} MiB" if llc else "last cache level unknown"
    return nbytes / min(times[1:]), f"best of 5 sums over {nbytes / 2**30:.0f} GiB; {llc_text}"


def peak_rss_bytes():
    """This process's peak resident memory so far: VmHWM on Linux (ru_maxrss there would carry the
    parent's peak into a spawned child), ru_maxrss elsewhere (bytes on macOS); None on Windows."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        pass
    if resource is None:
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def memory_mark(device):
    """Start a phase: the peak that memory_peak reports is from here on (CUDA) or process-wide (CPU)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def memory_peak(device):
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else peak_rss_bytes()


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def decode_paths(requested, device):
    """(the decode paths to run, why the fused one is or is not here), said once and never changed silently:
    auto = fused (when kernels/fused.py works on this device) then eager; fused is refused if it does not."""
    ok, why = fused_status(device)
    if requested == "fused" and not ok:
        raise UserError(f"--paths=fused, but the fused path is unavailable: {why}; use --paths=auto or --paths=eager")
    return (["fused", "eager"] if requested == "auto" and ok else ["eager"] if requested != "fused" else ["fused"]), why


def with_threads_and_dtype(args, run):
    """run(args) with torch's CPU threads set (--threads, -1 = all cores) and args.dtype resolved: auto on a CPU
    measures bf16 against fp32 first (common.choose_cpu_dtype), as decoding is what is measured; threads restored
    after (the tests call main())."""
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads if args.threads > 0 else all_cores())
    try:
        args.dtype, args.dtype_why = resolve_dtype(args.dtype, args.device, cpu_auto="probe")
        return run(args)
    finally:
        torch.set_num_threads(threads)


def all_cores():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# -----------------------------------------------------------------------------
# bytes a step must read

def kv_bytes(cfg, batch_size, context, itemsize):
    """Keys and values of `context` cached tokens in every layer and row: what a KV cache must hold."""
    return 2 * cfg.n_layer * cfg.n_streams * batch_size * cfg.n_kv_head * context * cfg.head_dim * itemsize


def floor_bytes(cfg, counts, batch_size, context, itemsize):
    """Bytes one decode step must read: every weight once for all P*B rows (the tied LM head too, the
    prefixes in N), and the cached keys and values (README, bench.py section)."""
    weights = counts["non_embedding"] + cfg.vocab_size * cfg.n_embd
    return weights * itemsize + kv_bytes(cfg, batch_size, context, itemsize)


# -----------------------------------------------------------------------------
# one model's measurements (bench.py's lesson), in a process of its own on a CPU

def start(dec, prompt, device, context=None):
    """Begin a run: prefill the prompt, or with `context` rewind to a cache filled to that many tokens.
    Returns (prefill seconds or None, the first token to decode, (B, 1))."""
    if context is not None:
        dec.cache.pos = context
        if isinstance(dec, FusedDecoder):
            dec.pos.fill_(context)  # the fused decoder keeps the position on the device too
        return None, prompt[:, -1:]
    synchronize(device)
    t0 = time.perf_counter()
    tok = dec.prefill(prompt).argmax(dim=-1, keepdim=True)
    synchronize(device)
    return time.perf_counter() - t0, tok


def step(dec, tok, device):
    """One timed greedy decode step: (seconds, the next token)."""
    synchronize(device)
    t0 = time.perf_counter()
    tok = dec.decode_step(tok).argmax(dim=-1, keepdim=True)
    synchronize(device)
    return time.perf_counter() - t0, tok


@torch.no_grad()
def measure_model(spec):
    """
    One model's measurements for the lesson, in this process (on a CPU, a process of its own). spec: a
    dict of plain values (it crosses a process boundary). Two phases:
      short: prefill the prompt, then decode spec["steps"] tokens after it;
      long:  a cache filled to spec["long_context"] tokens (fill_cache), then decode spec["steps"] tokens.
    Each phase makes its decoder, runs a warm-up step, reads the peak memory (the model alone), then
    times spec["repeats"] runs (a run: the prefill or rewind, then its steps, each timed). With
    spec["pair"] (a P-stream model) the model's own backbone runs as P = 1 beside it (backbone_of:
    shared tensors, only its cache is extra), step for step in turn, so that ParScale's small increase
    is measured against a base in the same process, at the same moment.
    Returns the runs' seconds ("prefill_s", "step_short_s", "step_long_s"; "base_..." for the paired
    backbone) and the peak memory of each phase.
    """
    torch.set_num_threads(spec["threads"])
    device, dtype, B = torch.device(spec["device"]), getattr(torch, spec["dtype"]), spec["batch"]
    cfg = GPTConfig(**spec["config"])
    T, L, steps = spec["prompt"], spec["long_context"], spec["steps"]
    t0 = time.perf_counter()
    model = build_model(cfg, device, dtype, spec["seed"])
    base = backbone_of(model) if spec["pair"] else None
    out = dict(build_s=time.perf_counter() - t0)
    prompt = torch.randint(cfg.vocab_size, (B, T), generator=torch.Generator().manual_seed(spec["seed"])).to(device)
    for phase, context, max_len in (("short", None, T + steps), ("long", L, L + steps)):
        memory_mark(device)
        decs = {"": make_decoder(spec["path"], model, B, dtype, max_len)}
        if base is not None:
            decs = {"base_": make_decoder(spec["path"], base, B, dtype, max_len), **decs}  # the paired base first
        for who, dec in decs.items():
            if context is not None:
                fill_cache(dec, context, spec["seed"])
            step(dec, start(dec, prompt, device, context)[1], device)  # warm-up: kernel choice, graph capture
            if who == "":
                out[f"peak_{phase}"] = memory_peak(device)  # the paired base's cache is made, not yet touched
        for _ in range(spec["repeats"]):
            toks, times = {}, {who: [] for who in decs}
            for who, dec in decs.items():
                prefill, toks[who] = start(dec, prompt, device, context)
                if prefill is not None:
                    out.setdefault(f"{who}prefill_s", []).append(prefill)
            for _ in range(steps):  # one step each in turn: drift in the machine's speed hits both alike
                for who, dec in decs.items():
                    t, toks[who] = step(dec, toks[who], device)
                    times[who].append(t)
            for who in decs:
                out.setdefault(f"{who}step_{phase}_s", []).append(statistics.mean(times[who]))
        del decs
        free_memory(device)
    return out


def measure_isolated(spec):
    """measure_model in a fresh process, so that its peak resident memory is this model's alone."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(measure_model, (spec,))


def step_allocations(model, dec):
    """Bytes of every allocation one decode step makes, from torch.profiler's CPU memory events."""
    pos, tok = dec.cache.pos, torch.zeros(dec.cache.k.size(1) // model.config.n_streams, 1, dtype=torch.long)
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        dec.decode_step(tok)
    dec.cache.pos = pos
    return sum(e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage > 0)


# -----------------------------------------------------------------------------
# output

def rounded(obj):
    """Floats to 5 significant digits (inf as None), for a JSON line that stays readable and valid."""
    if isinstance(obj, float):
        return float(f"{obj:.5g}") if math.isfinite(obj) else None
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
