"""
The fused GPU decode path for ParScale: hand-written CUDA kernels (kernels/*.cu) for the single-token
decode step, built at first use with NVRTC through ctypes, and CUDA-graph replay of the whole step.
Everything else runs through model.py itself, so there is one model, not two:

    from kernels.fused import fused_decoder_for
    dec, why = fused_decoder_for(model, batch_size, dtype, max_len)   # never raises; dec None if refused
    logits = dec.prefill(idx)                       # (B, T) -> last-position logits (B, vocab) float32
    logits = dec.decode_step(tok)                   # (B, 1) -> (B, vocab) float32
    out = dec.generate(idx, max_new_tokens, temperature=1.0, top_k=None)

What runs where:
  prefill           model.py's own forward (model(idx, cache=...)) fills a model.KVCache
  decode step       the kernels below, reading the same KVCache (real tokens only) and each layer's
                    (P, n_kv_head, n_prefix, hd) prefix parameter in place: a prefix exists once a stream
  aggregation       the model's own Aggregator module, called on the kernels' final hidden states
Before a decoder is made, two checks decide whether the kernels can stand in for model.py:
  known_structure   every parameter has the name and shape the kernels assume, every module is of a
                    type they know with the options they assume, no forward is replaced or hooked on
                    an instance;
  self_check        a small fp32 instance of the same classes and config (at most 2 layers, weights
                    from a local torch.Generator, so the caller's seeded sampling does not move) decodes
                    a random prompt of up to 40 tokens plus 3 steps on both paths, eagerly; the logits
                    must agree to 2e-4. The result is cached per config and per version of the classes'
                    code.
A refusal is a reason string ("fused decode disagrees with model.py by 1.3 at step 2"); sample.py and
bench.py print it and decode on the reference path.

Build (kernels/nvrtc.py): no CUDA toolkit and no private PyTorch API. One program per (dtype, head_dim),
a #define preamble plus common.cuh and every .cu file concatenated (NVRTC gets no #include of our own files
and no CUDA headers, so bf16 is handled as raw bits, see common.cuh), is compiled by NVRTC through ctypes
into a cubin for the device's compute capability, once per (dtype, head_dim, architecture), and loaded
into each device with the driver's cuModuleLoadData. libnvrtc comes from the nvidia wheels that a CUDA
build of torch from pip installs, else from $CUDA_HOME, else from the loader path; the build line says
which. Any failure (no libnvrtc, no libcuda, a compile error) is the reason string the path reports.

Launch: every argument is checked and converted to its exact C type from the kernel's own signature in
the .cu source (signatures(); torch's own launcher would turn a Python float into a C double), then handed,
as cuLaunchKernel's void** params, to a backend:
  CudaDriver        the GPU: cuLaunchKernel through ctypes on torch's current stream, so a CUDA graph
                    capture records the launches. The only backend sample.py and bench.py ever use.
  (tests)           tests/kernels_cpu.py compiles the same source with g++ and runs it on the CPU, one
                    launcher per kernel taking the same params; the tests pass it as backend=. It has no
                    CUDA graph and no stream: there each launch runs to completion before it returns.

One decode step (R = P*B rows, one token each; rows stream-major, r = s*B + b):
  embed                      x = wte[tok] + wpe[pos] -> fp32 residual (R, C); pos read from device memory
  per layer, R <= RMAX (8):  5 launches
    gemv_ln_store            qkv = LN1(x) @ Wqkv^T + b      (LayerNorm recomputed per block, in smem)
    attn_decode              append k/v at slot pos; attention over [stream prefix | cache | new];
                             flash-decoding splits, merged in-kernel by the last block (no combine launch)
    gemv_add                 x += y @ Wo^T + b
    gemv_ln_gelu             f = GELU(LN2(x) @ Wfc^T + b)
    gemv_add                 x += f @ Wp^T + b
  per layer, R > RMAX:       layernorm kernel + cuBLAS (torch addmm/F.linear) + F.gelu + attn_decode
  tail                       layernorm (ln_f); P > 1: model.aggregator (torch ops); LM head: gemv_f32
                             (B <= RMAX, fp32 logits directly) or cuBLAS + .float(); pos += 1
Residual stream and all reductions are fp32; weights, activations between kernels and the cache use
the decoder's dtype (bf16 or fp32). docs/fused.md has the measured times and what is verified where.
"""

import copy
import ctypes
import dataclasses
import functools
import math
import os
import re
import time

import torch
import torch.nn.functional as F

from kernels import nvrtc
from cli import UserError
from model import GPT, MLP, Block, CausalSelfAttention, KVCache

