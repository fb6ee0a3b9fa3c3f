"""
The machine a run is on: the device and the dtype that --device and --dtype resolve to (one rule each, which
every entry point says where it calls it), timing on that device, what /proc says of it, and the GPUs'
datasheet peaks for MFU.
"""

import statistics
import time

import torch

from cli import UserError


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


def synchronize(device):
    """Wait for the device's queued work (a GPU's); a CPU's is done when the call returns."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, reps=5, min_s=0.05, clock=time.perf_counter):
    """Seconds of each call of fn() (done when it returns) after a warm-up call: at least `reps` and min_s seconds."""
    times, start = [], clock()
    while len(times) <= reps or clock() - start < min_s:
        t0 = clock()
        fn()
        times.append(clock() - t0)
    return times[1:]


def linear_seconds(weight, rows, reps=15):
    """Median seconds of x @ weight.T for `rows` rows of x on weight's device and in its dtype: one Linear,
    the shape of a decode step's cost."""
    x = torch.randn(rows, weight.size(1), device=weight.device, dtype=weight.dtype)
    return statistics.median(timed(lambda: (x @ weight.T, synchronize(weight.device)), reps=reps))


def cpu_linear_ms(dtype, rows=8, width=2048):
    """choose_cpu_dtype's probe: ms of an (rows x width) @ (width x width) Linear on the CPU in `dtype`."""
    return 1e3 * linear_seconds(torch.randn(width, width, dtype=dtype) * 0.02, rows)


def choose_cpu_dtype(probe=cpu_linear_ms):
    """
    (dtype, why) for decoding on this CPU: bfloat16 where torch's bf16 matmul is at least as fast as fp32
    here (it reads half the bytes, and with bf16 instructions 1 to 8 rows cost about the same), else
    float32. In fp32, 8 rows can cost several times one row, which makes P streams look expensive for a
    reason that is not ParScale's. A measurement of a few milliseconds, made at start-up.
    """
    bf16, fp32 = probe(torch.bfloat16), probe(torch.float32)
    dtype = torch.bfloat16 if bf16 <= fp32 else torch.float32
    return dtype, (f"{'bf16' if dtype == torch.bfloat16 else 'fp32'}, measured: an 8-row 2048x2048 Linear: "
                   f"{bf16:.2f} ms in bf16, {fp32:.2f} ms in fp32")


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


def proc_value(path, key):
    """The value after `key:` in a /proc file (e.g. /proc/meminfo's MemAvailable), or None (not Linux)."""
    try:
        with open(path) as f:
            return next(v.strip() for k, v in (line.split(":", 1) for line in f if ":" in line) if k.strip() == key)
    except (OSError, StopIteration):
        return None


# dense bf16 peak FLOP/s from the vendors' datasheets, for MFU; matched against the device name
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def peak_flops(device_name):
    """The datasheet bf16 peak of a GPU named like 'NVIDIA H200', or None when it is not in PEAK_FLOPS."""
    return next((v for k, v in PEAK_FLOPS.items() if k in device_name), None)
