"""
How bench.py measures (read it first): the width-matched family, random-weight models built cheaply, one decoder for
both paths, the machine, and each increase timed in pairs with its own P = 1, one model per process (its own memory).
"""

import dataclasses
import math
import os
import sys
import time

import torch

from cli import UserError, resolved
from counts import param_report
from machine import proc_value, resolve_dtype, synchronize, timed
from kernels.fused import FusedDecoder, fused_decoder_for, fused_status
from model import GPT, GPTConfig, KVCache

if sys.platform == "darwin":  # the peak memory of a process there; Windows has no measure of it here
    import resource

# the shapes and the lesson's sizes: N-matched to the paper's 1.6B (docs/bench.md); GPT-2-small (MHA); a toy shape
PRESETS = {
    "paper": dict(n_layer=36, n_embd=2048, n_head=16, n_kv_head=2, vocab_size=151936, n_prefix=48,
                  prompt=64, long_context=1000, budget=200),
    "gpt2": dict(n_layer=12, n_embd=768, n_head=12, n_kv_head=None, vocab_size=50257, n_prefix=48,
                 prompt=64, long_context=1000, budget=30),
    "tiny": dict(n_layer=2, n_embd=96, n_head=12, n_kv_head=2, vocab_size=512, n_prefix=4,
                 prompt=16, long_context=100, budget=5),
}
MIN_PAIRS = 16  # the fewest pairs behind any increase: its bootstrap interval needs them
_COUNTS = {}


def param_counts(cfg):
    """counts.param_report(GPT(cfg)) from a model on the meta device, once per config (width matching asks often)."""
    if repr(cfg) not in _COUNTS:  # a dataclass's repr names every field
        with torch.device("meta"):
            _COUNTS[repr(cfg)] = param_report(GPT(cfg))
    return dict(_COUNTS[repr(cfg)])


def match_width(base_cfg, target_non_embedding):
    """The P=1 model of base_cfg's depth and head_dim whose non-embedding count is closest to the target. Width moves
    in whole heads; with GQA n_kv_head stays and n_head moves in its multiples, so every kv head serves a group."""
    mha = base_cfg.n_kv_head == base_cfg.n_head
    step = 1 if mha else base_cfg.n_kv_head

    def cfg_for(n_head):
        return dataclasses.replace(base_cfg, n_streams=1, n_head=n_head, n_embd=n_head * base_cfg.head_dim,
                                   n_kv_head=n_head if mha else base_cfg.n_kv_head)

    def count(n_head):
        return param_counts(cfg_for(n_head))["non_embedding"]

    n_head = step  # the count grows with n_head: walk up to the target
    while count(n_head + step) <= target_non_embedding:
        n_head += step
    return cfg_for(min((n_head, n_head + step), key=lambda h: abs(count(h) - target_non_embedding)))


def model_family(base_cfg, stream_counts, law_k):
    """The P=1 base, then for each P > 1 the ParScale model and the P=1 model of what P streams are worth by the law
    L = E + (A / (N (k ln P + 1)))^alpha: N_base (1 + k ln P) non-embedding parameters (arXiv 2505.10475, sec. 3)."""
    base = dataclasses.replace(base_cfg, n_streams=1)
    n_base = param_counts(base)["backbone"]
    family = [dict(side="base", P=1, label="P=1", cfg=base, target=n_base)]
    for P in sorted(set(stream_counts) - {1}):
        target = n_base * (1 + law_k * math.log(P))
        family += [dict(side="parscale", P=P, label=f"P={P}", cfg=dataclasses.replace(base_cfg, n_streams=P)),
                   dict(side="width", P=P, label=f"width~P{P}", cfg=match_width(base_cfg, target))]
        family[-1]["target"] = family[-2]["target"] = target
    for m in family:
        m.update({key: param_counts(m["cfg"])[key] for key in ("non_embedding", "total")})
    return family


def build_model(cfg, device, dtype, seed=0):
    """Random weights made directly in `dtype` on `device`, cheaply: one block of N(0, 0.02) draws tiled over each
    matrix (norm weights 1, biases 0), no fp32 copy. Finite normal numbers: torch.empty's garbage can be slow on CPU."""
    with torch.device("meta"):
        model = GPT(cfg)
    model = model.to(dtype).to_empty(device=device)
    model.lm_head.weight = model.transformer.wte.weight  # to_empty unties them; the dropped copy was never touched
    block = (torch.randn(2**20, generator=torch.Generator().manual_seed(seed)) * 0.02).to(device=device, dtype=dtype)
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
    """The decoder a path times, for up to max_len tokens; UserError with the reason if the fused path refuses."""
    if path != "fused":
        return EagerDecoder(model, batch_size, max_len)
    dec, why = fused_decoder_for(model, batch_size, dtype, max_len)
    if dec is None:
        raise UserError(why)
    return dec


def runner(dec, prompt, context, device):
    """A function for one run on dec, done when it returns: the prompt's prefill (context None), or one greedy decode
    step at position `context`, rewound every time so that every step reads the same cache."""
    def run():
        if context is not None:
            dec.cache.pos = context
            if isinstance(dec, FusedDecoder):
                dec.pos.fill_(context)  # the fused decoder keeps the position on the device too
        (dec.prefill(prompt) if context is None else dec.decode_step(prompt[:, -1:])).argmax(dim=-1)
        synchronize(device)
    return run


