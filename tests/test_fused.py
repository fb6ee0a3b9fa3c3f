"""
Tests of the fused decode path (kernels/). Three layers:

1. CPU: the wrapper's pure-Python logic (fused_status, source assembly, signature table vs the .cu
   signatures); every kernel program compiled for sm_80 and sm_90 by NVRTC from the pip wheel through
   kernels/nvrtc.py, with no CUDA toolkit in sight (no error, warning or spill), and by nvcc when found;
   a pure-torch EMULATION of every kernel (same launch shapes, same indexing, the same split-K online softmax and
   last-block merge as attention.cu) driving the real FusedDecoder wiring against model.GPT.
2. GPU, per kernel: each kernel against a torch computation, fresh random inputs, outputs poisoned with NaN.
3. GPU, end to end: FusedDecoder vs model.GPT (float32 reference) for P in {1,2,4,8}, B in {1,3}, MHA/GQA,
   head_dim 64/128, prefill and decode across split boundaries, greedy tokens, graph replay vs eager.

    python -m pytest tests/test_fused.py -q
"""
import ctypes
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile

import pytest
import torch
import torch.nn.functional as F
from util import ROOT, assert_close, tiny_config

from kernels import fused, nvrtc
from kernels.fused import FusedDecoder, fused_status
from model import GPT, KVCache

CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


def make_model(seed=0, device="cpu", **kw):
    """A small model whose head_dim the kernels support, every parameter off its trivial init value:
    prefixes large so the streams really differ, the aggregator's mix non-uniform, LayerNorms and biases
    non-trivial. Written by parameter name and shape alone, so a modified model.py (the exercises) works too."""
    torch.manual_seed(seed)
    model = GPT(tiny_config(**kw)).to(device).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".prefix_" in name:
                p.normal_(0, 1.0)
            elif name.startswith("aggregator.") or (p.dim() == 1 and name.endswith("bias")):
                p.normal_(0, 0.5 if name.startswith("aggregator.") else 0.2)
            elif p.dim() == 1:  # LayerNorm weights
                p.normal_(1.0, 0.2)
    return model


# ------------------------------------------------------------------------------------------------
# 1. CPU: pure-Python logic, sources, compile checks

def test_status_is_false_with_reason_on_cpu():
    ok, reason = fused_status("cpu")
    assert ok is False and "cuda" in reason.lower()


@pytest.mark.skipif(CUDA, reason="checks the no-GPU answer")
def test_status_without_cuda_and_decoder_refuses():
    ok, reason = fused_status("cuda")
    assert ok is False and reason
    with pytest.raises(RuntimeError, match="unavailable"):
        FusedDecoder(make_model(n_embd=64, n_head=2), 1, dtype=torch.float32)


def test_sources_exist_with_header_comments():
    for name in fused.SOURCES:
        path = os.path.join(fused.KERNEL_DIR, name)
        text = open(path).read()
        assert text.startswith("//"), f"{name} must open with a header comment"
        assert not re.search(r"^\s*#\s*include", text, re.M), f"{name}: NVRTC gets no headers, so no #include"
    src = fused.kernel_source(torch.bfloat16, 64)
    for kernel in fused.SIGNATURES:  # every kernel documents its launch shape and limits
        i = src.index(f" {kernel}(")
        comment = src[max(0, src.rfind("\n\n", 0, i)):i]
        assert "Launch" in comment or "Launch" in src[src.rfind("// ----", 0, i):i], f"{kernel}: no launch comment"


def test_signature_table_matches_cuda_source():
    for dtype in fused.DTYPES:
        assert fused.parse_signatures(fused.kernel_source(dtype, 128)) == fused.SIGNATURES


def test_marshal_types_every_argument():
    args = [torch.zeros(2, dtype=torch.bfloat16)] * 3 + [torch.zeros(2)] + [3, -4, 5]
    vals = fused.marshal("gemv_add", torch.bfloat16, args, require_cuda=False)
    assert [type(v) for v in vals] == [ctypes.c_void_p] * 4 + [ctypes.c_int] * 3
    assert [v.value for v in vals[4:]] == [3, -4, 5]
    att = [torch.zeros(1, dtype=torch.bfloat16)] * 5 + [torch.zeros(1, dtype=torch.int32), torch.zeros(1),
                                                        torch.zeros(1, dtype=torch.int32), torch.zeros(1, dtype=torch.bfloat16)]
    vals = fused.marshal("attn_decode", torch.bfloat16, att + [1] * 6 + [0.125], require_cuda=False)
    assert isinstance(vals[-1], ctypes.c_float) and vals[-1].value == 0.125 and isinstance(vals[-2], ctypes.c_int)
    with pytest.raises(TypeError, match="argument 3"):
        fused.marshal("gemv_add", torch.bfloat16, args[:3] + [torch.zeros(2, dtype=torch.bfloat16)] + args[4:], require_cuda=False)
    with pytest.raises(TypeError, match="int32"):
        fused.marshal("gemv_add", torch.bfloat16, args[:4] + [2.5, 1, 1], require_cuda=False)
    with pytest.raises(TypeError, match="expected 7"):
        fused.marshal("gemv_add", torch.bfloat16, args[:4], require_cuda=False)


