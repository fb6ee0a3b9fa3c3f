"""
The fused GPU decode path for ParScale: hand-written CUDA kernels (kernels/*.cu), built at first use
with NVRTC through PyTorch, a static KV cache, and CUDA-graph replay of the whole decode step.

    from kernels.fused import FusedDecoder, fused_status
    ok, reason = fused_status(device)               # never raises
    dec = FusedDecoder(model, batch_size, dtype=torch.bfloat16, cuda_graph=True)
    logits = dec.prefill(idx)                       # (B, T) -> last-position logits (B, vocab) float32
    logits = dec.decode_step(tok)                   # (B, 1) -> (B, vocab) float32
    out = dec.generate(idx, max_new_tokens, temperature=1.0, top_k=None)

Build. torch.cuda._compile_kernel (a PRIVATE PyTorch API: NVRTC, ~0.4 s, no CUDA toolkit needed,
ships in the pip wheel) compiles one program per (dtype, head_dim): a #define preamble plus
common.cuh and every .cu file, concatenated (NVRTC gets no #include of our own files and no CUDA
headers, so bf16 is handled as raw bits, see common.cuh). Kernels are launched by our own
cuLaunchKernel call through ctypes, with every argument marshalled to an explicit C type from the
signature table SIGNATURES below (torch's own launcher turns a Python float into a C double,
which is what broke float arguments in an earlier test), on torch's current stream, so the launches
are recorded by CUDA-graph capture. Tensor arguments are checked for device and dtype at every launch.

Design of one decode step (R = P*B rows, one token each; rows stream-major, r = s*B + b):
  embed                      x = wte[tok] + wpe[pos] -> fp32 residual (R, C); pos read from device memory
  per layer, R <= RMAX (8):  5 launches
    gemv_ln_store            qkv = LN1(x) @ Wqkv^T + b      (LayerNorm recomputed per block, in smem)
    attn_decode              append k/v at slot pos; attention over [stream prefix | cache | new];
                             flash-decoding splits, merged in-kernel by the last block (no combine launch)
    gemv_add                 x += y @ Wo^T + b
    gemv_ln_gelu             f = GELU(LN2(x) @ Wfc^T + b)
    gemv_add                 x += f @ Wp^T + b
  per layer, R > RMAX:       layernorm kernel + cuBLAS (torch addmm/F.linear) + F.gelu + attn_decode: 9 launches
  tail                       layernorm (ln_f); P > 1: gather + 2 small Linears + SiLU (torch) + agg_mix;
                             LM head: gemv_f32 (B <= RMAX, fp32 logits directly) or cuBLAS + .float();
                             pos += 1
GPT-2-small shape, B = 1: ~66 launches at P = 1, ~71 at P > 1. In a replayed CUDA graph a small launch
costs ~2.5 us on the H200, so launch overhead alone is ~165-180 us: the 150 us target is not reached by
this design; the HBM floor is ~59 us (PARSCALE.md 5). Eager (no graph) adds ~10 us of Python + launch
per kernel.

Bytes per step (bandwidth floor): every weight once (GPT-2-small bf16: 124M params -> ~248 MB incl.
the 77 MB LM head) + KV read: L * R * Hkv * (n_pre_read + ctx) * hd * 2 (k and v) * 2 bytes, where the
prefix is read once per row from the shared (P, Hkv, n_prefix, hd) tensor (L2 catches the reuse across
the B rows of a stream).
Residual stream and all reductions are fp32; weights, activations between kernels and the cache use
the decoder's dtype (bf16 or fp32). Prefill runs on torch ops (SDPA with the prefix concatenated and one
shared (T, n_prefix + T) mask) and fills the static cache.
"""

import ctypes
import math
import os
import re
import time

import torch
import torch.nn.functional as F

from model import sample_next

