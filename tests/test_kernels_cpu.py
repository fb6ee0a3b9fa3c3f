"""
The real CUDA kernels (kernels/*.cu) on the CPU: the very source NVRTC compiles, built by g++ against
tests/cuda_cpu.h (threads as fibers, blocks one after another) and launched through kernels/fused.py's own
launch path with the CPU backend of tests/kernels_cpu.py. Three layers:

1. each kernel against a float64 torch reference, over a covering set of shapes;
2. the whole FusedDecoder against model.py (P 1-8, B up to 3, MHA and GQA, 1 and 48 prefix slots, fp32 and
   bf16, rows up to 8 and above, blocks in order and shuffled), the shared KV cache, and the checks that follow
   or refuse a changed model.py (the README's Exercises);
3. the same kernels under AddressSanitizer + UBSan and under ThreadSanitizer, each in a subprocess whose
   Python has the sanitizer's runtime preloaded, and one planted fault per sanitizer that it must report.

What only a GPU can check (its arithmetic, ordering between concurrent blocks, speed, CUDA graphs) stays in
tests/test_fused.py's GPU tests; docs/fused.md says what is verified where. Without g++ or a sanitizer runtime
these tests skip and name what is missing; PARSCALE_REQUIRE_CXX=1 (.ci/run sets it) makes that a failure.

    python -m pytest tests/test_kernels_cpu.py -q
"""
import ctypes
import os
import subprocess
import sys
import tempfile

import pytest
import torch
import torch.nn.functional as F
from kernels_cpu import CpuKernels, build_library, cpu_source, launchers, missing, runtime, sanitized_env
from util import IMPORTABLE, ROOT, assert_close, make_model, reference_attention

from kernels import fused
from kernels.fused import FusedDecoder
from model import KVCache

U32, U16 = 2.0 ** -24, 2.0 ** -8  # unit roundoff of float32 (24 significant bits) and bfloat16 (8)
REQUIRE = os.environ.get("PARSCALE_REQUIRE_CXX") == "1"


def need(what_is_missing):
    if what_is_missing:
        if REQUIRE:
            pytest.fail(f"{what_is_missing}, and PARSCALE_REQUIRE_CXX=1 says the kernel tests must run")
        pytest.skip(what_is_missing)


@pytest.fixture(autouse=True)
def cxx(request):
    need(missing())


@pytest.fixture(autouse=True)
def fresh_self_checks(monkeypatch):
    monkeypatch.setattr(fused, "_SELF_CHECKS", {})  # a test that patches model.py must not see a cached verdict


CPU = CpuKernels()
SHUFFLED = CpuKernels(block_order_seed=7)  # the same library, blocks in a shuffled order


def bf16_ulp(x):
    """The spacing of bfloat16 numbers around x (8 significant bits): 2^(e - 8) for |x| = m 2^e, m in [0.5, 1)."""
    _, e = torch.frexp(x.abs().clamp_min(2.0 ** -126).float())
    return torch.ldexp(torch.ones_like(x, dtype=torch.float64), e.to(torch.int64) - 8)


def check(out, ref, bound, dtype, what):
    """out (the kernel's) against ref (float64): |out - ref| <= bound, the error the kernel's float32 arithmetic
    may make; for bfloat16 outputs one bf16 ulp of ref more (the kernel rounds its float32 result once, and an
    error near a rounding midpoint may pick the neighbour). NaN fails: outputs start as NaN."""
    out, ref = out.double(), ref.double()
    bound = torch.as_tensor(bound, dtype=torch.float64).expand_as(ref)
    if dtype == torch.bfloat16:
        bound = bound + bf16_ulp(ref)
    excess = ((out - ref).abs() - bound).nan_to_num(float("inf"))
    assert excess.max() <= 0, (f"{what}: {int((excess > 0).sum())} of {out.numel()} outside the bound; worst "
                               f"|diff| {(out - ref).abs().max().item():.3e} against bound {bound.max().item():.3e}")


def dot_bound(a, b):
    """Any float32 summation order of K products a_i b_i errs by at most K u sum |a_i b_i| (Higham, gamma_K)."""
    return a.size(-1) * U32 * (a.double().abs() @ b.double().abs().transpose(-1, -2))