# The toolkit-free build (kernels/nvrtc.py). .ci/run installs the nvidia-cuda-nvrtc wheel and sets
# PARSCALE_REQUIRE_NVRTC=1: there a missing libnvrtc fails these tests instead of skipping them.
WHEEL_NVRTC = [c for c in nvrtc.find_nvrtc(cuda_homes=[]) if os.path.isabs(c)]  # globs only: nothing is loaded
needs_nvrtc = pytest.mark.skipif(not WHEEL_NVRTC and os.environ.get("PARSCALE_REQUIRE_NVRTC") != "1",
                                 reason="no libnvrtc wheel (pip install nvidia-cuda-nvrtc; a CUDA torch brings one)")
ARCHS = ["sm_80", "sm_90"]  # A100, H100/H200

_COMPILE_ALL = """
import json, os, shutil, sys, torch
from kernels import fused
assert shutil.which("nvcc") is None and "CUDA_HOME" not in os.environ and "CUDA_PATH" not in os.environ
out = {}
for arch in %r:
    for dtype in fused.DTYPES:
        for head_dim in (64, 128):
            key = f"{arch} {str(dtype).removeprefix('torch.')} {head_dim}"
            try:
                c = fused.compile_kernels(dtype, head_dim, arch, ("--ptxas-options=-v",))
                out[key] = dict(error="", log=c.log, seconds=c.seconds, cubin=len(c.cubin), nvrtc=c.nvrtc.path)
            except Exception as e:
                out[key] = dict(error=f"{type(e).__name__}: {e}", log=getattr(e, "log", ""))
print(json.dumps(dict(builds=out, sys_path=sys.path)))
"""