KERNEL_DIR = os.path.dirname(os.path.abspath(__file__))
SOURCES = ["common.cuh", "norm.cu", "gemv.cu", "attention.cu"]  # concatenated in this order
RMAX = 8  # most rows the GEMV kernels take (accumulators in registers); cuBLAS above
GEMV_SMEM_LIMIT = 48 * 1024  # the LayerNorm prologue stages R * C floats; more needs an opt-in we avoid
CHECK_TOL = 2e-4  # self-check: fp32 logits of both paths must agree to this (absolute and relative)
ATT_MAX_SPLITS = 64
DTYPES = {torch.bfloat16: "ELEM_BF16", torch.float32: "ELEM_F32"}
# A kernel argument's C type -> what it must be: a tensor of this dtype ("elem_t": the decoder's), or a
# scalar of this C type
C_TYPES = {"elem_t*": "elem_t", "float*": torch.float32, "int*": torch.int32, "long long*": torch.int64,
           "unsigned int*": torch.int32, "int": ctypes.c_int, "float": ctypes.c_float}


def announce(msg):
    print(f"[kernels.fused] {msg}", flush=True)


def kernel_source(dtype, head_dim):
    """The one program for a (dtype, head_dim): preamble + common.cuh + every .cu file."""
    preamble = f"#define {DTYPES[dtype]}\n#define HEAD_DIM {head_dim}\n#define RMAX {RMAX}\n"
    parts = [preamble]
    for name in SOURCES:  # #line: compiler errors and warnings name the real file and line
        with open(os.path.join(KERNEL_DIR, name)) as fh:
            parts.append(f"// ---- {name} ----\n#line 1 \"kernels/{name}\"\n" + fh.read())
    return "\n".join(parts)


def parse_signatures(source):
    """{kernel: ((C type, name), ...)} from the extern "C" __global__ definitions in CUDA source. The C type
    is written without const and __restrict__: "elem_t*", "float*", "int", ..."""
    out = {}
    kernel = r'extern "C" __global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\((.*?)\)\s*\{'
    for m in re.finditer(kernel, source, re.S):
        params = []
        for arg in filter(str.strip, re.sub(r"//[^\n]*", "", m.group(2)).split(",")):
            bare = re.sub(r"\b(const|__restrict__)\b", " ", arg)
            words = re.fullmatch(r"\s*(\w+(?:\s+\w+)*?)\s*(\*?)\s*(\w+)\s*", bare)
            ctype, name = re.sub(r"\s+", " ", words.group(1)) + words.group(2), words.group(3)
            if ctype not in C_TYPES:
                raise ValueError(f"kernel {m.group(1)}: argument {name} has type {ctype}, "
                                 f"not one of {list(C_TYPES)}")
            params.append((ctype, name))
        out[m.group(1)] = tuple(params)
    return out


@functools.lru_cache(maxsize=None)
def signatures():
    """Every kernel's arguments, read from kernels/*.cu: the one argument table (the same for every build)."""
    return parse_signatures(kernel_source(torch.float32, 64))


def marshal(name, dtype, args, device_type="cuda"):
    """Check args against kernel `name`'s C signature and turn them into ctypes values of those exact types.
    Tensors must be on `device_type` (the backend's) and of the dtype their C type needs."""
    sig = signatures()[name]
    if len(args) != len(sig):
        raise TypeError(f"{name}: expected {len(sig)} arguments ({', '.join(n for _, n in sig)}), "
                        f"got {len(args)}")
    values = []
    for i, (a, (ctype, pname)) in enumerate(zip(args, sig)):
        want = C_TYPES[ctype]
        if ctype.endswith("*"):
            want = dtype if want == "elem_t" else want
            if not isinstance(a, torch.Tensor) or a.device.type != device_type or a.dtype != want:
                got = f"{a.dtype} on {a.device}" if isinstance(a, torch.Tensor) else type(a).__name__
                raise TypeError(f"{name}: argument {i} ({ctype} {pname}) must be a {device_type} {want} "
                                f"tensor, got {got}")
            values.append(ctypes.c_void_p(a.data_ptr()))
        elif want is ctypes.c_int:
            if not isinstance(a, int) or isinstance(a, bool) or not -2**31 <= a < 2**31:
                raise TypeError(f"{name}: argument {i} (int {pname}) must be an int32-range int, got {a!r}")
            values.append(ctypes.c_int(a))
        else:  # float
            if not isinstance(a, (int, float)) or isinstance(a, bool):
                raise TypeError(f"{name}: argument {i} (float {pname}) must be a float, got {a!r}")
            values.append(ctypes.c_float(float(a)))
    return values


