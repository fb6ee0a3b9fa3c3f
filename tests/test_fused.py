"""
Tests of the fused decode path (kernels/) that do not run the kernels on a CPU (tests/test_kernels_cpu.py does
that, through the same launch path). Two kinds:

1. CPU: the wrapper's own logic (fused_status, source assembly, the argument table parsed from the .cu
   signatures, marshalling); kernel programs for sm_80 and sm_90, both dtypes, head sizes 64 and 128 (each
   at least once) compiled by NVRTC from the pip wheel
   through kernels/nvrtc.py, with no CUDA toolkit in sight (no error, warning or spill), and by nvcc when found.
2. GPU, what only a GPU checks (its arithmetic, ordering between concurrent blocks, CUDA graphs): each kernel
   against torch with outputs poisoned with NaN; FusedDecoder against model.GPT (float32 reference) for P in
   {1,2,4,8}, B in {1,3}, MHA/GQA, head_dim 64/128, across split boundaries; greedy tokens; graph replay vs eager.

    python -m pytest tests/test_fused.py -q
"""
import ctypes
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import pytest
import torch
import torch.nn.functional as F
from util import ROOT, assert_close, make_model, reference_attention

from kernels import fused, nvrtc
from kernels.fused import FusedDecoder, fused_status
from model import KVCache

CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


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
    for kernel in fused.signatures():  # every kernel documents its launch shape and limits
        i = src.index(f" {kernel}(")
        comment = src[max(0, src.rfind("\n\n", 0, i)):i]
        assert "Launch" in comment or "Launch" in src[src.rfind("// ----", 0, i):i], f"{kernel}: no launch comment"


def test_the_argument_table_is_parsed_from_the_cuda_source():
    sig = fused.signatures()
    assert set(sig) == {"embed", "layernorm", "gemv_ln_store", "gemv_ln_gelu", "gemv_add", "gemv_f32", "attn_decode"}
    assert sig["gemv_add"] == (("elem_t*", "in"), ("elem_t*", "W"), ("elem_t*", "bias"), ("float*", "x"),
                               ("int", "R"), ("int", "N"), ("int", "K"))
    assert sig["attn_decode"][5:8] == (("int*", "pos_ptr"), ("float*", "part"), ("unsigned int*", "counters"))
    assert sig["attn_decode"][-1] == ("float", "scale")
    for dtype in fused.DTYPES:  # one table for every build
        assert fused.parse_signatures(fused.kernel_source(dtype, 128)) == sig
    with pytest.raises(ValueError, match="double"):
        fused.parse_signatures('extern "C" __global__ void k(double x) {}')


def test_marshal_types_every_argument():
    args = [torch.zeros(2, dtype=torch.bfloat16)] * 3 + [torch.zeros(2)] + [3, -4, 5]
    vals = fused.marshal("gemv_add", torch.bfloat16, args, "cpu")
    assert [type(v) for v in vals] == [ctypes.c_void_p] * 4 + [ctypes.c_int] * 3
    assert [v.value for v in vals[4:]] == [3, -4, 5]
    att = [torch.zeros(1, dtype=torch.bfloat16)] * 5 + [torch.zeros(1, dtype=torch.int32), torch.zeros(1),
                                                        torch.zeros(1, dtype=torch.int32),
                                                        torch.zeros(1, dtype=torch.bfloat16)]
    vals = fused.marshal("attn_decode", torch.bfloat16, att + [1] * 6 + [0.125], "cpu")
    assert isinstance(vals[-1], ctypes.c_float) and vals[-1].value == 0.125 and isinstance(vals[-2], ctypes.c_int)
    with pytest.raises(TypeError, match=r"argument 3 \(float\* x\)"):
        fused.marshal("gemv_add", torch.bfloat16, args[:3] + [torch.zeros(2, dtype=torch.bfloat16)] + args[4:], "cpu")
    with pytest.raises(TypeError, match="int32"):
        fused.marshal("gemv_add", torch.bfloat16, args[:4] + [2.5, 1, 1], "cpu")
    with pytest.raises(TypeError, match="expected 7"):
        fused.marshal("gemv_add", torch.bfloat16, args[:4], "cpu")
    with pytest.raises(TypeError, match="must be a cuda"):  # the GPU backend's launches take CUDA tensors only
        fused.marshal("gemv_add", torch.bfloat16, args)