@pytest.fixture(scope="module")
def toolkit_free_builds():
    """Every kernel program compiled in a fresh interpreter that sees no CUDA toolkit: CUDA_HOME, CUDA_PATH
    and LD_LIBRARY_PATH unset, no nvcc on PATH. Returns (builds by "arch dtype head_dim", its sys.path)."""
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_HOME", "CUDA_PATH", "LD_LIBRARY_PATH")}
    env["PATH"] = os.pathsep.join(d for d in env.get("PATH", "").split(os.pathsep)
                                  if d and not os.path.exists(os.path.join(d, "nvcc")))
    r = subprocess.run([sys.executable, "-c", _COMPILE_ALL % (ARCHS,)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    return result["builds"], result["sys_path"]


@needs_nvrtc
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_kernels_compile_without_a_toolkit(toolkit_free_builds, arch, dtype, head_dim):
    """kernel_source as the wrapper builds it, through NVRTC from the wheel: no error, no warning, no spill."""
    builds, sys_path = toolkit_free_builds
    b = builds[f"{arch} {dtype} {head_dim}"]
    assert not b["error"], f"{b['error']}\n{b['log']}"
    lib = b["nvrtc"]  # from a wheel: <an entry of the subprocess's sys.path>/nvidia/<package>/lib/libnvrtc.so.N
    assert re.fullmatch(r"libnvrtc\.so\.\d+", os.path.basename(lib)) and os.path.basename(os.path.dirname(lib)) == "lib"
    assert any(os.path.dirname(lib).startswith(os.path.join(os.path.abspath(p), "nvidia", "")) for p in sys_path if p), lib
    assert b["cubin"] > 0
    # with --ptxas-options=-v the log is ptxas's report and nothing else: a warning or remark fails here
    other = [ln for ln in b["log"].splitlines() if not ln.startswith("ptxas") or re.search(r"warning|error", ln, re.I)]
    assert not other, "\n".join(other)
    usage = nvrtc.ptxas_usage(b["log"])
    assert set(usage) == set(fused.SIGNATURES), usage
    spills = {k: u for k, u in usage.items() if u["spill_stores"] or u["spill_loads"]}
    assert not spills, spills
    print(f"{arch} {dtype} head_dim {head_dim}: {b['seconds']:.2f} s, {b['cubin'] // 1024} KiB, {lib}; registers: "
          + ", ".join(f"{k} {u['registers']}" for k, u in sorted(usage.items())))


@needs_nvrtc
def test_a_compile_error_becomes_the_reason_and_warnings_reach_the_log(monkeypatch):
    """The same helpers as the real build: a broken kernel comes back as fused_status's one-line reason."""
    monkeypatch.setattr(fused, "kernel_source", lambda dtype, head_dim: 'extern "C" __global__ void embed() { no_such_name = 1; }\n')
    monkeypatch.setattr(fused, "compile_kernels", fused.compile_kernels.__wrapped__)  # no cached good build
    monkeypatch.setattr(fused, "_MODULES", {})
    monkeypatch.setattr(fused, "device_arch", lambda index: "sm_90")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # past the CPU answer, into build()
    ok, why = fused.fused_status("cuda:0")
    assert not ok and "\n" not in why
    assert "kernel build failed" in why and 'identifier "no_such_name" is undefined' in why and "sm_90" in why, why
    c = nvrtc.compile_program('#warning left in by mistake\nextern "C" __global__ void k() {}\n', "sm_90")
    assert "warning" in c.log and "left in by mistake" in c.log


def test_nvrtc_search_order(tmp_path):
    """sys.path's nvidia/*/lib (torch's CUDA major first, then newest), then CUDA_HOME, then the loader."""
    def touch(*parts):
        path = tmp_path.joinpath(*parts)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
        return str(path)
    site_a = [touch("a", "nvidia", "cuda_nvrtc", "lib", "libnvrtc.so.12"), touch("a", "nvidia", "cu13", "lib", "libnvrtc.so.13")]
    site_b = touch("b", "nvidia", "cu13", "lib", "libnvrtc.so.13")
    for decoy in ("libnvrtc.alt.so.13", "libnvrtc-builtins.so.13.0"):
        touch("a", "nvidia", "cu13", "lib", decoy)
    toolkit = touch("cuda", "lib64", "libnvrtc.so.13")
    (tmp_path / "cuda" / "lib").symlink_to(tmp_path / "cuda" / "lib64")  # the same file twice: listed once
    paths = [str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "none")]
    homes = [str(tmp_path / "cuda")]
    newest_first = [site_a[1], site_a[0], site_b, toolkit, "libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"]
    assert nvrtc.find_nvrtc(paths, homes, cuda_major=13) == newest_first
    assert nvrtc.find_nvrtc(paths, homes) == newest_first  # a CPU torch has no CUDA version
    assert nvrtc.find_nvrtc(paths, homes, cuda_major=12) == [site_a[0], site_a[1], site_b, toolkit, "libnvrtc.so.12",
                                                             "libnvrtc.so.13", "libnvrtc.so"]
    with pytest.raises(nvrtc.BuildError, match=r"no usable libnvrtc .*/b/nvidia/cu13/lib/libnvrtc\.so\.13 does not load"):
        nvrtc.open_nvrtc([site_b, "libnvrtc.so.0"])  # an empty file, and a name the loader does not know
    with pytest.raises(nvrtc.BuildError, match=r"\(none found\); .*pip install nvidia-cuda-nvrtc"):
        nvrtc.open_nvrtc([])


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc")
def test_nvcc_compiles_without_spills():
    with tempfile.TemporaryDirectory() as d:
        for dtype in fused.DTYPES:
            path = os.path.join(d, "k.cu")
            open(path, "w").write(fused.kernel_source(dtype, 128))
            r = subprocess.run(["nvcc", "-arch=sm_90", "-c", "-Xptxas", "-v", path, "-o", os.path.join(d, "k.o")],
                               capture_output=True, text=True)
            assert r.returncode == 0, r.stderr
            assert "error" not in r.stderr.lower()
            spills = [ln for ln in r.stderr.splitlines() if "spill" in ln and not ln.strip().startswith("0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads")]
            assert not spills, "\n".join(spills)


# ------------------------------------------------------------------------------------------------
# 1b. CPU emulation of every kernel, launched exactly as the wrapper launches the real ones

class Emulated:
    """Pure-torch stand-ins for the kernels: same arguments, same grid checks, same algorithms."""

    def __init__(self, dtype):
        self.dtype = dtype
        self.calls = []

    def _check(self, name, args):
        fused.marshal(name, self.dtype, args, require_cuda=False)
        self.calls.append(name)

    def embed(self, grid, block, tok, pos, wte, wpe, x, B, C):
        self._check("embed", (tok, pos, wte, wpe, x, B, C))
        R = x.size(0)
        assert grid == (fused._cdiv(C, 256), R) and block == 256
        p = int(pos.item())
        for r in range(R):
            x[r] = wte[tok[r % B]].float() + wpe[p].float()

    def layernorm(self, grid, block, x, w, b, out, R, C):
        self._check("layernorm", (x, w, b, out, R, C))
        assert grid[0] * 8 >= R and block == 256
        out.view(-1)[: R * C] = F.layer_norm(x.view(-1)[: R * C].view(R, C), (C,), w, b, 1e-5).to(out.dtype).view(-1)

    def _gemv(self, name, grid, block, inp, W, bias, R, N, K):
        assert grid[0] * 8 >= N and (grid[0] - 1) * 8 < N and block == 256 and R <= fused.RMAX and K % 8 == 0
        y = inp.float() @ W.view(N, K).float().t()
        return y + bias.float() if bias is not None else y

    def gemv_ln_store(self, grid, block, x, lw, lb, W, bias, out, R, N, K, smem=0):
        self._check("gemv_ln_store", (x, lw, lb, W, bias, out, R, N, K))
        assert smem == R * K * 4 <= fused.GEMV_SMEM_LIMIT
        h = F.layer_norm(x.view(-1)[: R * K].view(R, K), (K,), lw, lb, 1e-5)
        out.view(-1)[: R * N] = self._gemv("gemv_ln_store", grid, block, h, W, bias, R, N, K).to(out.dtype).view(-1)

    def gemv_ln_gelu(self, grid, block, x, lw, lb, W, bias, out, R, N, K, smem=0):
        self._check("gemv_ln_gelu", (x, lw, lb, W, bias, out, R, N, K))
        assert smem == R * K * 4 <= fused.GEMV_SMEM_LIMIT
        h = F.layer_norm(x.view(-1)[: R * K].view(R, K), (K,), lw, lb, 1e-5)
        out.view(-1)[: R * N] = F.gelu(self._gemv("gemv_ln_gelu", grid, block, h, W, bias, R, N, K)).to(out.dtype).view(-1)

    def gemv_add(self, grid, block, inp, W, bias, x, R, N, K, smem=0):
        self._check("gemv_add", (inp, W, bias, x, R, N, K))
        x.view(-1)[: R * N] += self._gemv("gemv_add", grid, block, inp.view(-1)[: R * K].view(R, K), W, bias, R, N, K).view(-1)

    def gemv_f32(self, grid, block, inp, W, out, R, N, K, smem=0):
        self._check("gemv_f32", (inp, W, out, R, N, K))
        out.view(-1)[: R * N] = self._gemv("gemv_f32", grid, block, inp.view(-1)[: R * K].view(R, K), W, None, R, N, K).view(-1)

    def attn_decode(self, grid, block, qkv, pk, pv, ck, cv, pos_t, part, counters, out, B, H, Hkv, n_pre, Tmax, nsplit, scale):
        self._check("attn_decode", (qkv, pk, pv, ck, cv, pos_t, part, counters, out, B, H, Hkv, n_pre, Tmax, nsplit, scale))
        hd = ck.size(-1)
        R = qkv.size(0)
        assert grid == (nsplit, H, R) and block == 128 and hd % 32 == 0
        emulate_attn_decode(qkv, pk, pv, ck, cv, pos_t, part, counters, out, B, H, Hkv, n_pre, Tmax, nsplit, scale, hd)


def emulate_attn_decode(qkv, pk, pv, ck, cv, pos_t, part, counters, out, B, H, Hkv, n_pre, Tmax, nsplit, scale, hd):
    """attention.cu, block by block and warp by warp, in float32 torch (lanes vectorised)."""
    WARPS, NEG = 4, float("-inf")
    R = qkv.size(0)
    qkv_f, flat_ck, flat_cv = qkv.view(R, -1), ck.view(-1), cv.view(-1)
    pos = int(pos_t.item())
    S, group = n_pre + pos + 1, H // Hkv
    per = ((S + nsplit - 1) // nsplit + 31) & ~31
    blocks = [(split, h, r) for r in range(R) for h in range(H) for split in range(nsplit)]
    # appends happen in split 0 blocks; nothing in this launch reads slot `pos`, so do them first
    for split, h, r in blocks:
        if split == 0 and h % group == 0:
            hk, off = h // group, ((r * Hkv + h // group) * Tmax + pos) * hd
            flat_ck[off: off + hd] = qkv_f[r, (H + hk) * hd:(H + hk + 1) * hd]
            flat_cv[off: off + hd] = qkv_f[r, (H + Hkv + hk) * hd:(H + Hkv + hk + 1) * hd]
    order = torch.randperm(len(blocks)).tolist()  # blocks finish in any order: the last one merges
    for bi in order:
        split, h, r = blocks[bi]
        hk, s = h // group, r // B
        k_new = qkv_f[r, (H + hk) * hd:(H + hk + 1) * hd].float()
        v_new = qkv_f[r, (H + Hkv + hk) * hd:(H + Hkv + hk + 1) * hd].float()

        def row(j, pre, cache, fresh):  # ctx_row
            if j < n_pre:
                return pre.view(-1, Hkv, n_pre, hd)[s, hk, j].float()
            if j < n_pre + pos:
                return cache.view(R, Hkv, Tmax, hd)[r, hk, j - n_pre].float()
            return fresh

        q = qkv_f[r, h * hd:(h + 1) * hd].float() * scale
        s0, s1 = split * per, min(S, split * per + per)
        wm, wl, wacc = [NEG] * WARPS, [0.0] * WARPS, [torch.zeros(hd) for _ in range(WARPS)]
        for w in range(WARPS):
            m, l, acc = torch.tensor(NEG), torch.tensor(0.0), torch.zeros(hd)
            base = s0 + w * 32
            while base < s1:
                n_valid = min(32, s1 - base)
                keys = torch.stack([row(base + i, pk, ck, k_new) for i in range(n_valid)])
                score = keys @ q
                m_new = torch.maximum(m, score.max())
                alpha = torch.exp(m - m_new)
                p = torch.exp(score - m_new)
                l = l * alpha + p.sum()
                vals = torch.stack([row(base + i, pv, cv, v_new) for i in range(n_valid)])
                acc = acc * alpha + p @ vals
                m = m_new
                base += WARPS * 32
            wm[w], wl[w], wacc[w] = float(m), float(l), acc
        M = max(wm)
        f = [0.0 if mw == NEG else math.exp(mw - M) for mw in wm]
        L = sum(lw * fw for lw, fw in zip(wl, f))
        a = sum(accw * fw for accw, fw in zip(wacc, f))
        if nsplit == 1:
            out.view(R, H, hd)[r, h] = (a / L).to(out.dtype)
            continue
        mine = part.view(R, H, nsplit, hd + 2)[r, h, split]
        mine[:hd], mine[hd], mine[hd + 1] = a, M, L
        c = counters.view(R, H)
        last = int(c[r, h]) == nsplit - 1
        c[r, h] += 1
        if not last:
            continue
        allp = part.view(R, H, nsplit, hd + 2)[r, h]
        mi = allp[:, hd]
        Mg = mi.max()
        wts = torch.where(mi == NEG, torch.zeros_like(mi), torch.exp(mi - Mg))
        Lg = (allp[:, hd + 1] * wts).sum()
        out.view(R, H, hd)[r, h] = ((allp[:, :hd] * wts[:, None]).sum(0) / Lg).to(out.dtype)
        c[r, h] = 0


def reference_attention(qkv, pk, pv, ck, cv, pos, B, H, Hkv, n_pre, scale):
    """Plain softmax attention of each row's new query over [prefix | cache[:pos] | new k/v]."""
    R, hd = qkv.size(0), ck.size(-1)
    q, k, v = qkv.float().split([H * hd, Hkv * hd, Hkv * hd], dim=1)
    out = torch.empty(R, H, hd)
    for r in range(R):
        for h in range(H):
            hk = h // (H // Hkv)
            parts_k = [ck[r, hk, :pos].float(), k[r, hk * hd:(hk + 1) * hd][None]]
            parts_v = [cv[r, hk, :pos].float(), v[r, hk * hd:(hk + 1) * hd][None]]
            if n_pre:
                parts_k.insert(0, pk[r // B, hk].float())
                parts_v.insert(0, pv[r // B, hk].float())
            K, V = torch.cat(parts_k), torch.cat(parts_v)
            att = (K @ (q[r, h * hd:(h + 1) * hd] * scale)).softmax(0)
            out[r, h] = att @ V
    return out.view(R, H * hd)


@pytest.mark.parametrize("P,B,H,Hkv,n_pre,pos,nsplit", [
    (1, 1, 2, 2, 0, 0, 1), (1, 1, 2, 2, 0, 40, 3), (2, 3, 4, 2, 5, 70, 4), (4, 1, 4, 1, 7, 130, 5),
    (2, 2, 2, 2, 33, 31, 2), (1, 2, 2, 2, 0, 200, 16),  # 16 splits of 32 over 201 keys: some splits empty
])
def test_emulated_attention_matches_reference(P, B, H, Hkv, n_pre, pos, nsplit):
    torch.manual_seed(pos + nsplit)
    hd, Tmax, R = 32, 256, P * B
    qkv = torch.randn(R, (H + 2 * Hkv) * hd)
    pk, pv = torch.randn(P, Hkv, max(n_pre, 1), hd), torch.randn(P, Hkv, max(n_pre, 1), hd)
    ck, cv = torch.randn(R, Hkv, Tmax, hd), torch.randn(R, Hkv, Tmax, hd)
    expected = reference_attention(qkv, pk, pv, ck.clone(), cv.clone(), pos, B, H, Hkv, n_pre, hd ** -0.5)
    out = torch.full((R, H * hd), float("nan"))
    part, counters = torch.full((R, H, nsplit, hd + 2), float("nan")), torch.zeros(R, H, dtype=torch.int32)
    emulate_attn_decode(qkv, pk, pv, ck, cv, torch.tensor([pos], dtype=torch.int32), part, counters, out,
                        B, H, Hkv, n_pre, Tmax, nsplit, hd ** -0.5, hd)
    assert_close(out, expected, atol=1e-5, rtol=1e-4, what="emulated split attention")
    assert counters.eq(0).all(), "every (row, head) counter must be reset by its last block"
    k_new = qkv[:, H * hd:(H + Hkv) * hd].view(R, Hkv, hd)
    assert torch.equal(ck[:, :, pos], k_new), "the new key must be appended at slot pos"


@pytest.mark.parametrize("P,B,n_kv_head,n_prefix", [(1, 1, None, 3), (2, 3, None, 5), (4, 3, 1, 3), (8, 1, 2, 4)])
def test_emulated_decoder_matches_reference(monkeypatch, P, B, n_kv_head, n_prefix):
    """The whole FusedDecoder wiring (buffers, strides, argument order, both layer paths) on CPU."""
    model = make_model(n_embd=64, n_head=2, n_kv_head=n_kv_head, n_streams=P, n_prefix=n_prefix, block_size=48)
    emu = Emulated(torch.float32)
    monkeypatch.setattr(fused, "fused_status", lambda device=None: (True, "emulated on CPU"))
    monkeypatch.setattr(fused, "build", lambda dtype, head_dim, device=None: emu)
    dec = FusedDecoder(model, B, dtype=torch.float32, cuda_graph=False, attn_splits=3)
    assert dec.gemv_rows == (P * B <= fused.RMAX)
    torch.manual_seed(1)
    idx = torch.randint(0, model.config.vocab_size, (B, 7))
    cache = KVCache(model, B)
    with torch.no_grad():
        ref, _ = model(idx, cache=cache)
        assert_close(dec.prefill(idx), ref[:, -1], atol=1e-4, rtol=1e-4, what="prefill logits")
        for step in range(40):  # 7 + 40 real tokens plus the prefix: crosses 32-key chunks and splits
            tok = torch.randint(0, model.config.vocab_size, (B, 1))
            ref, _ = model(tok, cache=cache)
            assert_close(dec.decode_step(tok), ref[:, -1], atol=1e-4, rtol=1e-4, what=f"decode step {step}")
    assert dec.counters.eq(0).all()
    assert "attn_decode" in emu.calls and ("gemv_ln_store" in emu.calls) == dec.gemv_rows


@pytest.fixture
def emulated(monkeypatch):
    """The fused path on CPU: kernels replaced by their emulation, the self-check cache emptied."""
    emu = Emulated(torch.float32)
    monkeypatch.setattr(fused, "fused_status", lambda device=None: (True, "emulated on CPU"))
    monkeypatch.setattr(fused, "build", lambda dtype, head_dim, device=None: emu)
    monkeypatch.setattr(fused, "_SELF_CHECKS", {})
    return emu


def test_one_cache_for_both_paths_without_per_row_prefix(emulated):
    """The decoder's cache is model.KVCache (real tokens only); model.py can continue from it, and back."""
    model = make_model(n_embd=64, n_head=2, n_streams=4, n_prefix=5, block_size=40)
    B = 2
    dec = FusedDecoder(model, B, dtype=torch.float32, cuda_graph=False, attn_splits=2)
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


def test_unmodified_model_is_accepted_and_the_check_is_cached(emulated, monkeypatch):
    model = make_model(n_embd=64, n_head=2, n_streams=2, n_prefix=3, block_size=32)
    rng = torch.get_rng_state()
    dec, why = fused.fused_decoder_for(model, 2, torch.float32, 20, cuda_graph=False)
    assert dec is not None and "self-check passed" in why
    assert torch.equal(torch.get_rng_state(), rng), "the self-check moved the global RNG"
    calls = []
    monkeypatch.setattr(fused, "_check_weights", lambda *a: calls.append(a))
    assert fused.fused_decoder_for(model, 2, torch.float32, 20, cuda_graph=False)[0] is not None
    assert not calls, "a second decoder for the same config must reuse the cached self-check"


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
def test_modified_models_are_refused_with_the_reason(emulated, monkeypatch, change, reason):
    import model as model_module
    m = make_model(n_embd=64, n_head=2, n_streams=2, n_prefix=3, block_size=32)
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
    dec, why = fused.fused_decoder_for(m, 1, torch.float32, 20, cuda_graph=False)
    assert dec is None and reason in why, why
    with pytest.raises(fused.UserError, match=reason):
        FusedDecoder(m, 1, dtype=torch.float32, cuda_graph=False)


def test_without_the_self_check_a_rope_model_decodes_wrong(emulated, monkeypatch):
    """What the refusal protects against: with the check removed, the kernels silently ignore RoPE."""
    import model as model_module
    monkeypatch.setattr(model_module.CausalSelfAttention, "forward", rope_forward)
    monkeypatch.setattr(fused, "self_check", lambda *a, **k: (True, "check removed"))
    m = make_model(n_embd=64, n_head=2, n_streams=2, n_prefix=3, block_size=32)
    with torch.no_grad():  # sharper attention, so that where RoPE moves a key's score, the output moves
        for block in m.transformer.h:
            block.attn.c_attn.weight.mul_(10)
    dec, _ = fused.fused_decoder_for(m, 1, torch.float32, 28, cuda_graph=False)
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


def test_a_one_linear_aggregator_is_followed(emulated):
    """The aggregator is the model's own module, called by the fused path: a changed one is used as is."""
    m = make_model(n_embd=64, n_head=2, n_streams=4, n_prefix=3, block_size=32)
    m.aggregator = OneLinearAggregator(4, 64)
    dec, why = fused.fused_decoder_for(m, 2, torch.float32, 20, cuda_graph=False)
    assert dec is not None, why
    assert_decodes_like_model(dec, m)


def assert_decodes_like_model(dec, m, B=2, prompt=5, steps=4):
    """The fused decoder's prefill and decode logits against model.py's through its own KVCache."""
    idx = torch.randint(0, m.config.vocab_size, (B, prompt))
    cache = KVCache(m, B)
    with torch.no_grad():
        assert_close(dec.prefill(idx), m(idx, cache=cache)[0][:, -1], atol=1e-4, what="prefill")
        for step in range(steps):
            tok = torch.randint(0, m.config.vocab_size, (B, 1))
            assert_close(dec.decode_step(tok), m(tok, cache=cache)[0][:, -1], atol=1e-4, what=f"decode step {step}")


@pytest.mark.parametrize("P", [1, 3])
def test_fused_path_follows_or_refuses_model_py(emulated, P):
    """The guarantee a course relies on, for whatever model.py is now (the README's exercises run it):
    the fused decoder either refuses the model with a reason, or gives model.py's logits."""
    m = make_model(n_embd=64, n_head=2, n_streams=P, n_prefix=3, block_size=32)
    dec, why = fused.fused_decoder_for(m, 2, torch.float32, 20, cuda_graph=False)
    if dec is None:
        assert why, "a refusal must say why"
    else:
        assert_decodes_like_model(dec, m)


# ------------------------------------------------------------------------------------------------
# 2. GPU: every kernel against torch, random inputs, NaN-poisoned outputs

DT = [torch.float32, torch.bfloat16]
TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def bf16_round(t, dtype):
    return t.to(dtype).float()


@gpu
@pytest.mark.parametrize("dtype", DT)
def test_kernel_embed_and_layernorm(dtype):
    k = fused.build(dtype, 64)
    torch.manual_seed(0)
    B, P, C, V, T = 3, 2, 200, 50, 17
    wte, wpe = torch.randn(V, C, device="cuda", dtype=dtype), torch.randn(T, C, device="cuda", dtype=dtype)
    tok = torch.randint(0, V, (B,), device="cuda")
    pos = torch.tensor([11], device="cuda", dtype=torch.int32)
    x = torch.full((P * B, C), float("nan"), device="cuda")
    k.embed((fused._cdiv(C, 256), P * B), 256, tok, pos, wte, wpe, x, B, C)
    assert_close(x, (wte[tok].float() + wpe[11].float()).repeat(P, 1), atol=0, rtol=0, what="embed")
    R = 11
    x = torch.randn(R, C, device="cuda") * 3 + 1
    w, b = torch.randn(C, device="cuda"), torch.randn(C, device="cuda")
    out = torch.full((R, C), float("nan"), device="cuda", dtype=dtype)
    k.layernorm((fused._cdiv(R, 8),), 256, x, w, b, out, R, C)
    assert_close(out.float(), bf16_round(F.layer_norm(x, (C,), w, b, 1e-5), dtype), **TOL[dtype], what="layernorm")


@gpu
@pytest.mark.parametrize("dtype", DT)
@pytest.mark.parametrize("R", [1, 3, 8])
@pytest.mark.parametrize("K,N", [(64, 200), (768, 2304), (3072, 768), (264, 1001)])
def test_kernel_gemv(dtype, R, K, N):
    k = fused.build(dtype, 64)
    torch.manual_seed(R + K)
    W = (torch.randn(N, K, device="cuda") / K ** 0.5).to(dtype)
    bias = torch.randn(N, device="cuda").to(dtype)
    x = torch.randn(R, K, device="cuda") * 2 + 0.5
    lw, lb = torch.randn(K, device="cuda"), torch.randn(K, device="cuda")
    grid = (fused._cdiv(N, 8),)
    h = F.layer_norm(x, (K,), lw, lb, 1e-5)
    tol = dict(atol=2e-4, rtol=2e-4) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    if R * K * 4 <= fused.GEMV_SMEM_LIMIT:
        out = torch.full((R, N), float("nan"), device="cuda", dtype=dtype)
        k.gemv_ln_store(grid, 256, x, lw, lb, W, bias, out, R, N, K, smem=R * K * 4)
        assert_close(out.float(), h @ W.float().t() + bias.float(), **tol, what="gemv_ln_store")
        out.fill_(float("nan"))
        k.gemv_ln_gelu(grid, 256, x, lw, lb, W, bias, out, R, N, K, smem=R * K * 4)
        assert_close(out.float(), F.gelu(h @ W.float().t() + bias.float()), **tol, what="gemv_ln_gelu")
    inp = torch.randn(R, K, device="cuda").to(dtype)
    res = torch.randn(R, N, device="cuda")
    x2 = res.clone()
    k.gemv_add(grid, 256, inp, W, bias, x2, R, N, K)
    assert_close(x2, res + inp.float() @ W.float().t() + bias.float(), **tol, what="gemv_add")
    out32 = torch.full((R, N), float("nan"), device="cuda")
    k.gemv_f32(grid, 256, inp, W, out32, R, N, K)
    assert_close(out32, inp.float() @ W.float().t(), **tol, what="gemv_f32")


@gpu
@pytest.mark.parametrize("dtype", DT)
@pytest.mark.parametrize("hd", [64, 128])
@pytest.mark.parametrize("P,B,H,Hkv,n_pre,pos,nsplit", [
    (1, 1, 2, 2, 0, 0, 1), (1, 1, 4, 4, 0, 100, 7), (2, 3, 4, 2, 5, 70, 4), (8, 1, 4, 1, 48, 129, 22),
    (4, 2, 6, 3, 33, 31, 1), (1, 2, 2, 2, 0, 500, 64)])
def test_kernel_attention(dtype, hd, P, B, H, Hkv, n_pre, pos, nsplit):
    k = fused.build(dtype, hd)
    torch.manual_seed(pos + hd)
    R, Tmax = P * B, 600
    dev = dict(device="cuda", dtype=dtype)
    qkv = torch.randn(R, (H + 2 * Hkv) * hd, **dev)
    pk, pv = torch.randn(P, Hkv, max(n_pre, 1), hd, **dev), torch.randn(P, Hkv, max(n_pre, 1), hd, **dev)
    ck, cv = torch.randn(R, Hkv, Tmax, hd, **dev), torch.randn(R, Hkv, Tmax, hd, **dev)
    scale = hd ** -0.5
    expected = reference_attention(qkv.cpu(), pk.cpu(), pv.cpu(), ck.cpu(), cv.cpu(), pos, B, H, Hkv, n_pre, scale)
    out = torch.full((R, H * hd), float("nan"), **dev)
    part = torch.full((R, H, nsplit, hd + 2), float("nan"), device="cuda")
    counters = torch.zeros(R, H, device="cuda", dtype=torch.int32)
    pos_t = torch.tensor([pos], device="cuda", dtype=torch.int32)
    for rep in range(2):  # twice: the counters must come back to zero and the result must repeat
        k.attn_decode((nsplit, H, R), 128, qkv, pk, pv, ck, cv, pos_t, part, counters, out, B, H, Hkv, n_pre, Tmax,
                      nsplit, scale)
        torch.cuda.synchronize()
        tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
        assert_close(out.float().cpu(), expected, **tol, what=f"attn_decode (launch {rep})")
        assert counters.eq(0).all(), "counters not reset"
        out.fill_(float("nan"))
    kv = qkv.view(R, H + 2 * Hkv, hd)
    assert torch.equal(ck[:, :, pos], kv[:, H:H + Hkv]) and torch.equal(cv[:, :, pos], kv[:, H + Hkv:])


# ------------------------------------------------------------------------------------------------
# 3. GPU: FusedDecoder against model.GPT (float32 reference)

def check_decoder(P, B, dtype, n_embd, n_head, n_kv_head=None, n_prefix=5, prompt=9, steps=60, graph=False,
                  splits=None, atol=None):
    model = make_model(seed=P + B, device="cuda", n_embd=n_embd, n_head=n_head, n_kv_head=n_kv_head, n_streams=P,
                       n_prefix=n_prefix, block_size=prompt + steps + 4, n_layer=2, vocab_size=97)
    dec = FusedDecoder(model, B, dtype=dtype, cuda_graph=graph, attn_splits=splits)
    tol = dict(atol=2e-4, rtol=2e-4) if dtype == torch.float32 else dict(atol=atol or 0.1, rtol=0.05)
    torch.manual_seed(5)
    idx = torch.randint(0, 97, (B, prompt), device="cuda")
    cache = KVCache(model, B)
    with torch.no_grad():
        ref, _ = model(idx, cache=cache)
        assert_close(dec.prefill(idx), ref[:, -1], **tol, what=f"prefill P={P} B={B} {dtype}")
        for step in range(steps):
            tok = torch.randint(0, 97, (B, 1), device="cuda")
            ref, _ = model(tok, cache=cache)
            assert_close(dec.decode_step(tok), ref[:, -1], **tol, what=f"decode step {step} P={P} B={B} {dtype}")
    return model, dec


@gpu
@pytest.mark.parametrize("P", [1, 2, 4, 8])
@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("heads", [(128, 2, None), (256, 4, 2), (256, 2, None)])  # hd 64 MHA, hd 64 GQA, hd 128
def test_decoder_fp32_matches_reference(P, B, heads):
    n_embd, n_head, n_kv_head = heads
    check_decoder(P, B, torch.float32, n_embd, n_head, n_kv_head, steps=70)  # 9+70+5 keys: crosses 32-key chunks


@gpu
@pytest.mark.parametrize("P,B,splits", [(1, 1, None), (4, 3, None), (8, 1, 3), (2, 3, 1)])
def test_decoder_bf16_close_to_reference(P, B, splits):
    check_decoder(P, B, torch.bfloat16, 256, 4, 2, steps=40, splits=splits)


@gpu
@pytest.mark.parametrize("P,B", [(1, 1), (4, 1), (2, 3), (8, 3)])
@pytest.mark.parametrize("dtype", DT)
def test_graph_replay_equals_eager(P, B, dtype):
    model = make_model(seed=3, device="cuda", n_embd=128, n_head=2, n_streams=P, n_prefix=5, block_size=64)
    eager = FusedDecoder(model, B, dtype=dtype, cuda_graph=False)
    graph = FusedDecoder(model, B, dtype=dtype, cuda_graph=True)
    torch.manual_seed(7)
    idx = torch.randint(0, model.config.vocab_size, (B, 6), device="cuda")
    for dec_round in range(2):  # the second round reuses the captured graph after a new prefill
        assert torch.equal(eager.prefill(idx), graph.prefill(idx))
        for step in range(20):
            tok = torch.randint(0, model.config.vocab_size, (B, 1), device="cuda")
            a, b = eager.decode_step(tok), graph.decode_step(tok)
            if graph.gemv_rows:  # our kernels are deterministic: the replay must be bit-identical
                assert torch.equal(a, b), f"round {dec_round} step {step}: max |diff| {(a - b).abs().max().item():.3e}"
            else:  # cuBLAS may pick another algorithm under capture
                assert_close(a, b, **TOL[dtype], what=f"graph vs eager, round {dec_round} step {step}")
    assert graph.graph is not None


@gpu
@pytest.mark.parametrize("P,B", [(1, 1), (4, 2), (8, 3)])
def test_greedy_tokens_identical_fp32(P, B):
    model = make_model(seed=11, device="cuda", n_embd=128, n_head=2, n_streams=P, n_prefix=5, block_size=80)
    torch.manual_seed(2)
    idx = torch.randint(0, model.config.vocab_size, (B, 5), device="cuda")
    ref = model.generate(idx, 60, top_k=1)  # greedy
    out = FusedDecoder(model, B, dtype=torch.float32, cuda_graph=True).generate(idx, 60, temperature=0)
    assert torch.equal(out, ref), f"first mismatch at {(out != ref).nonzero()[:1].tolist()}"


@gpu
def test_generate_checks_length_and_batch():
    model = make_model(device="cuda", n_embd=128, n_head=2, n_streams=2, block_size=16)
    dec = FusedDecoder(model, 2, dtype=torch.float32)
    idx = torch.zeros(2, 10, dtype=torch.long, device="cuda")
    with pytest.raises(ValueError, match="block_size"):
        dec.generate(idx, 7)
    with pytest.raises(ValueError, match="batch"):
        dec.prefill(idx[:1])
    assert dec.generate(idx, 6, temperature=1.0, top_k=5).shape == (2, 16)
    with pytest.raises(ValueError, match="block_size"):
        for _ in range(10):
            dec.decode_step(idx[:, :1])
