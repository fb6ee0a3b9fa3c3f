"""
The real kernels of kernels/*.cu on a CPU, for the tests: fused.kernel_source (the very text NVRTC compiles)
compiled by g++ against tests/cuda_cpu.h, which gives CUDA's built-ins a meaning on a CPU (threads as fibers,
blocks one after another; see the header). CpuKernels is a backend for kernels/fused.py: the same marshalling
from the .cu signatures, the same void** params, one launcher per kernel that unpacks them by the kernel's own
C signature. Only tests use it (backend=...); sample.py and bench.py never do, and fused_status('cpu') is off.

    backend = CpuKernels()          # or CpuKernels(sanitize="address"), CpuKernels(block_order_seed=1)
    dec = FusedDecoder(model, B, dtype=torch.float32, backend=backend)
    kernels = fused.build(torch.float32, 64, "cpu", backend)    # one kernel at a time: kernels.gemv_add(...)

Builds are cached by content (source, header, flags, the g++ version) under $PARSCALE_KERNEL_CACHE or
~/.cache/parscale/cpu_kernels: written to a temporary name, then renamed. A sanitized library only loads into
a Python that was started with the sanitizer's runtime preloaded (sanitized_env): the tests do that in a
subprocess.
"""
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile


HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from kernels import fused  # noqa: E402

HEADER = os.path.join(HERE, "cuda_cpu.h")
CXX = os.environ.get("CXX", "g++")
FLAGS = ["-std=c++20", "-shared", "-fPIC", "-fno-strict-aliasing", "-U_FORTIFY_SOURCE"]
SANITIZERS = {  # name -> (compile flags, the runtime library to preload)
    "": (["-O2"], None),
    "address": (["-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined", "-fno-sanitize-recover=all"],
                "libasan.so"),
    "thread": (["-O1", "-g", "-fsanitize=thread"], "libtsan.so"),
}


def missing():
    """'' when the kernels can be built and run on this CPU, else what is missing."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return f"tests/cuda_cpu.h switches fibers with x86-64 instructions; this machine is {platform.machine()}"
    return "" if shutil.which(CXX) else f"no C++ compiler ({CXX}) on PATH"


def runtime(sanitize):
    """Path of the sanitizer's runtime library that g++ links against, or None if this g++ has none."""
    name = SANITIZERS[sanitize][1]
    if not name or missing():
        return None
    path = subprocess.run([CXX, f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
    return path if os.path.isabs(path) and os.path.exists(path) else None


def sanitized_env(sanitize, env=None):
    """The environment a Python needs to load a library built with `sanitize`: its runtime preloaded."""
    env = dict(os.environ if env is None else env)
    env["LD_PRELOAD"] = runtime(sanitize)
    if sanitize == "address":  # torch and Python leak by design at exit; errors abort (halt_on_error)
        env["ASAN_OPTIONS"] = "detect_leaks=0:halt_on_error=1:abort_on_error=0"
        env["UBSAN_OPTIONS"] = "halt_on_error=1:print_stacktrace=1"
    else:
        env["TSAN_OPTIONS"] = "halt_on_error=1:exitcode=66:report_signal_unsafe=0"
        env["OMP_NUM_THREADS"] = "1"  # torch's worker threads are not instrumented: keep the host on one thread
    return env


@functools.lru_cache(maxsize=None)
def _compiler_version():
    return subprocess.run([CXX, "--version"], capture_output=True, text=True).stdout.splitlines()[0]


def cache_dir():
    return os.environ.get("PARSCALE_KERNEL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "parscale",
                                                                   "cpu_kernels")


def build_library(source, sanitize=""):
    """source (CUDA C for cuda_cpu.h) -> path of the shared library, built once per content."""
    flags = FLAGS + SANITIZERS[sanitize][0]
    header = open(HEADER).read()
    key = hashlib.sha256("\0".join([source, header, " ".join(flags), _compiler_version()]).encode()).hexdigest()[:24]
    path = os.path.join(cache_dir(), f"kernels-{sanitize or 'plain'}-{key}.so")
    if os.path.exists(path):
        return path
    os.makedirs(cache_dir(), exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        src, out = os.path.join(tmp, "kernels.cpp"), os.path.join(tmp, "kernels.so")
        with open(src, "w") as fh:
            fh.write(source)
        r = subprocess.run([CXX, *flags, "-I", HERE, src, "-o", out], capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"g++ could not build the kernels for the CPU:\n{r.stderr[-4000:]}")
        tmp_path = f"{path}.{os.getpid()}.tmp"
        shutil.copyfile(out, tmp_path)
        os.replace(tmp_path, path)  # atomic: a concurrent build of the same content writes the same bytes
    return path


def cpu_source(source, kernels):
    """CUDA source -> the same text for g++: the header first, one launcher per kernel last."""
    return ('#include "cuda_cpu.h"\n' + source + "\n" + "".join(f"CUDA_CPU_LAUNCHER({k})\n" for k in kernels))


class CpuKernels:
    """A kernels/fused.py backend that runs kernels/*.cu on the CPU (see the module docstring). There is no
    CUDA graph and no stream here: every launch has finished when it returns."""
    device_type, graphs = "cpu", False

    def __init__(self, sanitize="", block_order_seed=0):
        self.sanitize, self.block_order_seed = sanitize, block_order_seed
        self.key = f"cpu-{sanitize or 'plain'}-{block_order_seed}"

    def status(self, device):
        if device.type != "cpu":
            return False, f"the CPU backend runs on the CPU, not on '{device}'"
        return (False, missing()) if missing() else (True, "")

    def load(self, dtype, head_dim, device):
        """({kernel: launch(grid, block, smem, params)}, what was built) for kernel_source(dtype, head_dim)."""
        source = fused.kernel_source(dtype, head_dim)
        names = fused.parse_signatures(source)
        lib = ctypes.CDLL(build_library(cpu_source(source, names), self.sanitize))
        return launchers(lib, names, self.block_order_seed), (
            f"kernels/*.cu with {_compiler_version()} for the CPU ({self.sanitize or 'no'} sanitizer), "
            f"{str(dtype).removeprefix('torch.')}, head_dim {head_dim}")


def launchers(lib, names, block_order_seed=0):
    """{kernel: launch(grid, block, smem, params)} over a library built from cpu_source."""
    lib.cuda_cpu_block_order.argtypes = [ctypes.c_ulong]

    def launcher(name):
        fn = getattr(lib, f"cuda_cpu_launch_{name}")
        fn.restype = ctypes.c_char_p
        fn.argtypes = [ctypes.POINTER(ctypes.c_uint), ctypes.POINTER(ctypes.c_uint), ctypes.c_uint, ctypes.c_void_p]

        def launch(grid, block, smem, params):
            lib.cuda_cpu_block_order(block_order_seed)
            err = fn((ctypes.c_uint * 3)(*grid), (ctypes.c_uint * 3)(*block), smem, params)
            if err:
                raise RuntimeError(f"{name}, grid {tuple(grid)}, block {tuple(block)}: {err.decode()}")
        return launch

    return {name: launcher(name) for name in names}