class _Kernel:
    """One kernel: marshals its arguments, then hands cuLaunchKernel's (grid, block, smem, void** params) to
    `launch`, the backend's launcher for it."""

    def __init__(self, launch, name, dtype, device_type):
        self.launch, self.name, self.dtype, self.device_type = launch, name, dtype, device_type

    def __call__(self, grid, block, *args, smem=0):
        values = marshal(self.name, self.dtype, args, self.device_type)
        params = (ctypes.c_void_p * len(values))(*[ctypes.addressof(v) for v in values])
        grid = tuple(grid) + (1,) * (3 - len(grid))
        block = (block, 1, 1) if isinstance(block, int) else tuple(block) + (1,) * (3 - len(block))
        self.launch(grid, block, smem, params)


class _Module:
    """All kernels of one build as attributes: mod.embed(grid, block, *args, smem=0)."""

    def __init__(self, launchers, dtype, device_type, description):
        for name, launch in launchers.items():
            setattr(self, name, _Kernel(launch, name, dtype, device_type))
        self.description = description


def device_arch(index):
    """NVRTC's name for the architecture of CUDA device `index`: "sm_90" on an H100/H200."""
    major, minor = torch.cuda.get_device_capability(index)
    return f"sm_{major}{minor}"


@functools.lru_cache(maxsize=None)
def compile_kernels(dtype, head_dim, arch, options=()):
    """kernel_source(dtype, head_dim) compiled by NVRTC for `arch` (no GPU needed) -> nvrtc.Compiled.
    Cached per (dtype, head_dim, arch): devices of one architecture share the cubin."""
    cuda_major = int(torch.version.cuda.split(".")[0]) if torch.version.cuda else None
    return nvrtc.compile_program(kernel_source(dtype, head_dim), arch, options, name="fused.cu",
                                 nvrtc=nvrtc.default_nvrtc(cuda_major))


class CudaDriver:
    """The GPU backend: NVRTC builds, cuModuleLoadData loads, cuLaunchKernel launches on torch's current
    stream (the capture stream while a CUDA graph is recorded)."""
    device_type, graphs, key = "cuda", True, "cuda"

    def status(self, device):
        """(True, '') where the kernels can run on `device`, else (False, why); the probe build is done by
        fused_status."""
        if device.type != "cuda":
            return False, f"device is '{device}', the fused kernels need a CUDA device"
        if not torch.cuda.is_available():
            return False, "torch.cuda.is_available() is False (no GPU or a CPU-only torch build)"
        if torch.version.hip is not None:
            return False, "ROCm build of torch: the kernels are written for CUDA/NVRTC"
        return True, ""

    def load(self, dtype, head_dim, device):
        """Compile (once per architecture) and load into `device` -> ({kernel: launch}, what was built)."""
        index = device.index if device.index is not None else torch.cuda.current_device()
        compiled = compile_kernels(dtype, head_dim, device_arch(index))
        if compiled.log:  # NVRTC warned: the build goes on, but says so (the CPU tests fail on it)
            announce(f"NVRTC warnings for {compiled.arch}:\n{compiled.log}")
        t0 = time.perf_counter()
        # cuModuleLoadData loads into the current context: make it this device's, and torch's primary
        # context exist and be current (synchronize is a runtime call)
        with torch.cuda.device(index):
            torch.cuda.synchronize(index)
            funcs = nvrtc.load_module(compiled.cubin, signatures())
        cu = nvrtc.libcuda()

        def launcher(name, func):
            def launch(grid, block, smem, params):
                stream = torch.cuda.current_stream().cuda_stream
                dims = [ctypes.c_uint(d) for d in (*grid, *block)]
                rc = cu.cuLaunchKernel(func, *dims, ctypes.c_uint(smem), ctypes.c_void_p(stream), params, None)
                if rc != 0:
                    raise RuntimeError(f"cuLaunchKernel({name}, grid={grid}, block={block}, smem={smem}) "
                                       f"failed: {nvrtc.cuda_error(rc)}")
            return launch

        what = (f"kernels/*.cu with {compiled.nvrtc} for {compiled.arch}, {str(dtype).removeprefix('torch.')}, "
                f"head_dim {head_dim}: compiled in {compiled.seconds:.2f} s "
                f"({len(compiled.cubin) // 1024} KiB cubin), loaded in {time.perf_counter() - t0:.2f} s")
        return {name: launcher(name, f) for name, f in funcs.items()}, what


CUDA = CudaDriver()
_MODULES = {}
_REPORTED = set()