KERNEL_DIR = os.path.dirname(os.path.abspath(__file__))
SOURCES = ["common.cuh", "norm.cu", "gemv.cu", "attention.cu", "aggregate.cu"]  # concatenated in this order
RMAX = 8  # most rows the GEMV kernels take (accumulators in registers); cuBLAS above
GEMV_SMEM_LIMIT = 48 * 1024  # the LayerNorm prologue stages R * C floats; more needs an opt-in we avoid
ATT_MAX_SPLITS = 64
DTYPES = {torch.bfloat16: "ELEM_BF16", torch.float32: "ELEM_F32"}

# Kernel argument types, one letter per argument, checked against the .cu signatures by the CPU tests:
#   e: elem_t* (decoder dtype)   F: float*   I: int*   L: long long*   U: unsigned int* (int32 tensor)
#   i: int scalar                f: float scalar
SIGNATURES = {
    "embed": "LIeeFii",
    "layernorm": "FFFeii",
    "gemv_ln_store": "FFFeeeiii",
    "gemv_ln_gelu": "FFFeeeiii",
    "gemv_add": "eeeFiii",
    "gemv_f32": "eeFiii",
    "attn_decode": "eeeeeIFUeiiiiiif",
    "agg_mix": "eeeiiiff",
}
_TENSOR_DTYPES = {"F": torch.float32, "I": torch.int32, "L": torch.int64, "U": torch.int32}


def _say(msg):
    print(f"[kernels.fused] {msg}", flush=True)


def kernel_source(dtype, head_dim):
    """The one NVRTC program for a (dtype, head_dim): preamble + common.cuh + every .cu file."""
    preamble = f"#define {DTYPES[dtype]}\n#define HEAD_DIM {head_dim}\n#define RMAX {RMAX}\n"
    parts = [preamble]
    for name in SOURCES:
        with open(os.path.join(KERNEL_DIR, name)) as fh:
            parts.append(f"// ---- {name} ----\n" + fh.read())
    return "\n".join(parts)


def marshal(name, dtype, args, require_cuda=True):
    """Check args against SIGNATURES[name] and turn them into ctypes values of the exact C types."""
    sig = SIGNATURES[name]
    if len(args) != len(sig):
        raise TypeError(f"{name}: expected {len(sig)} arguments ({sig}), got {len(args)}")
    values = []
    for i, (a, t) in enumerate(zip(args, sig)):
        if t in "eFILU":
            want = dtype if t == "e" else _TENSOR_DTYPES[t]
            if not isinstance(a, torch.Tensor) or (require_cuda and not a.is_cuda) or a.dtype != want:
                got = f"{a.dtype} on {a.device}" if isinstance(a, torch.Tensor) else type(a).__name__
                raise TypeError(f"{name}: argument {i} must be a CUDA {want} tensor, got {got}")
            values.append(ctypes.c_void_p(a.data_ptr()))
        elif t == "i":
            if not isinstance(a, int) or isinstance(a, bool) or not -2**31 <= a < 2**31:
                raise TypeError(f"{name}: argument {i} must be an int32-range int, got {a!r}")
            values.append(ctypes.c_int(a))
        else:  # "f"
            if not isinstance(a, (int, float)) or isinstance(a, bool):
                raise TypeError(f"{name}: argument {i} must be a float, got {a!r}")
            values.append(ctypes.c_float(float(a)))
    return values


class _Kernel:
    """One compiled kernel, launched by cuLaunchKernel with explicitly typed arguments."""

    def __init__(self, libcuda, func, name, dtype):
        self.libcuda, self.func, self.name, self.dtype = libcuda, func, name, dtype

    def __call__(self, grid, block, *args, smem=0):
        values = marshal(self.name, self.dtype, args)
        params = (ctypes.c_void_p * len(values))(*[ctypes.addressof(v) for v in values])
        grid = tuple(grid) + (1,) * (3 - len(grid))
        block = (block, 1, 1) if isinstance(block, int) else tuple(block) + (1,) * (3 - len(block))
        stream = torch.cuda.current_stream().cuda_stream  # the capture stream while a graph is recorded
        rc = self.libcuda.cuLaunchKernel(self.func, *[ctypes.c_uint(g) for g in grid], *[ctypes.c_uint(b) for b in block],
                                         ctypes.c_uint(smem), ctypes.c_void_p(stream), params, None)
        if rc != 0:
            raise RuntimeError(f"cuLaunchKernel({self.name}, grid={grid}, block={block}, smem={smem}) failed: CUresult {rc}")