# ------------------------------------------------------------------------------------------------
# 1. every kernel against float64 torch

DTYPES = [torch.float32, torch.bfloat16]


def kernels(backend, dtype, head_dim):
    return fused.build(dtype, head_dim, "cpu", backend)


@pytest.mark.parametrize("dtype", DTYPES)
def test_embed_and_layernorm(dtype, backend=CPU):
    k = kernels(backend, dtype, 64)
    torch.manual_seed(0)
    B, P, C, V, T = 3, 2, 200, 50, 17  # C not a multiple of the 256-thread block
    wte, wpe = torch.randn(V, C).to(dtype), torch.randn(T, C).to(dtype)
    tok, pos = torch.randint(0, V, (B,)), torch.tensor([11], dtype=torch.int32)
    x = torch.full((P * B, C), float("nan"))
    k.embed((fused._cdiv(C, 256), P * B), 256, tok, pos, wte, wpe, x, B, C)
    assert torch.equal(x, (wte[tok].float() + wpe[11].float()).repeat(P, 1)), "embed: one float32 add, exactly"
    R = 11
    x = torch.randn(R, C) * 3 + 1
    w, b = torch.randn(C), torch.randn(C)
    out = torch.full((R, C), float("nan")).to(dtype)
    k.layernorm((fused._cdiv(R, 8),), 256, x, w, b, out, R, C)
    ref = F.layer_norm(x.double(), (C,), w.double(), b.double(), 1e-5)
    xhat = F.layer_norm(x.double(), (C,), eps=1e-5)
    check(out, ref, 4 * C * U32 * (xhat.abs() * w.abs() + b.abs()), dtype, "layernorm")


# (dtype, rows, K, N): every value at least once, not the product. K = 264 and 1032 are not multiples of the
# 1024 weights a warp takes per round, N = 1001 and 72 leave a block part-empty; K = 3072 stages more than
# 48 KiB for LayerNorm, so only gemv_add and gemv_f32 take it (the wrapper sends such rows to cuBLAS).
GEMV_CASES = [(torch.float32, 1, 64, 200), (torch.bfloat16, 3, 264, 1001), (torch.float32, 5, 1032, 72),
              (torch.bfloat16, 8, 768, 264), (torch.float32, 8, 3072, 64)]


@pytest.mark.parametrize("dtype,R,K,N", GEMV_CASES)
def test_gemv(dtype, R, K, N, backend=CPU):
    k = kernels(backend, dtype, 64)
    torch.manual_seed(R + K)
    W, bias = (torch.randn(N, K) / K ** 0.5).to(dtype), torch.randn(N).to(dtype)
    x, lw, lb = torch.randn(R, K) * 2 + 0.5, torch.randn(K), torch.randn(K)
    grid = (fused._cdiv(N, 8),)
    h = F.layer_norm(x.double(), (K,), lw.double(), lb.double(), 1e-5)
    y = h @ W.double().t() + bias.double()
    # LayerNorm's own float32 error, then the dot product's: 6 K u (|h| + |ln_b|) |W| bounds both
    bound = 6 * dot_bound(h.abs() + lb.double().abs(), W) + U32 * bias.double().abs()
    if R * K * 4 <= fused.GEMV_SMEM_LIMIT:
        out = torch.full((R, N), float("nan")).to(dtype)
        k.gemv_ln_store(grid, 256, x, lw, lb, W, bias, out, R, N, K, smem=R * K * 4)
        check(out, y, bound, dtype, "gemv_ln_store")
        out.fill_(float("nan"))
        k.gemv_ln_gelu(grid, 256, x, lw, lb, W, bias, out, R, N, K, smem=R * K * 4)
        check(out, F.gelu(y), 1.2 * bound + 4 * U32 * y.abs(), dtype, "gemv_ln_gelu")  # |GELU'| < 1.13; erff's ulps
    inp, res = torch.randn(R, K).to(dtype), torch.randn(R, N)
    x2 = res.clone()
    k.gemv_add(grid, 256, inp, W, bias, x2, R, N, K)
    y2 = inp.double() @ W.double().t()
    check(x2, res.double() + y2 + bias.double(), dot_bound(inp, W) + 2 * U32 * (res.abs() + y2.abs() + 1),
          torch.float32, "gemv_add")  # into the float32 residual
    out32 = torch.full((R, N), float("nan"))
    k.gemv_f32(grid, 256, inp, W, out32, R, N, K)
    check(out32, y2, dot_bound(inp, W), torch.float32, "gemv_f32")