def build(dtype, head_dim, device=None, backend=CUDA):
    """The kernels for this dtype and head size on `device`, built and loaded once per (backend, device)."""
    dev = torch.device(device if device is not None else backend.device_type)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    key = (backend.key, dtype, head_dim, str(dev))
    if key not in _MODULES:
        launchers, what = backend.load(dtype, head_dim, dev)
        _MODULES[key] = _Module(launchers, dtype, backend.device_type, what)
        announce(f"built {what}")
    return _MODULES[key]


def _report(ok, reason):
    line = (f"fused CUDA decode path ON: {reason}" if ok else
            f"fused CUDA decode path OFF: {reason}; decoding falls back to the reference model.GPT path")
    if line not in _REPORTED:
        _REPORTED.add(line)
        announce(line)
    return ok, reason


def fused_status(device=None, backend=CUDA):
    """(True, why) when the fused path can run on `device`, else (False, why). Never raises; says it once."""
    try:
        dev = torch.device(device) if device is not None else torch.device(backend.device_type)
        ok, why = backend.status(dev)
        if not ok:
            return _report(False, why)
        mod = build(torch.bfloat16, 64, dev, backend)  # a probe: the build, the loading, the symbols
        return _report(True, f"kernels built and loaded: {mod.description}")
    except Exception as e:  # the point of this function: any failure becomes a loud, explained fallback
        return _report(False, f"kernel build failed: {type(e).__name__}: {e}")


# ------------------------------------------------------------------------------------------------
# Can the kernels stand in for model.py? A structural check, then a numerical one.