# The toolkit-free build (kernels/nvrtc.py). .ci/run installs the nvidia-cuda-nvrtc wheel and sets
# PARSCALE_REQUIRE_NVRTC=1: there a missing libnvrtc fails these tests instead of skipping them.
WHEEL_NVRTC = [c for c in nvrtc.find_nvrtc(cuda_homes=[]) if os.path.isabs(c)]  # globs only: nothing is loaded
needs_nvrtc = pytest.mark.skipif(not WHEEL_NVRTC and os.environ.get("PARSCALE_REQUIRE_NVRTC") != "1",
                                 reason="no libnvrtc wheel (pip install nvidia-cuda-nvrtc; a CUDA torch brings one)")
# (architecture, dtype, head_dim): A100 and H100/H200, each architecture, dtype and head size at least once
BUILDS = [("sm_80", "bfloat16", 64), ("sm_80", "float32", 128), ("sm_90", "float32", 64), ("sm_90", "bfloat16", 128)]

_COMPILE_ALL = """
import json, os, shutil, sys, torch
from kernels import fused
assert shutil.which("nvcc") is None and "CUDA_HOME" not in os.environ and "CUDA_PATH" not in os.environ
out = {}
for arch, dtype, head_dim in %r:
    key = f"{arch} {dtype} {head_dim}"
    try:
        c = fused.compile_kernels(getattr(torch, dtype), head_dim, arch, ("--ptxas-options=-v",))
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
    r = subprocess.run([sys.executable, "-c", _COMPILE_ALL % (BUILDS,)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    return result["builds"], result["sys_path"]


@needs_nvrtc
@pytest.mark.parametrize("arch,dtype,head_dim", BUILDS)
def test_kernels_compile_without_a_toolkit(toolkit_free_builds, arch, dtype, head_dim):
    """kernel_source as the wrapper builds it, through NVRTC from the wheel: no error, no warning, no spill."""
    builds, sys_path = toolkit_free_builds
    b = builds[f"{arch} {dtype} {head_dim}"]
    assert not b["error"], f"{b['error']}\n{b['log']}"
    lib = b["nvrtc"]  # from a wheel: <an entry of the subprocess's sys.path>/nvidia/<package>/lib/libnvrtc.so.N
    assert re.fullmatch(r"libnvrtc\.so\.\d+", os.path.basename(lib)) and os.path.basename(os.path.dirname(lib)) == "lib"
    assert any(os.path.dirname(lib).startswith(os.path.join(os.path.abspath(p), "nvidia", ""))
               for p in sys_path if p), lib
    assert b["cubin"] > 0
    # with --ptxas-options=-v the log is ptxas's report and nothing else: a warning or remark fails here
    other = [ln for ln in b["log"].splitlines() if not ln.startswith("ptxas") or re.search(r"warning|error", ln, re.I)]
    assert not other, "\n".join(other)
    usage = nvrtc.ptxas_usage(b["log"])
    assert set(usage) == set(fused.signatures()), usage
    spills = {k: u for k, u in usage.items() if u["spill_stores"] or u["spill_loads"]}
    assert not spills, spills
    print(f"{arch} {dtype} head_dim {head_dim}: {b['seconds']:.2f} s, {b['cubin'] // 1024} KiB, {lib}; registers: "
          + ", ".join(f"{k} {u['registers']}" for k, u in sorted(usage.items())))


@needs_nvrtc
def test_a_compile_error_becomes_the_reason_and_warnings_reach_the_log(monkeypatch):
    """The same helpers as the real build: a broken kernel comes back as fused_status's one-line reason."""
    broken = 'extern "C" __global__ void embed() { no_such_name = 1; }\n'
    monkeypatch.setattr(fused, "kernel_source", lambda dtype, head_dim: broken)
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
    site_a = [touch("a", "nvidia", "cuda_nvrtc", "lib", "libnvrtc.so.12"),
              touch("a", "nvidia", "cu13", "lib", "libnvrtc.so.13")]
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
    with pytest.raises(nvrtc.BuildError,
                       match=r"no usable libnvrtc .*/b/nvidia/cu13/lib/libnvrtc\.so\.13 does not load"):
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
            clean = "0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads"
            spills = [ln for ln in r.stderr.splitlines() if "spill" in ln and not ln.strip().startswith(clean)]
            assert not spills, "\n".join(spills)


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
    expected = reference_attention(qkv.cpu(), pk.cpu(), pv.cpu(), ck.cpu(), cv.cpu(), pos, B, H, Hkv, n_pre,
                                   scale).float()
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