def read_bandwidth(device):
    """Bytes/s: the best of 5 sums over 2 GiB, more than any last cache level here (CUDA: 4x its L2 if larger)."""
    nbytes = max(2**31, 4 * torch.cuda.get_device_properties(device).L2_cache_size if device.type == "cuda" else 0)
    buf = torch.ones(nbytes // 4, device=device)
    return nbytes / min(timed(lambda: (buf.sum(), synchronize(device)), min_s=0))


def peak_memory(device):
    """The CUDA allocator's peak, else this process's peak resident memory (Linux's VmHWM, macOS's ru_maxrss)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    kib = proc_value("/proc/self/status", "VmHWM")
    if kib is None and sys.platform == "darwin":
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # bytes there
    return None if kib is None else int(kib.split()[0]) * 1024


def decode_paths(requested, device):
    """(paths, why the fused one is or is not here): auto = fused (when it works here) then eager; fused or refused."""
    ok, why = fused_status(device)
    if requested == "fused" and not ok:
        raise UserError(f"--paths=fused, but the fused path is unavailable: {why}; use --paths=auto or --paths=eager")
    return (["fused", "eager"] if requested == "auto" and ok else ["eager"] if requested != "fused" else ["fused"]), why


def with_threads_and_dtype(args, run):
    """run(args) with --threads set (-1 = all cores) and --dtype resolved (a CPU's auto: machine.choose_cpu_dtype's
    probe); the thread count restored after, as the tests call main()."""
    threads = torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(args.threads if args.threads > 0 else cores)
    try:
        dtype, why = resolve_dtype(args.dtype, args.device, cpu_auto="probe")
        return run(resolved(args, dtype=dtype, dtype_why=why))
    finally:
        torch.set_num_threads(threads)


def kv_bytes(cfg, batch_size, context, itemsize):
    """Keys and values of `context` cached tokens in every layer and row: what a KV cache must hold."""
    return 2 * cfg.n_layer * cfg.n_streams * batch_size * cfg.n_kv_head * context * cfg.head_dim * itemsize


def paired(base, model, seconds, min_pairs=MIN_PAIRS, clock=time.perf_counter):
    """(base, model) seconds of runs of each in turn, the order swapped every pair, for min_pairs pairs and `seconds`.
    The machine's speed drifts by more than a small increase, but hardly within one pair: a pair's ratio cancels it."""
    times, start = ([], []), clock()
    while len(times[0]) < min_pairs or clock() - start < seconds:
        for i in ((0, 1) if len(times[0]) % 2 == 0 else (1, 0)):  # who goes first: alike for both, over the pairs
            t0 = clock()
            (base, model)[i]()
            times[i].append(clock() - t0)
    return times


def increase(base, model, resamples=2000, seed=0):
    """The median of the per-pair increases model / base - 1, and its 95% bootstrap interval: (median, lo, hi)."""
    d = torch.tensor(model, dtype=torch.float64) / torch.tensor(base, dtype=torch.float64) - 1
    idx = torch.randint(len(d), (resamples, len(d)), generator=torch.Generator().manual_seed(seed))
    lo, hi = d[idx].quantile(0.5, dim=1).quantile(torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return d.quantile(0.5).item(), lo, hi


def filled_runner(dec, tokens, context, device, noise):
    """runner() for a decoder whose cache is filled directly with `noise` as keys and values (a 1,000-token prefill
    takes minutes at P = 8 on a CPU), warmed up by one step (kernel choice, graph capture)."""
    tile_(dec.cache.k, noise)
    tile_(dec.cache.v, noise)
    run = runner(dec, tokens, context, device)
    run()
    return run


@torch.no_grad()
def measure_model(spec):
    """One model in a process of its own (spec: plain values): caches filled directly to the prompt's length and to
    long_context, each warmed by a step and the peak memory read after; then each phase timed in pairs with its P=1."""
    torch.set_num_threads(spec["threads"])
    device, dtype, B, T = torch.device(spec["device"]), getattr(torch, spec["dtype"]), spec["batch"], spec["prompt"]
    runtime = peak_memory(device)
    model = build_model(GPTConfig(**spec["config"]), device, dtype)
    prompt = torch.randint(model.config.vocab_size, (B, T), generator=torch.Generator().manual_seed(0)).to(device)
    noise, out = torch.randn(2**20, generator=torch.Generator().manual_seed(0)).to(device, dtype), {"peak": []}

    def timers(m, peaks):
        runs = {}
        for phase, context in (("decode", T), ("long", spec["long_context"])):
            dec = make_decoder(spec["path"], m, B, dtype, context + 1)
            runs[phase] = filled_runner(dec, prompt, context, device, noise)
            if context == T:  # the prefill writes this cache from position 0
                runs["prefill"] = runner(dec, prompt, None, device)
            if peaks:  # at the prompt's length, then at long_context
                out["peak"].append(None if runtime is None else peak_memory(device) - runtime)
        return runs

    ours = timers(model, peaks=True)
    if spec["phases"]:
        theirs = timers(build_model(GPTConfig(**spec["base"]), device, dtype), peaks=False)
        for phase, seconds in spec["phases"].items():
            if phase == "prefill":  # its warm-up (the steps had theirs in timers)
                theirs[phase](), ours[phase]()
            out[phase] = paired(theirs[phase], ours[phase], seconds)
    return out