def expected_shapes(cfg):
    """{state_dict name: shape} of exactly the tensors the kernels read (the aggregator is called, not
    read)."""
    C, V, L, qkv = cfg.n_embd, cfg.vocab_size, cfg.n_layer, (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim
    linears = {"attn.c_attn": (qkv, C), "attn.c_proj": (C, C), "mlp.c_fc": (4 * C, C),
               "mlp.c_proj": (C, 4 * C)}
    out = {"transformer.wte.weight": (V, C), "transformer.wpe.weight": (cfg.block_size, C),
           "lm_head.weight": (V, C), "transformer.ln_f.weight": (C,)}
    if cfg.bias:
        out["transformer.ln_f.bias"] = (C,)
    for i in range(L):
        p = f"transformer.h.{i}."
        for ln in ("ln_1", "ln_2"):
            out.update({p + ln + ".weight": (C,), **({p + ln + ".bias": (C,)} if cfg.bias else {})})
        for name, shape in linears.items():
            out.update({p + name + ".weight": shape, **({p + name + ".bias": shape[:1]} if cfg.bias else {})})
        if cfg.n_streams > 1:
            prefix = (cfg.n_streams, cfg.n_kv_head, cfg.n_prefix, cfg.head_dim)
            out[p + "attn.prefix_k"] = out[p + "attn.prefix_v"] = prefix
    return out


KNOWN_MODULES = (GPT, Block, CausalSelfAttention, MLP, torch.nn.LayerNorm, torch.nn.ModuleDict,
                 torch.nn.ModuleList, torch.nn.Embedding, torch.nn.Linear, torch.nn.Dropout, torch.nn.GELU)


def known_structure(model):
    """'' when the kernels know every tensor and module of `model` (outside its aggregator), else why not."""
    cfg = model.config
    want, have = expected_shapes(cfg), {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for name, shape in have.items():
        if name.startswith("aggregator."):
            continue  # the aggregator runs as the model's own module
        if name not in want:
            return f"the model has {name}, which the fused kernels do not know"
        if shape != want[name]:
            return f"{name} has shape {shape}, the fused kernels expect {want[name]}"
    missing = [n for n in want if n not in have]
    if missing:
        return f"the fused kernels need {missing[0]}, which the model lacks"
    if model.lm_head.weight is not model.transformer.wte.weight:
        return "lm_head is not tied to transformer.wte, as the kernels assume"
    for name, m in model.named_modules():
        if name == "aggregator" or name.startswith("aggregator."):
            continue
        if type(m) not in KNOWN_MODULES:
            return f"module {name} is a {type(m).__name__}, which the fused kernels do not know"
        if "forward" in vars(m):
            return f"the forward of module {name or 'model'} was replaced on the instance"
        if m._forward_hooks or m._forward_pre_hooks:
            return f"module {name or 'model'} has a forward hook, which the kernels would not run"
        if isinstance(m, torch.nn.LayerNorm) and (m.eps != 1e-5 or not m.elementwise_affine):
            return (f"module {name} is LayerNorm(eps={m.eps}, elementwise_affine={m.elementwise_affine}); "
                    "the kernels assume 1e-5 and affine")
        if isinstance(m, torch.nn.Embedding) and m.max_norm is not None:
            return (f"module {name} renormalises its rows (max_norm={m.max_norm}); the kernels read them "
                    "as they are")
        if isinstance(m, torch.nn.GELU) and m.approximate != "none":
            return f"module {name} is GELU(approximate={m.approximate!r}); the kernels compute the erf form"
    return ""


def _code_version(model):
    """Identifies the code of the model's classes: a monkeypatched or edited method gives a new value."""
    classes = {c for m in model.modules() for c in type(m).__mro__ if c.__module__ != "builtins"}
    classes = sorted(classes, key=str)
    return tuple((c.__qualname__, name, id(f)) for c in classes for name, f in vars(c).items() if callable(f))


def _check_weights(model, gen):
    """Unit-scale random weights from a local generator: every path through the kernels carries signal."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            x = torch.randn(p.shape, generator=gen)
            if p.dim() == 2:  # Linear weights, embeddings: N(0, 1/fan_in)
                x = x * p.size(1) ** -0.5
            elif p.dim() == 1:  # norm weights around 1, biases around 0
                x = x * 0.2 + (1.0 if name.endswith("weight") else 0.0)
            p.copy_(x)  # prefixes (4-D): N(0, 1)


_SELF_CHECKS = {}


def self_check(model, batch_size, attn_splits=None, steps=3, backend=CUDA):
    """
    (True, what was checked) or (False, why not): decode a short random prompt with the fused kernels
    and with model.py on a small fp32 instance of the same classes and config, and compare the logits.
    Never raises, and leaves the global torch RNG as it found it.
    """
    cfg, device = model.config, next(model.parameters()).device
    small_cfg = dataclasses.replace(cfg, n_layer=min(cfg.n_layer, 2), dropout=0.0)
    # the smallest batch that takes the same kernel paths: hand GEMVs or cuBLAS for the layers and the head
    if cfg.n_streams * batch_size <= RMAX:
        B = batch_size
    else:
        B = RMAX + 1 if batch_size > RMAX else _cdiv(RMAX + 1, cfg.n_streams)
    key = (type(model), dataclasses.astuple(small_cfg), B, str(device), attn_splits, backend.key,
           _code_version(model))
    if key in _SELF_CHECKS:
        return _SELF_CHECKS[key]
    gen = torch.Generator().manual_seed(1234)
    precision = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")  # no TF32: the reference must be true fp32
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
            small = type(model)(small_cfg).to(device).eval()
            _check_weights(small, gen)
            T0 = max(1, min(40, cfg.block_size - steps))  # past 32 keys: the attention's splits merge
            tokens = torch.randint(0, cfg.vocab_size, (B, T0 + steps), generator=gen).to(device)
            dec = FusedDecoder(small, B, dtype=torch.float32, cuda_graph=False, attn_splits=attn_splits,
                               check=False, backend=backend)
            dec.prefill(tokens[:, :T0])
            cache = KVCache(small, B)
            small(tokens[:, :T0], cache=cache)
            result = (True, f"self-check passed: fused decode = model.py to {CHECK_TOL:g} over {steps} steps")
            for i in range(min(steps, cfg.block_size - T0)):
                tok = tokens[:, T0 + i:T0 + i + 1]
                ref = small(tok, cache=cache)[0][:, -1].float()
                got = dec.decode_step(tok)
                if not torch.allclose(got, ref, atol=CHECK_TOL, rtol=CHECK_TOL):
                    diff = (got - ref).abs().max().item()
                    result = (False, f"fused decode disagrees with model.py by {diff:.3g} at step {i}")
                    break
    except Exception as e:  # a model the kernels cannot even run is refused, not crashed on
        result = (False, f"fused self-check failed: {type(e).__name__}: {e}")
    finally:
        torch.set_float32_matmul_precision(precision)
    _SELF_CHECKS[key] = result
    return result


def fused_decoder_for(model, batch_size, dtype, max_len, cuda_graph=True, backend=CUDA):
    """(FusedDecoder, why) when the fused path can decode `model` for batch_size rows up to max_len
    tokens, else (None, why it is not used). Never raises: sample.py and bench.py print `why`."""
    device = next(model.parameters()).device
    ok, why = fused_status(device, backend)
    if ok:
        ok, reason = FusedDecoder.supports(model.config, batch_size, dtype)
        why = reason or why
    if ok and max_len > model.config.block_size:
        ok, why = False, f"prompt + new tokens exceed block_size {model.config.block_size}"
    if not ok:
        return None, why
    try:
        dec = FusedDecoder(model, batch_size, dtype=dtype, cuda_graph=cuda_graph, backend=backend)
    except UserError as e:  # refused by known_structure or self_check
        return None, str(e)
    except Exception as e:  # the build for this dtype, memory, ...: say so, decode on the reference path
        return None, f"the fused decoder could not be made: {type(e).__name__}: {e}"
    return dec, f"{why}; {dec.checked}"


def _cdiv(a, b):
    return (a + b - 1) // b


class FusedDecoder:
    """
    Fused-kernel decoder for a model.GPT. Uses the model's own tensors when they are already in `dtype`
    (a copy of the model otherwise). Raises UserError if known_structure or self_check refuses the model
    (check=False skips self_check: the self-check itself uses that).
    attn_splits: force the number of flash-decoding splits (tests); None picks ~2 blocks per SM.
    backend: who runs the kernels, CUDA (the GPU) unless a test passes its CPU backend; a backend without
    CUDA graphs (the CPU one) runs every step eagerly, whatever cuda_graph says, and the start-up line says
    so.
    """

    @staticmethod
    def supports(config, batch_size, dtype):
        """(True, '') or (False, why) for this model shape, batch size and dtype."""
        if dtype not in DTYPES:
            return False, (f"dtype {dtype} is not supported by the fused kernels (use torch.bfloat16 or "
                           "torch.float32)")
        if config.head_dim % 32 != 0 or config.head_dim > 256:
            return False, f"head_dim {config.head_dim} must be a multiple of 32 and at most 256"
        if config.n_embd % 8 != 0:
            return False, f"n_embd {config.n_embd} must be a multiple of 8 (16-byte vector loads)"
        if config.n_streams > 8:
            return False, f"n_streams {config.n_streams} > 8 was never run on a GPU"
        if batch_size < 1:
            return False, f"batch_size must be >= 1, got {batch_size}"
        return True, ""

    @torch.no_grad()
    def __init__(self, model, batch_size, dtype=torch.bfloat16, cuda_graph=True, attn_splits=None, check=True,
                 backend=CUDA):
        cfg = model.config
        device = next(model.parameters()).device
        ok, why = fused_status(device, backend)
        if not ok:
            raise RuntimeError(f"FusedDecoder: the fused path is unavailable: {why}")
        ok, why = self.supports(cfg, batch_size, dtype)
        if not ok:
            raise ValueError(f"FusedDecoder: {why}")
        problem, self.checked = known_structure(model), "self-check skipped"
        if not problem and check:
            ok, self.checked = self_check(model, batch_size, attn_splits, backend=backend)
            problem = "" if ok else self.checked
        if problem:
            raise UserError(problem)
        if next(model.parameters()).dtype != dtype:
            model = copy.deepcopy(model).to(dtype)  # prefill and the aggregator run in the decoder's dtype
        self.model = model.eval()
        self.config, self.device, self.dtype = cfg, device, dtype
        self.cuda_graph = cuda_graph and backend.graphs
        self.kernels = build(dtype, cfg.head_dim, device, backend)
        P, B, C, L = cfg.n_streams, batch_size, cfg.n_embd, cfg.n_layer
        H, Hkv, hd = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.P, self.B, self.R, self.C, self.L, self.H, self.Hkv, self.hd = P, B, P * B, C, L, H, Hkv, hd
        self.n_prefix, self.Tmax = cfg.n_prefix_slots, cfg.block_size
        self.n_qkv = (H + 2 * Hkv) * hd

        sd = model.state_dict()  # the names and shapes known_structure checked; no copy when in dtype
        zeros = torch.zeros(C, device=device, dtype=dtype)

        def w(name, default=None):
            return sd[name].contiguous() if name in sd else default

        def ln(name):  # LayerNorm weight and bias in fp32 (the kernels normalise the fp32 residual)
            return w(name + ".weight").float(), w(name + ".bias", zeros).float()

        self.wte, self.wpe = w("transformer.wte.weight"), w("transformer.wpe.weight")
        self.layers = []
        for i in range(L):
            p = f"transformer.h.{i}."
            self.layers.append(dict(
                ln1=ln(p + "ln_1"), ln2=ln(p + "ln_2"),
                w_qkv=w(p + "attn.c_attn.weight"),
                b_qkv=w(p + "attn.c_attn.bias", torch.zeros(self.n_qkv, device=device, dtype=dtype)),
                w_o=w(p + "attn.c_proj.weight"), b_o=w(p + "attn.c_proj.bias", zeros),
                w_fc=w(p + "mlp.c_fc.weight"),
                b_fc=w(p + "mlp.c_fc.bias", torch.zeros(4 * C, device=device, dtype=dtype)),
                w_p=w(p + "mlp.c_proj.weight"), b_p=w(p + "mlp.c_proj.bias", zeros),
                # (P, Hkv, n_prefix, hd): the model's own prefix, shared by the B rows of each stream;
                # a dummy at P = 1
                prefix_k=w(p + "attn.prefix_k", zeros), prefix_v=w(p + "attn.prefix_v", zeros),
            ))
        self.ln_f = ln("transformer.ln_f")

        # static state: every pointer baked into the CUDA graph lives here
        R, V = self.R, cfg.vocab_size
        kw = dict(device=device, dtype=dtype)
        # model.py's own cache: (L, R, Hkv, block_size, hd), real tokens only
        self.cache = KVCache(model, B, dtype=dtype)
        self.pos = torch.zeros(1, device=device, dtype=torch.int32)  # = cache.pos, on the device: graphs
        self.tok = torch.zeros(B, device=device, dtype=torch.long)
        self.x = torch.zeros(R, C, device=device)  # fp32 residual stream
        self.h = torch.empty(R, C, **kw)
        self.qkv = torch.empty(R, self.n_qkv, **kw)
        self.y = torch.empty(R, C, **kw)
        self.f = torch.empty(R, 4 * C, **kw)
        self.logits = torch.empty(B, V, device=device)
        sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132
        auto = max(1, min(_cdiv(2 * sms, R * H), _cdiv(self.n_prefix + self.Tmax, 32), ATT_MAX_SPLITS))
        self.n_split = attn_splits or auto
        self.part = torch.empty(R, H, self.n_split, hd + 2, device=device)
        self.counters = torch.zeros(R, H, device=device, dtype=torch.int32)
        self.scale = 1.0 / math.sqrt(hd)
        self.gemv_rows = R <= RMAX and R * C * 4 <= GEMV_SMEM_LIMIT  # hand GEMV layers, else cuBLAS
        self.gemv_head = B <= RMAX
        self.graph, self.graph_logits = None, None
        if check:
            announce(f"FusedDecoder: P={P} B={B} rows={R} {str(dtype).removeprefix('torch.')}, layers on "
                 f"{'hand GEMV kernels' if self.gemv_rows else f'cuBLAS (rows {R} > {RMAX} or big LayerNorm)'}, "
                 f"LM head on {'gemv_f32' if self.gemv_head else 'cuBLAS'}, {self.n_split} attention split(s), "
                 f"CUDA graph {'ON' if self.cuda_graph else 'OFF'}"
                 f"{'' if backend.graphs else f' (none on the {backend.device_type} backend)'}")

    # ---------------------------------------------------------------- one decode step (graph-capturable)

    def _head(self):
        """x (R, C) fp32 -> logits (B, V) fp32: ln_f, the model's aggregator (P > 1), LM head. No host
        sync."""
        kern, P, B, R, C = self.kernels, self.P, self.B, self.R, self.C
        kern.layernorm((_cdiv(R, 8),), 256, self.x, *self.ln_f, self.h, R, C)
        last = self.h
        if P > 1:  # the model's own module: a changed aggregator is followed, not re-derived
            last = self.model.aggregator(self.h.view(R, 1, C)).reshape(B, C).to(self.dtype).contiguous()
        if self.gemv_head:
            V = self.logits.size(1)
            kern.gemv_f32((_cdiv(V, 8),), 256, last, self.wte, self.logits, B, V, C)  # tied: lm_head is wte
            return self.logits
        return F.linear(last, self.wte).float()

    def _step(self):
        """One token for every row: reads self.tok and self.pos, appends to the cache, pos += 1."""
        kern, R, C, B = self.kernels, self.R, self.C, self.B
        kern.embed((_cdiv(C, 256), R), 256, self.tok, self.pos, self.wte, self.wpe, self.x, B, C)
        for i, layer in enumerate(self.layers):
            if self.gemv_rows:
                kern.gemv_ln_store((_cdiv(self.n_qkv, 8),), 256, self.x, *layer["ln1"], layer["w_qkv"],
                                   layer["b_qkv"], self.qkv, R, self.n_qkv, C, smem=R * C * 4)
            else:
                kern.layernorm((_cdiv(R, 8),), 256, self.x, *layer["ln1"], self.h, R, C)
                torch.addmm(layer["b_qkv"], self.h, layer["w_qkv"].t(), out=self.qkv)
            kern.attn_decode((self.n_split, self.H, R), 128, self.qkv, layer["prefix_k"], layer["prefix_v"],
                             self.cache.k[i], self.cache.v[i], self.pos, self.part, self.counters, self.y,
                             B, self.H, self.Hkv, self.n_prefix, self.Tmax, self.n_split, self.scale)
            if self.gemv_rows:
                kern.gemv_add((_cdiv(C, 8),), 256, self.y, layer["w_o"], layer["b_o"], self.x, R, C, C)
                kern.gemv_ln_gelu((_cdiv(4 * C, 8),), 256, self.x, *layer["ln2"], layer["w_fc"],
                                  layer["b_fc"], self.f, R, 4 * C, C, smem=R * C * 4)
                kern.gemv_add((_cdiv(C, 8),), 256, self.f, layer["w_p"], layer["b_p"], self.x, R, C, 4 * C)
            else:
                self.x.add_(F.linear(self.y, layer["w_o"], layer["b_o"]))
                kern.layernorm((_cdiv(R, 8),), 256, self.x, *layer["ln2"], self.h, R, C)
                torch.addmm(layer["b_fc"], self.h, layer["w_fc"].t(), out=self.f)
                self.x.add_(F.linear(F.gelu(self.f), layer["w_p"], layer["b_p"]))
        logits = self._head()
        self.pos.add_(1)
        return logits

    # ---------------------------------------------------------------- public API

    def reset(self):
        """Forget the cached tokens (the buffers and the CUDA graph stay valid)."""
        self.pos.zero_()
        self.cache.pos = 0

    def _check_tokens(self, idx, what):
        if not isinstance(idx, torch.Tensor) or idx.dim() != 2 or idx.dtype != torch.long:
            raise ValueError(f"{what}: expected a (B, T) torch.long tensor, got {getattr(idx, 'shape', idx)}")
        if idx.size(0) != self.B:
            raise ValueError(f"{what}: batch {idx.size(0)} != the decoder's batch_size {self.B}")
        if idx.device != self.device:
            raise ValueError(f"{what}: tokens on {idx.device}, decoder on {self.device}")

    @torch.no_grad()
    def prefill(self, idx):
        """Reset, run the prompt idx (B, T) through model.py itself into the cache; the last logits, (B, V)
        fp32."""
        self._check_tokens(idx, "prefill")
        T = idx.size(1)
        if not 1 <= T <= self.Tmax:
            raise ValueError(f"prefill: prompt length {T} must be in [1, block_size={self.Tmax}]")
        self.reset()
        logits, _ = self.model(idx, cache=self.cache)  # (B, 1, V); cache.pos becomes T
        self.pos.fill_(T)
        return logits[:, -1].float()

    @torch.no_grad()
    def decode_step(self, tok):
        """Append tok (B, 1) to every row and return the next logits (B, V) fp32."""
        self._check_tokens(tok, "decode_step")
        if tok.size(1) != 1:
            raise ValueError(f"decode_step: expected (B, 1) tokens, got {tuple(tok.shape)}")
        if self.cache.pos == 0:
            raise ValueError("decode_step: call prefill first")
        if self.cache.pos + 1 > self.Tmax:
            raise ValueError(f"decode_step: {self.cache.pos + 1} tokens exceed block_size {self.Tmax}")
        self.tok.copy_(tok.view(-1))
        if not self.cuda_graph:
            logits = self._step()
        elif self.graph is None:
            logits = self._capture()
        else:
            self.graph.replay()
            logits = self.graph_logits
        self.cache.pos += 1  # the host-side twin of self.pos: model.py can go on from this cache
        return logits.clone()  # the graph's output buffer is overwritten by the next replay

    def _capture(self):
        """Run this step eagerly on a side stream (it also warms up cuBLAS), then record it as a graph."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            logits = self._step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):  # records only: cache, pos and x are not touched here
            self.graph_logits = self._step()
        self.graph = graph
        return logits

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None):
        """Sampled as model.GPT.generate samples (temperature, then top_k), on the fused path; temperature 0
        is greedy."""
        if idx.size(1) + max_new_tokens > self.Tmax:
            raise ValueError(f"generate: prompt {idx.size(1)} + {max_new_tokens} new tokens exceed block_size "
                             f"{self.Tmax}")
        for i in range(max_new_tokens):
            logits = self.prefill(idx) if i == 0 else self.decode_step(idx[:, -1:])
            idx = torch.cat((idx, sample_next(logits, temperature, top_k)), dim=1)
        return idx


def sample_next(logits, temperature=1.0, top_k=None):
    """Next tokens (B, 1) from last-position logits (B, V), as model.GPT.generate samples them;
    temperature 0 is greedy (argmax)."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits[logits < v[:, [-1]]] = -float("inf")
    return torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
