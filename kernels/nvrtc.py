"""
Build CUDA source without a CUDA toolkit: NVRTC and the driver's module loader, both through ctypes.

    from kernels import nvrtc
    out = nvrtc.compile_program(source, "sm_90")   # NVRTC, no GPU needed: out.cubin (bytes), out.log, out.nvrtc
    funcs = nvrtc.load_module(out.cubin, names)    # GPU only: {name: CUfunction} in the current CUDA context

Two halves, kept apart because only the first runs on a CPU:
  compile   libnvrtc turns the source into a cubin for one architecture. It is looked for, in order,
            (1) under every sys.path entry as nvidia/*/lib/libnvrtc.so.N: what a CUDA build of torch from
                pip installs (CUDA 13: nvidia/cu13/lib, CUDA 12: nvidia/cuda_nvrtc/lib), or the
                nvidia-cuda-nvrtc wheel alone;
            (2) under $CUDA_HOME or $CUDA_PATH (lib64/, lib/), a full toolkit;
            (3) on the dynamic loader's path (LD_LIBRARY_PATH, ldconfig).
            Within each place the library of torch's CUDA major version comes first, then the newest:
            the driver that runs torch's kernels then also loads ours. libnvrtc opens its builtins
            library (libnvrtc-builtins.so.X.Y) by name at compile time, which fails when that
            directory is not on the loader path, so the copy beside the chosen libnvrtc is loaded first.
  load      libcuda.so.1 (the NVIDIA driver) loads the cubin (cuModuleLoadData) and finds each kernel
            (cuModuleGetFunction); fused.py launches them through the same libcuda.
Every failure raises BuildError with a one-line message (fused.py turns it into its reason string);
the full NVRTC log stays on the exception. Importing this module loads nothing.
"""

import ctypes
import dataclasses
import functools
import glob
import os
import re
import sys
import time


class BuildError(RuntimeError):
    """A kernel build that failed: no libnvrtc or libcuda, a compile error, a load error. .log: NVRTC's log."""

    def __init__(self, msg, log=""):
        super().__init__(msg)
        self.log = log


def _soname_major(path):
    m = re.search(r"libnvrtc\.so\.(\d+)", os.path.basename(path))
    return int(m.group(1)) if m else -1


def find_nvrtc(paths=None, cuda_homes=None, cuda_major=None):
    """Every libnvrtc candidate in search order (see the module docstring): file paths, then bare names.
    paths: where to look for nvidia/*/lib (default sys.path); cuda_homes: toolkit roots (default
    $CUDA_HOME, $CUDA_PATH); cuda_major: torch's CUDA major version (None for a CPU torch)."""
    paths = sys.path if paths is None else paths
    if cuda_homes is None:
        cuda_homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]

    def first_choice(found):  # torch's major version first, then the newest
        return sorted(found, key=lambda p: (_soname_major(p) != cuda_major, -_soname_major(p), p))

    wheels, toolkit = [], []
    for root in dict.fromkeys(os.path.abspath(p) for p in paths if p):
        wheels += first_choice(glob.glob(os.path.join(root, "nvidia", "*", "lib", "libnvrtc.so.*")))
    for home in dict.fromkeys(h for h in cuda_homes if h):
        for lib in ("lib64", "lib"):
            toolkit += first_choice(glob.glob(os.path.join(home, lib, "libnvrtc.so.*")))
    names = first_choice(["libnvrtc.so.13", "libnvrtc.so.12"]) + ["libnvrtc.so"]
    seen, out = set(), []
    for c in wheels + toolkit + names:  # lib64 -> lib is a common symlink: keep each file once
        real = os.path.realpath(c) if os.path.isabs(c) else c
        if real not in seen:
            seen.add(real)
            out.append(c)
    return out


@dataclasses.dataclass(frozen=True)
class Nvrtc:
    lib: ctypes.CDLL
    path: str  # a file path, or a bare soname when the loader found it
    version: tuple  # (major, minor)

    def __str__(self):
        return f"NVRTC {self.version[0]}.{self.version[1]} ({self.path})"


def open_nvrtc(candidates):
    """The first candidate that loads, with its builtins library loaded first. BuildError if none does."""
    broken = []  # files that exist but do not load: worth naming in the reason (a bare name that fails is just absent)
    for path in candidates:
        try:
            lib = ctypes.CDLL(path)
            major, minor = ctypes.c_int(), ctypes.c_int()
            if lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)) != 0:
                raise OSError("nvrtcVersion failed")
        except (OSError, AttributeError) as e:
            if os.path.isabs(path):
                broken.append(f"{path} does not load: {e}")
            continue
        if os.path.isabs(path):  # see the module docstring: the builtins are opened by name
            builtins = os.path.join(os.path.dirname(path), f"libnvrtc-builtins.so.{major.value}.{minor.value}")
            if os.path.exists(builtins):
                ctypes.CDLL(builtins, mode=ctypes.RTLD_GLOBAL)
        lib.nvrtcGetErrorString.restype = ctypes.c_char_p
        return Nvrtc(lib, path, (major.value, minor.value))
    found = broken[0] if broken else "none found"
    raise BuildError(f"no usable libnvrtc in sys.path's nvidia/*/lib, $CUDA_HOME, $CUDA_PATH or the loader path "
                     f"({found}); a CUDA build of torch from pip brings one, or: pip install nvidia-cuda-nvrtc")