# (P, B, H, Hkv, n_prefix, pos, splits, head_dim): one token per row against [prefix | pos cached | itself].
# Covered: S = 1, no prefix; GQA 2:1 and 4:1; 48 prefix slots; a context that fills no split but the first;
# 16 splits of which 9 hold no key (the kernel's early return and its n_active - 1 ticket); head_dim 64 and 128.
ATTN_CASES = [(1, 1, 2, 2, 0, 0, 1, 64), (1, 1, 4, 4, 0, 100, 7, 128), (2, 3, 4, 2, 5, 70, 4, 64),
              (8, 1, 4, 1, 48, 129, 22, 128), (4, 2, 6, 3, 33, 31, 1, 64), (1, 2, 2, 2, 0, 200, 16, 128)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", range(len(ATTN_CASES)))
def test_attention(dtype, case, backend=None):
    P, B, H, Hkv, n_pre, pos, nsplit, hd = ATTN_CASES[case]
    k = kernels(backend or CpuKernels(block_order_seed=case), dtype, hd)  # blocks shuffled but in case 0
    torch.manual_seed(pos + hd)
    R, Tmax = P * B, 256
    qkv = torch.randn(R, (H + 2 * Hkv) * hd).to(dtype)
    pk, pv = torch.randn(P, Hkv, max(n_pre, 1), hd).to(dtype), torch.randn(P, Hkv, max(n_pre, 1), hd).to(dtype)
    ck, cv = torch.randn(R, Hkv, Tmax, hd).to(dtype), torch.randn(R, Hkv, Tmax, hd).to(dtype)
    scale = hd ** -0.5
    expected = reference_attention(qkv, pk, pv, ck, cv, pos, B, H, Hkv, n_pre, scale)
    # scores err by hd u |q| |k| each; the softmax turns that into a relative error of twice the largest, and the
    # online rescaling and the weighted sum over S keys add (S + hd) u: all relative to the values' size
    S = n_pre + pos + 1
    q = qkv.double().abs()[:, :H * hd].reshape(R, H, hd)
    bound = (2 * hd * U32 * scale * q.amax(-1) * max(ck.double().abs().max(), pk.double().abs().max(), 1.0) +
             4 * (S + hd) * U32) * max(cv.double().abs().max(), pv.double().abs().max(), 1.0)
    bound = bound.repeat_interleave(hd, dim=1)
    out = torch.full((R, H * hd), float("nan")).to(dtype)
    part = torch.full((R, H, nsplit, hd + 2), float("nan"))
    counters = torch.zeros(R, H, dtype=torch.int32)
    pos_t = torch.tensor([pos], dtype=torch.int32)
    for launch in range(2):  # twice: the counters must come back to zero and the result repeat
        k.attn_decode((nsplit, H, R), 128, qkv, pk, pv, ck, cv, pos_t, part, counters, out, B, H, Hkv, n_pre, Tmax,
                      nsplit, scale)
        check(out, expected, bound, dtype, f"attn_decode, launch {launch}")
        assert counters.eq(0).all(), "every (row, head) counter must be reset by the block that merged"
        out.fill_(float("nan"))
    kv = qkv.view(R, H + 2 * Hkv, hd)
    assert torch.equal(ck[:, :, pos], kv[:, H:H + Hkv]) and torch.equal(cv[:, :, pos], kv[:, H + Hkv:])


def test_the_launcher_reads_the_kernels_own_signature(tmp_path):
    """The argument table is parsed from the .cu text, and the CPU launcher unpacks void** params by the
    kernel's C signature: swap two ints in the source and the same Python call computes something else."""
    source = fused.kernel_source(torch.float32, 64)
    swapped = source.replace("float* __restrict__ out,\n    int R, int N, int K) {\n    gemv_body<false, 3, 1>",
                             "float* __restrict__ out,\n    int N, int R, int K) {\n    gemv_body<false, 3, 1>")
    assert swapped != source
    sig = fused.parse_signatures(swapped)["gemv_f32"]
    assert [n for _, n in sig[-3:]] == ["N", "R", "K"] and [t for t, _ in sig] == ["elem_t*", "elem_t*", "float*"] + \
        ["int"] * 3
    lib = ctypes.CDLL(build_library(cpu_source(swapped, fused.parse_signatures(swapped))))
    launch = launchers(lib, ["gemv_f32"])["gemv_f32"]
    R, N, K = 2, 16, 64
    inp, W = torch.randn(R, K), torch.randn(N, K)
    out = torch.zeros(R, N)
    args = fused.marshal("gemv_f32", torch.float32, (inp, W, out, R, N, K), "cpu")  # today's table: R, N, K
    launch((2, 1, 1), (256, 1, 1), 0, (ctypes.c_void_p * 6)(*[ctypes.addressof(v) for v in args]))
    assert not torch.allclose(out, inp @ W.t(), atol=1e-3), "a reordered signature must change the result"


# ------------------------------------------------------------------------------------------------
# 2. the whole decoder against model.py

def decode_against_model(model, dec, B, prompt, steps, tol, what):
    """Prefill (model.py itself) and `steps` fused decode steps, each against model.py's own cached decode."""
    gen = torch.Generator().manual_seed(5)
    V = model.config.vocab_size
    idx = torch.randint(0, V, (B, prompt), generator=gen)
    cache = KVCache(model, B)
    worst = 0.0
    with torch.no_grad():
        assert_close(dec.prefill(idx), model(idx, cache=cache)[0][:, -1], **tol, what=f"{what}: prefill")
        for step in range(steps):
            tok = torch.randint(0, V, (B, 1), generator=gen)
            ref, got = model(tok, cache=cache)[0][:, -1], dec.decode_step(tok)
            assert_close(got, ref, **tol, what=f"{what}: decode step {step}")
            worst = max(worst, (got - ref).abs().max().item())
    assert dec.counters.eq(0).all()
    return worst


# (P, B, n_kv_head, n_prefix, dtype, head_dim, shuffled): P 1/2/4/8, B 1-3, MHA and GQA, 1 and 48 prefix slots,
# fp32 and bf16, head_dim 64 and 128; rows P*B up to 8 take the hand GEMVs, 12 and 24 the cuBLAS-path layers.
DECODER_CASES = [(1, 1, None, 1, torch.float32, 64, False), (2, 3, 1, 1, torch.float32, 64, True),
                 (4, 2, None, 48, torch.bfloat16, 64, False), (8, 1, 2, 48, torch.float32, 128, False),
                 (4, 3, None, 1, torch.float32, 64, False), (8, 3, 1, 48, torch.bfloat16, 128, True),
                 (2, 1, None, 48, torch.bfloat16, 128, True)]
N_LAYER = 2


def bf16_tolerance(n_layer):
    """The bf16 decoder against model.py in float32 with the same bf16 weights: every tensor either path rounds to
    bf16 moves the logits by at most one bf16 unit roundoff of their size. The most roundings on a path are
    model.py's bf16 prefill, 10 a layer (ln_1, qkv, attention, c_proj, residual, ln_2, c_fc, GELU, c_proj,
    residual) and 7 after (ln_f, 5 in the aggregator, the head): the logits may differ by that many u_bf16."""
    return (10 * n_layer + 7) * U16


@pytest.mark.parametrize("case", range(len(DECODER_CASES)))
def test_decoder_matches_model_py(case):
    P, B, n_kv_head, n_prefix, dtype, hd, shuffled = DECODER_CASES[case]
    model = make_model(seed=P + B, n_embd=2 * hd, n_head=2, n_kv_head=n_kv_head, n_streams=P, n_prefix=n_prefix,
                       block_size=64, n_layer=N_LAYER, vocab_size=97)
    if dtype == torch.bfloat16:  # the reference: model.py in float32 on the decoder's (bf16-rounded) weights
        model = model.to(torch.bfloat16).float()
    dec = FusedDecoder(model, B, dtype=dtype, attn_splits=3, check=False, backend=SHUFFLED if shuffled else CPU)
    assert dec.gemv_rows == (P * B <= fused.RMAX) and not dec.cuda_graph
    if dtype == torch.float32:
        tol = dict(atol=fused.CHECK_TOL, rtol=fused.CHECK_TOL)  # what the self-check itself demands
    else:
        with torch.no_grad():
            scale = model(torch.zeros(B, 1, dtype=torch.long))[0].abs().max().item()
        tol = dict(atol=bf16_tolerance(N_LAYER) * scale, rtol=0)
    worst = decode_against_model(model, dec, B, prompt=40, steps=4, tol=tol, what=f"P={P} B={B} {dtype}")
    print(f"P={P} B={B} rows={P * B} {dtype} hd {hd}: worst |diff| {worst:.2e} (tolerance {tol['atol']:.2e})")


def test_one_cache_for_both_paths_without_per_row_prefix():
    """The decoder's cache is model.KVCache (real tokens only); model.py can continue from it, and back."""
    model = make_model(n_embd=64, n_head=2, n_streams=4, n_prefix=5, block_size=40)
    B = 2
    dec = FusedDecoder(model, B, dtype=torch.float32, attn_splits=2, check=False, backend=CPU)
    cfg = model.config
    assert isinstance(dec.cache, KVCache)
    assert dec.cache.k.shape == (cfg.n_layer, cfg.n_streams * B, cfg.n_kv_head, cfg.block_size, cfg.head_dim)
    torch.manual_seed(3)
    idx = torch.randint(0, cfg.vocab_size, (B, 6))
    toks = torch.randint(0, cfg.vocab_size, (B, 4))
    ref_cache = KVCache(model, B)
    with torch.no_grad():
        model(idx, cache=ref_cache)
        dec.prefill(idx)
        for i in range(2):  # two fused steps, then model.py continues on the decoder's own cache
            dec.decode_step(toks[:, i:i + 1])
            model(toks[:, i:i + 1], cache=ref_cache)
        assert dec.cache.pos == ref_cache.pos == 8
        assert_close(dec.cache.k[:, :, :, :8], ref_cache.k[:, :, :, :8], atol=1e-5, what="cached keys")
        ref = model(toks[:, 2:3], cache=ref_cache)[0][:, -1]
        mixed = model(toks[:, 2:3], cache=dec.cache)[0][:, -1]  # model.py on the fused cache
        assert_close(mixed, ref, atol=1e-4, what="model.py continuing from the fused cache")
        dec.pos.fill_(dec.cache.pos)  # and the kernels continue from what model.py appended
        assert_close(dec.decode_step(toks[:, 3:4]), model(toks[:, 3:4], cache=ref_cache)[0][:, -1], atol=1e-4,
                     what="fused continuing after model.py")


def test_unmodified_model_is_accepted_and_the_check_is_cached(monkeypatch):
    model = make_model(n_embd=64, n_head=2, n_streams=2, n_prefix=3, block_size=48)
    rng = torch.get_rng_state()
    dec, why = fused.fused_decoder_for(model, 2, torch.float32, 20, backend=CPU)
    assert dec is not None and "self-check passed" in why, why
    assert torch.equal(torch.get_rng_state(), rng), "the self-check moved the global RNG"
    calls = []
    monkeypatch.setattr(fused, "_check_weights", lambda *a: calls.append(a))
    assert fused.fused_decoder_for(model, 2, torch.float32, 20, backend=CPU)[0] is not None
    assert not calls, "a second decoder for the same config must reuse the cached self-check"


def test_the_cpu_backend_is_for_tests_only():
    """sample.py and bench.py ask fused_status / fused_decoder_for without a backend: the CPU never answers."""
    assert fused.fused_status("cpu")[0] is False
    model = make_model(n_embd=64, n_head=2, n_streams=2, n_prefix=3, block_size=48)
    dec, why = fused.fused_decoder_for(model, 1, torch.float32, 20)
    assert dec is None and "cuda" in why.lower()
    ok, why = fused.fused_status("cpu", CPU)
    assert ok and "for the CPU" in why


# ---- changes a course makes to model.py: followed or refused, through the real kernels

def rope(x, pos0):
    """Rotary position embedding of x (R, heads, T, hd) for positions pos0 .. pos0 + T - 1."""
    T, hd = x.size(2), x.size(3)
    inv = 1.0 / 10000 ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)
    ang = torch.arange(pos0, pos0 + T, dtype=torch.float32)[:, None] * inv  # (T, hd/2)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x1 * ang.cos() - x2 * ang.sin(), x1 * ang.sin() + x2 * ang.cos()], dim=-1).flatten(-2)


