"""
What the entry points share that is not the model: the mistake a user can fix (UserError) and the one
place where a model config from the user is checked (model_config); one resolver each for the device,
the dtype and a data folder's meta.json; and what model.py leaves to its users: parameter counts by
role, training FLOPs and MFU, and sampling a next token. train.py, sample.py, bench.py, prepare_data.py
and the experiments all use these, so a flag means the same thing everywhere and a mistake reads the
same everywhere.
"""

import argparse
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F

from model import GPTConfig


class UserError(ValueError):
    """A mistake the user can fix: a bad flag or config value, a missing or wrong file, a full disk.
    Every entry point prints it as one `error: ...` line and exits 1; any other exception is a bug and
    keeps its traceback, a plain ValueError included."""


def check(ok, message):
    """Refuse what the user can fix: raise UserError(message) unless ok."""
    if not ok:
        raise UserError(message)


class RenamedFlag(argparse.Action):
    """A flag's old name, kept only to refuse it with one `error:` line that names the new one:
    parser.add_argument("--old", action=RenamedFlag, new="--new", why="what the new name says")."""

    def __init__(self, option_strings, dest, new, why="", **kwargs):
        kwargs.update(default=argparse.SUPPRESS, help=argparse.SUPPRESS)  # never in args, never in --help
        super().__init__(option_strings, dest, **kwargs)
        self.new, self.why = new, why

    def __call__(self, parser, namespace, values, option_string=None):
        raise UserError(f"{option_string} is now {self.new}" + (f" ({self.why})" if self.why else ""))


def model_config(source, **fields):
    """
    GPTConfig(**fields) for values that come from the user, flags or a file; source says which
    ("the model flags", "checkpoint out/ckpt.pt"). model.py knows nothing of UserError: its config
    checks raise ValueError naming the field. Here, and only here, that ValueError becomes the
    user's mistake: a UserError that names the source too. Values checked here once (at parse time,
    at load time) are then built into a GPTConfig directly; a ValueError anywhere else is a bug.
    """
    try:
        return GPTConfig(**fields)
    except ValueError as e:
        raise UserError(f"{source}: {e}") from None


# -----------------------------------------------------------------------------
# device

def resolve_device(name, allowed=("cpu", "cuda", "mps"), who="this script"):
    """--device as a device string ("cpu", "cuda", "cuda:1", "mps"), checked against this machine.
    auto = the first of cuda, mps, cpu that is here (and allowed)."""
    if name == "auto":
        if "cuda" in allowed and torch.cuda.is_available():
            return "cuda"
        return "mps" if "mps" in allowed and torch.backends.mps.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device={name} is not a device: use auto, {', '.join(allowed)} "
                        "(cuda:N for one GPU of several)") from None
    if dev.type not in allowed:
        raise UserError(f"--device={name}: {who} runs on {', '.join(allowed)}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device={name}, but this torch ({torch.__version__}) sees no CUDA GPU "
                        "(torch.cuda.is_available() is False): use --device=cpu, or install a CUDA build of "
                        "torch")
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise UserError(f"--device={name}, but this machine has {torch.cuda.device_count()} GPU(s), "
                        "cuda:0 and up")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device={name}, but MPS is not available (it needs Apple silicon and macOS): "
                        "use --device=cpu")
    return str(dev)


# -----------------------------------------------------------------------------
# dtype

def linear_ms(dtype, rows=8, width=2048, reps=15):
    """Median ms of an (rows x width) @ (width x width) Linear on the CPU: the shape of a decode step's
    cost."""
    x, w = torch.randn(rows, width, dtype=dtype), torch.randn(width, width, dtype=dtype) * 0.02
    times = []
    for _ in range(reps + 3):
        t0 = time.perf_counter()
        F.linear(x, w)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[3:]) * 1e3


def choose_cpu_dtype(probe=linear_ms):
    """
    (dtype, why) for decoding on this CPU: bfloat16 where torch's bf16 matmul is at least as fast as fp32
    here (it reads half the bytes, and with bf16 instructions 1 to 8 rows cost about the same), else
    float32. In fp32, 8 rows can cost several times one row, which makes P streams look expensive for a
    reason that is not ParScale's. A measurement of a few milliseconds, made at start-up.
    """
    bf16, fp32 = probe(torch.bfloat16), probe(torch.float32)
    dtype = torch.bfloat16 if bf16 <= fp32 else torch.float32
    return dtype, (f"{'bf16' if dtype == torch.bfloat16 else 'fp32'}, measured: an 8-row 2048x2048 Linear "
                   f"takes {bf16:.2f} ms in bf16, {fp32:.2f} ms in fp32 here")