class _Module:
    """All kernels of one (dtype, head_dim) build, as attributes: mod.embed(grid, block, *args)."""

    def __init__(self, dtype, head_dim):
        libcuda = ctypes.CDLL("libcuda.so.1")
        t0 = time.perf_counter()
        src = kernel_source(dtype, head_dim)
        # PRIVATE API: torch.cuda._compile_kernel may change or vanish in any PyTorch release. We use it
        # only to compile with NVRTC and load the module; `.module` and `.func` are its attributes in
        # torch 2.9-2.13. The first kernel comes from it, the others from the same CUmodule.
        first = torch.cuda._compile_kernel(src, "embed")
        module = first.module
        for name in SIGNATURES:
            func = ctypes.c_void_p()
            rc = libcuda.cuModuleGetFunction(ctypes.byref(func), module, name.encode())
            if rc != 0:
                raise RuntimeError(f"kernel {name} not found in the NVRTC module (CUresult {rc})")
            setattr(self, name, _Kernel(libcuda, func, name, dtype))
        self.build_s = time.perf_counter() - t0


_MODULES = {}
_REPORTED = set()


def build(dtype, head_dim, device=None):
    """Build (once per process and device) and return the kernels for this dtype and head size."""
    with torch.cuda.device(device if device is not None else torch.cuda.current_device()):
        key = (dtype, head_dim, torch.cuda.current_device())
        if key not in _MODULES:
            mod = _Module(dtype, head_dim)
            cc = "".join(map(str, torch.cuda.get_device_capability()))
            _say(f"built kernels/*.cu with NVRTC (torch.cuda._compile_kernel) for sm_{cc}, "
                 f"{str(dtype).removeprefix('torch.')}, head_dim {head_dim}, in {mod.build_s:.2f} s")
            _MODULES[key] = mod
        return _MODULES[key]


def _report(ok, reason):
    line = (f"fused CUDA decode path ON: {reason}" if ok else
            f"fused CUDA decode path OFF: {reason}; decoding falls back to the reference model.GPT path")
    if line not in _REPORTED:
        _REPORTED.add(line)
        _say(line)
    return ok, reason


def fused_status(device=None):
    """(True, why) when the fused path can run on `device`, else (False, why). Never raises; says it once."""
    try:
        dev = torch.device(device) if device is not None else torch.device("cuda")
        if dev.type != "cuda":
            return _report(False, f"device is '{dev}', the fused kernels need a CUDA device")
        if not torch.cuda.is_available():
            return _report(False, "torch.cuda.is_available() is False (no GPU or a CPU-only torch build)")
        if torch.version.hip is not None:
            return _report(False, "ROCm build of torch: the kernels are written for CUDA/NVRTC")
        if not hasattr(torch.cuda, "_compile_kernel"):
            return _report(False, f"torch {torch.__version__} has no torch.cuda._compile_kernel (NVRTC route)")
        build(torch.bfloat16, 64, dev)  # probe build: proves NVRTC, module loading and symbol lookup work
        name = torch.cuda.get_device_name(dev)
        return _report(True, f"NVRTC build OK on {name}")
    except Exception as e:  # the point of this function: any failure becomes a loud, explained fallback
        return _report(False, f"kernel build failed: {type(e).__name__}: {e}")