def rope_forward(self, x, cache=None):
    """CausalSelfAttention.forward with RoPE on queries and keys, as a student would add it."""
    R, T, C = x.size()
    kv = self.n_kv_head * self.head_dim
    q, k, v = self.c_attn(x).split([C, kv, kv], dim=2)
    pos0 = cache.pos if cache is not None else 0
    q = rope(q.view(R, T, self.n_head, self.head_dim).transpose(1, 2), pos0)
    k = rope(k.view(R, T, self.n_kv_head, self.head_dim).transpose(1, 2), pos0)
    k, v = self.keys_values(k, v.view(R, T, self.n_kv_head, self.head_dim).transpose(1, 2), cache)
    S = k.size(2)
    mask = torch.ones(T, S, dtype=torch.bool).tril(diagonal=S - T) if S > T > 1 else None
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=(S == T > 1))
    return self.c_proj(y.transpose(1, 2).reshape(R, T, C))


def relu_mlp_forward(self, x):
    return self.c_proj(F.relu(self.c_fc(x)))


class OneLinearAggregator(torch.nn.Module):
    """An aggregator a student might write: one Linear(P*C, P) instead of Linear -> SiLU -> Linear."""

    def __init__(self, P, C):
        super().__init__()
        self.P, self.proj = P, torch.nn.Linear(P * C, P)
        torch.nn.init.normal_(self.proj.weight, std=0.3)

    def forward(self, x):
        R, T, C = x.shape
        h = x.view(self.P, R // self.P, T, C)  # (P, B, T, C)
        w = self.proj(h.permute(1, 2, 0, 3).reshape(R // self.P, T, self.P * C)).float().softmax(-1)  # (B, T, P)
        return torch.einsum("btp,pbtc->btc", w.to(x.dtype), h)


@pytest.mark.parametrize("change,reason", [
    ("rope", "disagrees with model.py by"),            # class method patched: the self-check catches it
    ("relu_forward", "disagrees with model.py by"),    # MLP activation changed in MLP.forward
    ("relu_module", "is a ReLU"),                      # MLP activation swapped on the instance
    ("swiglu", "do not know"),                         # a parameter the kernels have never heard of
    ("hook", "forward hook"),                          # a hook on the instance: prefill would run it, the kernels not
    ("eps", "eps=0.5"),                                # a module option the kernels assume
])
def test_modified_models_are_refused_with_the_reason(monkeypatch, change, reason):
    import model as model_module
    m = make_model(n_embd=64, n_head=2, n_streams=2, n_prefix=3, block_size=48)
    if change == "rope":
        monkeypatch.setattr(model_module.CausalSelfAttention, "forward", rope_forward)
    elif change == "relu_forward":
        monkeypatch.setattr(model_module.MLP, "forward", relu_mlp_forward)
    elif change == "relu_module":
        m.transformer.h[1].mlp.gelu = torch.nn.ReLU()
    elif change == "swiglu":
        m.transformer.h[0].mlp.c_gate = torch.nn.Linear(64, 256)
    elif change == "hook":
        m.transformer.h[0].mlp.register_forward_hook(lambda mod, inp, out: out * 2)
    else:
        m.transformer.h[1].ln_1.eps = 0.5
    dec, why = fused.fused_decoder_for(m, 1, torch.float32, 20, backend=CPU)
    assert dec is None and reason in why, why
    with pytest.raises(fused.UserError, match=reason):
        FusedDecoder(m, 1, dtype=torch.float32, backend=CPU)


def test_without_the_self_check_a_rope_model_decodes_wrong(monkeypatch):
    """What the refusal protects against: with the check removed, the kernels silently ignore RoPE."""
    import model as model_module
    monkeypatch.setattr(model_module.CausalSelfAttention, "forward", rope_forward)
    monkeypatch.setattr(fused, "self_check", lambda *a, **k: (True, "check removed"))
    m = make_model(n_embd=64, n_head=2, n_streams=2, n_prefix=3, block_size=32)
    with torch.no_grad():  # sharper attention, so that where RoPE moves a key's score, the output moves
        for block in m.transformer.h:
            block.attn.c_attn.weight.mul_(10)
    dec, _ = fused.fused_decoder_for(m, 1, torch.float32, 28, backend=CPU)
    gen = torch.Generator().manual_seed(0)  # positions 16 and up: rotations far from the identity
    idx = torch.randint(0, m.config.vocab_size, (1, 16), generator=gen)
    cache = KVCache(m, 1)
    with torch.no_grad():
        m(idx, cache=cache)
        dec.prefill(idx)
        diffs = []
        for tok in torch.randint(0, m.config.vocab_size, (8, 1, 1), generator=gen):
            diffs.append((dec.decode_step(tok) - m(tok, cache=cache)[0][:, -1]).abs().max().item())
        assert max(diffs) > 10 * fused.CHECK_TOL, diffs


def test_a_one_linear_aggregator_is_followed():
    """The aggregator is the model's own module, called by the fused path: a changed one is used as is."""
    m = make_model(n_embd=64, n_head=2, n_streams=4, n_prefix=3, block_size=48)
    m.aggregator = OneLinearAggregator(4, 64)
    dec, why = fused.fused_decoder_for(m, 2, torch.float32, 20, backend=CPU)
    assert dec is not None, why
    decode_against_model(m, dec, 2, prompt=5, steps=3, tol=dict(atol=1e-4, rtol=1e-4), what="one-Linear aggregator")


@pytest.mark.parametrize("P", [1, 3])
def test_fused_path_follows_or_refuses_model_py(P):
    """The guarantee a course relies on, for whatever model.py is now (the README's exercises run it): through
    the real kernels, the fused decoder either refuses the model with a reason, or gives model.py's logits."""
    m = make_model(n_embd=64, n_head=2, n_streams=P, n_prefix=3, block_size=48)
    dec, why = fused.fused_decoder_for(m, 2, torch.float32, 20, backend=CPU)
    if dec is None:
        assert why, "a refusal must say why"
    else:
        decode_against_model(m, dec, 2, prompt=5, steps=3, tol=dict(atol=1e-4, rtol=1e-4), what="model.py as is")


# ------------------------------------------------------------------------------------------------
# 3. sanitizers, each in a Python started with its runtime preloaded

def sanitizer_workload(sanitize):
    """Every kernel once, and the whole decoder for a few steps, on the `sanitize` build: what the sanitizer
    tests run in a subprocess (ThreadSanitizer, ~10x slower than ASan, gets smaller shapes). A wrong result
    raises; a sanitizer report aborts the process."""
    torch.set_num_threads(1)
    quick, backend = sanitize == "thread", CpuKernels(sanitize)
    test_embed_and_layernorm(torch.float32, backend)
    test_gemv(*((torch.float32, 8, 64, 16) if quick else GEMV_CASES[1]), backend)
    test_attention(torch.float32, 2, backend)
    if not quick:
        test_attention(torch.bfloat16, 5, backend)
    model = make_model(n_embd=64 if quick else 128, n_head=2, n_kv_head=1, n_streams=4, n_prefix=5, block_size=64)
    dec = FusedDecoder(model, 2, dtype=torch.float32, attn_splits=3, check=False, backend=backend)
    decode_against_model(model, dec, 2, prompt=33, steps=2, tol=dict(atol=1e-4, rtol=1e-4), what=sanitize)
    print(f"sanitizer workload passed under {sanitize}")


# Faults planted in small kernels built and launched exactly like the real ones: a sanitizer that checks
# nothing fails here. Buffers come from libc's malloc, which the sanitizer runtime replaces (redzones).
PLANTED = r'''#line 1 "planted.cu"
extern "C" __global__ void read_past(const float* x, float* out, int n) { out[threadIdx.x] = x[n + threadIdx.x]; }
extern "C" __global__ void overflow(float* out, int big) { out[threadIdx.x] = (float)(big + (int)threadIdx.x); }
extern "C" __global__ void no_barrier(float* out) {
    __shared__ float s[64];
    s[threadIdx.x] = threadIdx.x;
    out[threadIdx.x] = s[(threadIdx.x + 1) % 64];  // a __syncthreads() belongs before this read
}
'''
PLANT = """
import ctypes, kernels_cpu, test_kernels_cpu
from kernels import fused
names = list(fused.parse_signatures(test_kernels_cpu.PLANTED))
launch = kernels_cpu.launchers(ctypes.CDLL(kernels_cpu.build_library(kernels_cpu.cpu_source(
    test_kernels_cpu.PLANTED, names), {sanitize!r})), names)[{kernel!r}]
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
buf = [ctypes.c_void_p(libc.malloc(64 * 4)) for _ in range(2)]
args = {args}
launch((1, 1, 1), (64, 1, 1), 0, (ctypes.c_void_p * len(args))(*[ctypes.addressof(a) for a in args]))
print("no report")
"""
# name -> (sanitizer, Python code, what its stderr must say: "" for a clean run)
SANITIZER_RUNS = {
    "address": ("address", "import test_kernels_cpu as t; t.sanitizer_workload('address')", ""),
    "thread": ("thread", "import test_kernels_cpu as t; t.sanitizer_workload('thread')", ""),
    "read_past": ("address", PLANT.format(sanitize="address", kernel="read_past",
                                          args="[buf[0], buf[1], ctypes.c_int(64)]"),
                  "AddressSanitizer: heap-buffer-overflow"),
    "overflow": ("address", PLANT.format(sanitize="address", kernel="overflow",
                                         args="[buf[0], ctypes.c_int(2**31 - 1)]"),
                 "runtime error: signed integer overflow"),
    "no_barrier": ("thread", PLANT.format(sanitize="thread", kernel="no_barrier", args="[buf[0]]"),
                   "ThreadSanitizer: data race"),
}


def runtime_missing(sanitize):
    return "" if runtime(sanitize) else (f"g++ has no {'libasan' if sanitize == 'address' else 'libtsan'} runtime "
                                         f"(Debian: g++ 12 brings libasan8 and libtsan2)")


@pytest.fixture(scope="module", autouse=True)
def sanitizer_runs(request):
    """Every selected sanitizer run started at once, when this module's first test starts: each is a subprocess
    (its Python started with the runtime preloaded) on one thread, so they overlap with one another and with
    the in-process tests; the tests at the end of this module collect them."""
    runs = {}
    selected = {item.callspec.params["name"] for item in request.session.items
                if getattr(item, "originalname", "") in ("test_kernels_and_decoder_under_sanitizer",
                                                          "test_a_planted_fault_is_reported")}
    if not missing():
        for name, (sanitize, code, _) in SANITIZER_RUNS.items():
            if name in selected and not runtime_missing(sanitize):
                out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
                proc = subprocess.Popen([sys.executable, "-c", IMPORTABLE + code], cwd=ROOT,
                                        env=sanitized_env(sanitize), stdout=out, stderr=err, text=True)
                runs[name] = (proc, out, err)
    yield runs
    for proc, out, err in runs.values():
        proc.kill()
        out.close(), err.close()


def collect(runs, name):
    """(return code, stdout, stderr) of a sanitizer run."""
    need(missing() or runtime_missing(SANITIZER_RUNS[name][0]))
    proc, out, err = runs[name]
    rc = proc.wait(timeout=300)
    out.seek(0), err.seek(0)
    return rc, out.read(), err.read()


@pytest.mark.parametrize("name", ["address", "thread"])
def test_kernels_and_decoder_under_sanitizer(sanitizer_runs, name):
    """Every kernel and the whole decoder, built with -fsanitize=address,undefined or thread: no report."""
    rc, out, err = collect(sanitizer_runs, name)
    last = (err.strip().splitlines() or ["no output"])[-1]
    assert rc == 0 and "workload passed" in out, f"exit {rc}: {last}\n{(out + err)[-6000:]}"
    assert "Sanitizer" not in err and "runtime error" not in err, err[-6000:]


@pytest.mark.parametrize("name", ["read_past", "overflow", "no_barrier"])
def test_a_planted_fault_is_reported(sanitizer_runs, name):
    rc, out, err = collect(sanitizer_runs, name)
    assert SANITIZER_RUNS[name][2] in err and "planted.cu" in err, (out + err)[-4000:]
    assert "no report" not in out and rc != 0