def resolve_dtype(name, device, cpu_auto="float32"):
    """
    --dtype as (torch dtype, why). auto is bfloat16 on a GPU that supports it, else float32 there; on a
    CPU (and MPS) it is cpu_auto: "float32", or "probe" for choose_cpu_dtype's measurement. Each entry
    point says which rule it uses and why, where it calls this.
    """
    device_type = torch.device(device).type
    if name == "auto":
        if device_type == "cuda":
            chosen = "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
            return getattr(torch, chosen), f"{chosen} (auto on this GPU)"
        if device_type == "cpu" and cpu_auto == "probe":
            return choose_cpu_dtype()
        return torch.float32, f"float32 (auto on {device_type})"
    if name == "float16" and device_type != "cuda":
        raise UserError(f"--dtype=float16 is for GPUs: on {device_type} torch runs it far slower than "
                        "float32 and with float16's narrow range; use --dtype=float32 or bfloat16")
    if name == "bfloat16" and device_type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError(f"--dtype=bfloat16, but {torch.cuda.get_device_name(device)} has no bfloat16: "
                        "use --dtype=float16 or float32")
    return getattr(torch, name), f"{name} (--dtype)"


# dense bf16 peak FLOP/s from the vendors' datasheets, for MFU; matched against the device name
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def peak_flops(device_name):
    """The datasheet bf16 peak of a GPU named like 'NVIDIA H200', or None when it is not in PEAK_FLOPS."""
    return next((v for k, v in PEAK_FLOPS.items() if k in device_name), None)


# -----------------------------------------------------------------------------
# data folders

def load_meta(data_dir, files=("meta.json", "train.bin", "val.bin")):
    """meta.json of a folder prepare_data.py wrote, after checking that it holds `files` (sample.py
    needs only meta.json); refuses a missing folder or file and a meta.json without its two fields."""
    todo = ("run python prepare_data.py first (it writes train.bin, val.bin and meta.json), "
            "or point --data_dir at its output")
    if not os.path.isdir(data_dir):
        raise UserError(f"--data_dir={data_dir} does not exist: {todo}")
    for name in files:
        if not os.path.isfile(os.path.join(data_dir, name)):
            raise UserError(f"--data_dir={data_dir} has no {name}: {todo}")
    path = os.path.join(data_dir, "meta.json")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"--data_dir={data_dir}: {path} is not readable JSON ({e}): {todo}") from None
    if not (isinstance(meta, dict) and isinstance(meta.get("tokenizer"), str)
            and isinstance(meta.get("vocab_size"), int) and meta["vocab_size"] > 0):
        raise UserError(f"--data_dir={data_dir}: {path} lacks a 'tokenizer' or a positive integer "
                        f"'vocab_size': {todo}")
    return meta


# -----------------------------------------------------------------------------
# what model.py leaves to its users: parameter counts, FLOPs and MFU, the next token

def param_report(model):
    """Parameter counts of a model.GPT by role. non_embedding is the N of the scaling law (arXiv
    2505.10475, section 3), ParScale's prefixes and aggregator included; the tied lm_head / wte
    count once, as embedding."""
    r = dict(embedding=0, backbone=0, prefixes=0, aggregator=0)
    for name, p in model.named_parameters():
        role = ("embedding" if name.startswith(("transformer.wte", "transformer.wpe")) else
                "prefixes" if ".prefix_" in name else
                "aggregator" if name.startswith("aggregator.") else "backbone")
        r[role] += p.numel()
    r["non_embedding"] = r["backbone"] + r["prefixes"] + r["aggregator"]
    r["total"] = r["non_embedding"] + r["embedding"]
    return r


def flops_per_token(model, seq_len):
    """Training FLOPs per token (forward + backward) of a model.GPT: the backbone runs P times, the LM
    head once (PaLM, arXiv 2204.02311, appendix B: 6N + attention, counted per stream)."""
    cfg, r = model.config, param_report(model)
    P, L, H, Q = cfg.n_streams, cfg.n_layer, cfg.n_head, cfg.head_dim
    body = 6 * (r["backbone"] + r["prefixes"]) * P
    attn = 12 * L * H * Q * (seq_len + cfg.n_prefix_slots) * P  # each query against prefix + context
    head = 6 * (cfg.vocab_size * cfg.n_embd + r["aggregator"])
    return body + attn + head


def estimate_mfu(model, tokens_per_second, seq_len, peak):
    """Model FLOPs utilisation: achieved training FLOP/s over `peak` FLOP/s (None if peak unknown)."""
    return flops_per_token(model, seq_len) * tokens_per_second / peak if peak else None