def fused_decoder_for(model, batch_size, dtype, max_len, cuda_graph=True):
    """(FusedDecoder, why) when the fused path can decode `model` for batch_size rows up to max_len
    tokens, else (None, why it is not used). Never raises: sample.py and bench.py print `why`."""
    device = next(model.parameters()).device
    ok, why = fused_status(device)
    if ok:
        ok, reason = FusedDecoder.supports(model.config, batch_size, dtype)
        why = reason or why
    if ok and max_len > model.config.block_size:
        ok, why = False, f"prompt + new tokens exceed block_size {model.config.block_size}"
    if not ok:
        return None, why
    return FusedDecoder(model, batch_size, dtype=dtype, cuda_graph=cuda_graph), why


def _cdiv(a, b):
    return (a + b - 1) // b


class FusedDecoder:
    """
    Static-cache, fused-kernel decoder for a model.GPT. Keeps its own dtype-cast copies of the weights;
    the model is not modified (changes to it after construction are not seen).
    attn_splits: force the number of flash-decoding splits (tests); None picks ~2 blocks per SM.
    """

    @staticmethod
    def supports(config, batch_size, dtype):
        """(True, '') or (False, why) for this model shape, batch size and dtype."""
        if dtype not in DTYPES:
            return False, f"dtype {dtype} is not supported by the fused kernels (use torch.bfloat16 or torch.float32)"
        if config.head_dim % 32 != 0 or config.head_dim > 256:
            return False, f"head_dim {config.head_dim} must be a multiple of 32 and at most 256"
        if config.n_embd % 8 != 0:
            return False, f"n_embd {config.n_embd} must be a multiple of 8 (16-byte vector loads)"
        if config.n_streams > 8:
            return False, f"n_streams {config.n_streams} > 8 (agg_mix holds at most 8 weights)"
        if batch_size < 1:
            return False, f"batch_size must be >= 1, got {batch_size}"
        return True, ""

    @torch.no_grad()
    def __init__(self, model, batch_size, dtype=torch.bfloat16, cuda_graph=True, attn_splits=None):
        cfg = model.config
        device = next(model.parameters()).device
        ok, why = fused_status(device)
        if not ok:
            raise RuntimeError(f"FusedDecoder: the fused path is unavailable: {why}")
        ok, why = self.supports(cfg, batch_size, dtype)
        if not ok:
            raise ValueError(f"FusedDecoder: {why}")
        self.config, self.device, self.dtype, self.cuda_graph = cfg, device, dtype, cuda_graph
        self.k = build(dtype, cfg.head_dim, device)
        P, B, C, L = cfg.n_streams, batch_size, cfg.n_embd, cfg.n_layer
        H, Hkv, hd = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.P, self.B, self.R, self.C, self.L, self.H, self.Hkv, self.hd = P, B, P * B, C, L, H, Hkv, hd
        self.n_pre, self.Tmax = cfg.n_prefix_slots, cfg.block_size
        self.n_qkv = (H + 2 * Hkv) * hd

        def w(t):  # a dtype-cast, contiguous copy on the model's device
            return t.detach().to(device=device, dtype=dtype).contiguous()

        def f32(t):
            return t.detach().to(device=device, dtype=torch.float32).contiguous()

        def bias(lin):
            return w(lin.bias) if lin.bias is not None else torch.zeros(lin.out_features, device=device, dtype=dtype)

        def ln(m):
            return f32(m.weight), (f32(m.bias) if m.bias is not None else torch.zeros(C, device=device))

        tr = model.transformer
        self.wte, self.wpe = w(tr.wte.weight), w(tr.wpe.weight)
        self.w_lm = self.wte if model.lm_head.weight is tr.wte.weight else w(model.lm_head.weight)
        self.layers = []
        for blk in tr.h:
            a, m = blk.attn, blk.mlp
            self.layers.append(dict(
                ln1=ln(blk.ln_1), ln2=ln(blk.ln_2),
                w_qkv=w(a.c_attn.weight), b_qkv=bias(a.c_attn), w_o=w(a.c_proj.weight), b_o=bias(a.c_proj),
                w_fc=w(m.c_fc.weight), b_fc=bias(m.c_fc), w_p=w(m.c_proj.weight), b_p=bias(m.c_proj),
                # (P, Hkv, n_prefix, hd), shared by the B rows of each stream; a dummy when P = 1
                pk=w(a.prefix_k) if P > 1 else torch.zeros(1, device=device, dtype=dtype),
                pv=w(a.prefix_v) if P > 1 else torch.zeros(1, device=device, dtype=dtype),
            ))
        self.ln_f = ln(tr.ln_f)
        if P > 1:
            ag = model.aggregator
            self.w_in, self.b_in = w(ag.proj_in.weight), w(ag.proj_in.bias)
            self.w_out, self.b_out = w(ag.proj_out.weight), w(ag.proj_out.bias)
            self.keep, self.floor = 1.0 - ag.eps, ag.eps / P  # in double, then rounded to float at launch

        # static state: every pointer baked into the CUDA graph lives here
        R, V = self.R, cfg.vocab_size
        kw = dict(device=device, dtype=dtype)
        self.cache_k = torch.zeros(L, R, Hkv, self.Tmax, hd, **kw)  # real tokens only; the prefix stays separate
        self.cache_v = torch.zeros(L, R, Hkv, self.Tmax, hd, **kw)
        self.pos = torch.zeros(1, device=device, dtype=torch.int32)  # real tokens cached = next position
        self.tok = torch.zeros(B, device=device, dtype=torch.long)
        self.x = torch.zeros(R, C, device=device)  # fp32 residual stream
        self.h = torch.empty(R, C, **kw)
        self.qkv = torch.empty(R, self.n_qkv, **kw)
        self.y = torch.empty(R, C, **kw)
        self.f = torch.empty(R, 4 * C, **kw)
        self.mixed = torch.empty(B, C, **kw)
        self.logits = torch.empty(B, V, device=device)
        sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132
        auto = max(1, min(_cdiv(2 * sms, R * H), _cdiv(self.n_pre + self.Tmax, 32), ATT_MAX_SPLITS))
        self.n_split = attn_splits or auto
        self.part = torch.empty(R, H, self.n_split, hd + 2, device=device)
        self.counters = torch.zeros(R, H, device=device, dtype=torch.int32)
        self.scale = 1.0 / math.sqrt(hd)
        self.gemv_rows = R <= RMAX and R * C * 4 <= GEMV_SMEM_LIMIT  # hand GEMV layers, else cuBLAS
        self.gemv_head = B <= RMAX
        self.n_cached, self.graph, self.graph_logits = 0, None, None
        _say(f"FusedDecoder: P={P} B={B} rows={R} {str(dtype).removeprefix('torch.')}, layers on "
             f"{'hand GEMV kernels' if self.gemv_rows else f'cuBLAS (rows {R} > {RMAX} or LayerNorm smem too big)'}, "
             f"LM head on {'gemv_f32' if self.gemv_head else 'cuBLAS'}, {self.n_split} attention split(s), "
             f"CUDA graph {'ON' if cuda_graph else 'OFF'}")

    # ---------------------------------------------------------------- one decode step (graph-capturable)

    def _head(self):
        """x (R, C) fp32 -> logits (B, V) fp32: ln_f, aggregation (P > 1), LM head. No host sync."""
        k, P, B, R, C = self.k, self.P, self.B, self.R, self.C
        k.layernorm((_cdiv(R, 8),), 256, self.x, *self.ln_f, self.h, R, C)
        last = self.h
        if P > 1:
            per_pos = self.h.view(P, B, C).transpose(0, 1).reshape(B, P * C)  # (B, P*C), as Aggregator
            z = F.linear(F.silu(F.linear(per_pos, self.w_in, self.b_in)), self.w_out, self.b_out)  # (B, P)
            k.agg_mix((_cdiv(C, 256), B), 256, z, self.h, self.mixed, B, P, C, self.keep, self.floor)
            last = self.mixed
        if self.gemv_head:
            V = self.logits.size(1)
            k.gemv_f32((_cdiv(V, 8),), 256, last, self.w_lm, self.logits, B, V, C)
            return self.logits
        return F.linear(last, self.w_lm).float()

    def _step(self):
        """One token for every row: reads self.tok and self.pos, appends to the cache, pos += 1."""
        k, R, C, B = self.k, self.R, self.C, self.B
        k.embed((_cdiv(C, 256), R), 256, self.tok, self.pos, self.wte, self.wpe, self.x, B, C)
        for li, ly in enumerate(self.layers):
            if self.gemv_rows:
                k.gemv_ln_store((_cdiv(self.n_qkv, 8),), 256, self.x, *ly["ln1"], ly["w_qkv"], ly["b_qkv"], self.qkv,
                                R, self.n_qkv, C, smem=R * C * 4)
            else:
                k.layernorm((_cdiv(R, 8),), 256, self.x, *ly["ln1"], self.h, R, C)
                torch.addmm(ly["b_qkv"], self.h, ly["w_qkv"].t(), out=self.qkv)
            k.attn_decode((self.n_split, self.H, R), 128, self.qkv, ly["pk"], ly["pv"], self.cache_k[li], self.cache_v[li],
                          self.pos, self.part, self.counters, self.y, B, self.H, self.Hkv, self.n_pre, self.Tmax,
                          self.n_split, self.scale)
            if self.gemv_rows:
                k.gemv_add((_cdiv(C, 8),), 256, self.y, ly["w_o"], ly["b_o"], self.x, R, C, C)
                k.gemv_ln_gelu((_cdiv(4 * C, 8),), 256, self.x, *ly["ln2"], ly["w_fc"], ly["b_fc"], self.f,
                               R, 4 * C, C, smem=R * C * 4)
                k.gemv_add((_cdiv(C, 8),), 256, self.f, ly["w_p"], ly["b_p"], self.x, R, C, 4 * C)
            else:
                self.x.add_(F.linear(self.y, ly["w_o"], ly["b_o"]))
                k.layernorm((_cdiv(R, 8),), 256, self.x, *ly["ln2"], self.h, R, C)
                torch.addmm(ly["b_fc"], self.h, ly["w_fc"].t(), out=self.f)
                self.x.add_(F.linear(F.gelu(self.f), ly["w_p"], ly["b_p"]))
        logits = self._head()
        self.pos.add_(1)
        return logits

    # ---------------------------------------------------------------- public API

    def reset(self):
        """Forget the cached tokens (the buffers and the CUDA graph stay valid)."""
        self.pos.zero_()
        self.n_cached = 0

    def _check_tokens(self, idx, what):
        if not isinstance(idx, torch.Tensor) or idx.dim() != 2 or idx.dtype != torch.long:
            raise ValueError(f"{what}: expected a (B, T) torch.long tensor, got {getattr(idx, 'shape', idx)}")
        if idx.size(0) != self.B:
            raise ValueError(f"{what}: batch {idx.size(0)} != the decoder's batch_size {self.B}")
        if idx.device != self.device:
            raise ValueError(f"{what}: tokens on {idx.device}, decoder on {self.device}")

    @torch.no_grad()
    def prefill(self, idx):
        """Reset, run the prompt idx (B, T) through torch ops (SDPA), fill the cache; last logits (B, V) fp32."""
        self._check_tokens(idx, "prefill")
        T = idx.size(1)
        if not 1 <= T <= self.Tmax:
            raise ValueError(f"prefill: prompt length {T} must be in [1, block_size={self.Tmax}]")
        self.reset()
        P, B, R, C, H, Hkv, hd, n_pre = self.P, self.B, self.R, self.C, self.H, self.Hkv, self.hd, self.n_pre
        x = F.embedding(idx, self.wte).float() + self.wpe[:T].float()  # (B, T, C), once for all streams
        x = x.repeat(P, 1, 1)  # (R, T, C), stream-major
        # prefix slots visible to every query, causal among the T real tokens: one (T, n_pre + T) mask for all rows
        mask = torch.ones(T, n_pre + T, dtype=torch.bool, device=self.device).tril(diagonal=n_pre) if n_pre else None
        gqa = {"enable_gqa": True} if Hkv != H else {}
        for li, ly in enumerate(self.layers):
            h = F.layer_norm(x, (C,), *ly["ln1"], 1e-5).to(self.dtype)
            q, k, v = F.linear(h, ly["w_qkv"], ly["b_qkv"]).split([H * hd, Hkv * hd, Hkv * hd], dim=2)
            q = q.view(R, T, H, hd).transpose(1, 2)  # (R, H, T, hd)
            k = k.view(R, T, Hkv, hd).transpose(1, 2)  # (R, Hkv, T, hd)
            v = v.view(R, T, Hkv, hd).transpose(1, 2)
            self.cache_k[li, :, :, :T] = k
            self.cache_v[li, :, :, :T] = v
            if n_pre:
                k = torch.cat([ly["pk"].repeat_interleave(B, dim=0), k], dim=2)  # (R, Hkv, n_pre + T, hd)
                v = torch.cat([ly["pv"].repeat_interleave(B, dim=0), v], dim=2)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, **gqa)
            x = x + F.linear(y.transpose(1, 2).reshape(R, T, C), ly["w_o"], ly["b_o"]).float()
            h = F.layer_norm(x, (C,), *ly["ln2"], 1e-5).to(self.dtype)
            x = x + F.linear(F.gelu(F.linear(h, ly["w_fc"], ly["b_fc"])), ly["w_p"], ly["b_p"]).float()
        self.x.copy_(x[:, -1])
        self.pos.fill_(T)
        self.n_cached = T
        return self._head().clone()

    @torch.no_grad()
    def decode_step(self, tok):
        """Append tok (B, 1) to every row and return the next logits (B, V) fp32."""
        self._check_tokens(tok, "decode_step")
        if tok.size(1) != 1:
            raise ValueError(f"decode_step: expected (B, 1) tokens, got {tuple(tok.shape)}")
        if self.n_cached == 0:
            raise ValueError("decode_step: call prefill first")
        if self.n_cached + 1 > self.Tmax:
            raise ValueError(f"decode_step: {self.n_cached + 1} tokens exceed block_size {self.Tmax}")
        self.tok.copy_(tok.view(-1))
        if not self.cuda_graph:
            logits = self._step()
        elif self.graph is None:
            logits = self._capture()
        else:
            self.graph.replay()
            logits = self.graph_logits
        self.n_cached += 1
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
        """model.GPT.generate's semantics (temperature 0 = greedy), on the fused path."""
        if idx.size(1) + max_new_tokens > self.Tmax:
            raise ValueError(f"generate: prompt {idx.size(1)} + {max_new_tokens} new tokens exceed block_size {self.Tmax}")
        for i in range(max_new_tokens):
            logits = self.prefill(idx) if i == 0 else self.decode_step(idx[:, -1:])
            idx = torch.cat((idx, sample_next(logits, temperature, top_k)), dim=1)
        return idx


def parse_signatures(source):
    """{kernel: letters} from the extern "C" __global__ definitions in CUDA source (used by the CPU tests)."""
    kinds = [(r"^(const\s+)?elem_t\s*\*", "e"), (r"^(const\s+)?float\s*\*", "F"), (r"^(const\s+)?int\s*\*", "I"),
             (r"^(const\s+)?long long\s*\*", "L"), (r"^(const\s+)?unsigned int\s*\*", "U"),
             (r"^int\s+\w+$", "i"), (r"^float\s+\w+$", "f")]
    out = {}
    for m in re.finditer(r'extern "C" __global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\((.*?)\)\s*\{', source, re.S):
        letters = ""
        for arg in re.sub(r"//[^\n]*", "", m.group(2)).split(","):
            arg = arg.replace("__restrict__", "").strip()
            arg = re.sub(r"\s+", " ", arg)
            letters += next(code for pat, code in kinds if re.match(pat, arg))
        out[m.group(1)] = letters
    return out