@functools.lru_cache(maxsize=None)
def default_nvrtc(cuda_major=None):
    """open_nvrtc(find_nvrtc(...)) once per process (a failure is not cached: the next call looks again)."""
    return open_nvrtc(find_nvrtc(cuda_major=cuda_major))


@dataclasses.dataclass(frozen=True)
class Compiled:
    cubin: bytes
    log: str  # NVRTC's log: empty unless it warned, or ptxas -v was asked for
    arch: str
    nvrtc: Nvrtc  # which library compiled it: str() says it in words, .path is the file
    seconds: float


def _log(lib, prog):
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    buf = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, buf)
    return buf.value.decode(errors="replace").strip()


def compile_program(source, arch, options=(), name="kernels.cu", nvrtc=None):
    """NVRTC: CUDA C++ source (str) -> Compiled, a cubin for `arch` (e.g. "sm_90"). Needs no GPU.
    options: extra NVRTC options, e.g. ("--ptxas-options=-v",). Raises BuildError with the log."""
    nv = nvrtc or default_nvrtc()
    lib, t0 = nv.lib, time.perf_counter()

    def check(rc, what, log=""):
        if rc != 0:
            raise BuildError(f"{nv} {what} failed for {arch}: {lib.nvrtcGetErrorString(rc).decode()}", log)

    prog = ctypes.c_void_p()
    rc = lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), name.encode(), 0, None, None)  # no headers
    check(rc, "nvrtcCreateProgram")
    try:
        opts = [f"--gpu-architecture={arch}".encode()] + [o.encode() for o in options]
        rc = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
        log = _log(lib, prog)
        if rc != 0:  # the reason must be one line: the first error lines, the whole log on the exception
            errors = [ln.strip() for ln in log.splitlines() if "error:" in ln] or [lib.nvrtcGetErrorString(rc).decode()]
            raise BuildError(f"{nv} could not compile {name} for {arch}: " + " | ".join(errors[:3]), log)
        size = ctypes.c_size_t()
        check(lib.nvrtcGetCUBINSize(prog, ctypes.byref(size)), "nvrtcGetCUBINSize", log)
        cubin = ctypes.create_string_buffer(size.value)
        check(lib.nvrtcGetCUBIN(prog, cubin), "nvrtcGetCUBIN", log)
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))
    return Compiled(cubin.raw, log, arch, nv, time.perf_counter() - t0)


def ptxas_usage(log):
    """{kernel: {"registers", "spill_stores", "spill_loads", "stack"}} from a log compiled with --ptxas-options=-v."""
    out, cur = {}, None
    frame = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
    for line in log.splitlines():
        if m := re.search(r"Compiling entry function '(\w+)'", line):
            cur = out.setdefault(m.group(1), {})
        elif cur is not None and (m := frame.search(line)):
            cur.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        elif cur is not None and (m := re.search(r"Used (\d+) registers", line)):
            cur["registers"] = int(m.group(1))
    return out


@functools.lru_cache(maxsize=None)
def libcuda():
    """The NVIDIA driver's libcuda.so.1 (loaded once; it is the same library torch runs on)."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError as e:
        raise BuildError(f"libcuda.so.1 (the NVIDIA driver) could not be loaded: {e}") from None
    lib.cuGetErrorName.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
    return lib


def cuda_error(rc):
    """'CUDA_ERROR_INVALID_CONTEXT (201)' for a CUresult."""
    name = ctypes.c_char_p()
    libcuda().cuGetErrorName(rc, ctypes.byref(name))
    return f"{(name.value or b'unknown CUresult').decode()} ({rc})"


def load_module(cubin, names):
    """Load a cubin into the current CUDA context (GPU only) -> {name: CUfunction}. Raises BuildError."""
    cu, module = libcuda(), ctypes.c_void_p()
    rc = cu.cuModuleLoadData(ctypes.byref(module), cubin)  # copies the image; the bytes need not outlive it
    if rc != 0:
        raise BuildError(f"cuModuleLoadData failed: {cuda_error(rc)}")
    funcs = {}
    for name in names:
        func = ctypes.c_void_p()
        rc = cu.cuModuleGetFunction(ctypes.byref(func), module, name.encode())
        if rc != 0:
            raise BuildError(f"kernel {name} not found in the cubin: {cuda_error(rc)}")
        funcs[name] = func
    return funcs
