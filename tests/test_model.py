"""model.py against independent computations: plain GPT, explicit streams, explicit aggregator, full recompute."""
import ast
import gc
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.profiler import ProfilerActivity, profile
from util import IMPORTABLE, ROOT, assert_close, tiny_config

from checkpoint import attach_streams, clean_state_dict, streams_state
from counts import param_report
from model import GPT, GPTConfig, KVCache
from model_init import backbone_of, convert_to_streams, freeze_backbone, is_parscale_param


def make(seed=0, **kw):
    torch.manual_seed(seed)
    return GPT(tiny_config(**kw)).eval()


def plain_gpt_logits(sd, cfg, idx, prefix=None):
    """A from-the-weights GPT-2 forward written out longhand, reading nanoGPT's parameter names.
    prefix: optional list (per layer) of (k, v), each (n_kv_head, n_prefix, hd), given to every row."""
    B, T = idx.shape
    C, H, KV = cfg.n_embd, cfg.n_head, cfg.n_kv_head
    hd = C // H
    g = lambda n: sd[n]  # noqa: E731
    ln = lambda x, n: F.layer_norm(x, (C,), g(n + ".weight"), g(n + ".bias"), 1e-5)  # noqa: E731
    x = g("transformer.wte.weight")[idx] + g("transformer.wpe.weight")[:T]
    for i in range(cfg.n_layer):
        p = f"transformer.h.{i}."
        qkv = ln(x, p + "ln_1") @ g(p + "attn.c_attn.weight").T + g(p + "attn.c_attn.bias")
        q, k, v = qkv.split([C, KV * hd, KV * hd], dim=-1)
        q = q.view(B, T, H, hd).transpose(1, 2)
        k = k.view(B, T, KV, hd).transpose(1, 2).repeat_interleave(H // KV, dim=1)
        v = v.view(B, T, KV, hd).transpose(1, 2).repeat_interleave(H // KV, dim=1)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(hd)
        att = att.masked_fill(torch.ones(T, T).tril() == 0, float("-inf"))
        if prefix is not None:
            prefix_k, prefix_v = (t.repeat_interleave(H // KV, dim=0) for t in prefix[i])  # (H, n_prefix, hd)
            att = torch.cat([(q @ prefix_k.transpose(-2, -1)) / math.sqrt(hd), att], dim=-1)
            v = torch.cat([prefix_v.expand(B, -1, -1, -1), v], dim=2)
        y = (att.softmax(-1) @ v).transpose(1, 2).reshape(B, T, C)
        x = x + y @ g(p + "attn.c_proj.weight").T + g(p + "attn.c_proj.bias")
        h = F.gelu(ln(x, p + "ln_2") @ g(p + "mlp.c_fc.weight").T + g(p + "mlp.c_fc.bias"))
        x = x + h @ g(p + "mlp.c_proj.weight").T + g(p + "mlp.c_proj.bias")
    return ln(x, "transformer.ln_f")


def all_logits(model, idx, cache=None):
    """Logits at every position: given targets, forward computes them all, as nanoGPT's does."""
    return model(idx, idx.contiguous(), cache=cache)[0]


def stream_hidden(model, idx):
    """Every stream's final hidden states, (P*B, T, C): what the aggregator receives."""
    seen = {}
    hook = model.aggregator.register_forward_hook(lambda m, inp, out: seen.update(x=inp[0]))
    model(idx)
    hook.remove()
    return seen["x"]


def test_p1_is_plain_gpt_and_loads_a_nanogpt_state_dict():
    ref = make(1)
    cfg = ref.config
    # a state dict as nanoGPT writes it: compiled-model prefix and causal-mask buffers included
    sd = {"_orig_mod." + k: v.clone() for k, v in ref.state_dict().items()}
    for i in range(cfg.n_layer):
        sd[f"_orig_mod.transformer.h.{i}.attn.bias"] = torch.ones(1, 1, cfg.block_size, cfg.block_size).tril()
    assert not any("prefix" in k or "aggregator" in k for k in sd)
    model = GPT(cfg).eval()
    model.load_state_dict(clean_state_dict(sd))
    idx = torch.randint(0, cfg.vocab_size, (3, 17))
    clean = {k.removeprefix("_orig_mod."): v for k, v in sd.items()}
    expected = plain_gpt_logits(clean, cfg, idx) @ clean["lm_head.weight"].T
    assert_close(all_logits(model, idx), expected, what="P=1 vs plain GPT")
    logits, loss = model(idx)  # inference returns the last position only, as nanoGPT
    assert logits.shape == (3, 1, cfg.vocab_size) and loss is None


@pytest.mark.parametrize("P,kv", [(2, 4), (4, 2)])
def test_streams_are_stream_major_with_their_own_prefix(P, kv):
    model = make(2, n_streams=P, n_kv_head=kv)
    cfg, B = model.config, 3
    idx = torch.randint(0, cfg.vocab_size, (B, 11))
    seen = {}
    model.aggregator.register_forward_hook(lambda m, inp, out: seen.update(x=inp[0], out=out))
    model(idx)
    x = seen["x"]
    assert x.shape == (P * B, 11, cfg.n_embd) and seen["out"].shape == (B, 11, cfg.n_embd)
    sd = model.state_dict()
    for s in range(P):  # rows s*B .. s*B+B-1 are stream s: the plain GPT with stream s's prefix
        prefix = [(b.attn.prefix_k[s], b.attn.prefix_v[s]) for b in model.transformer.h]
        assert_close(x[s * B:(s + 1) * B], plain_gpt_logits(sd, cfg, idx, prefix), what=f"stream {s}")
    assert (x[:B] - x[B:2 * B]).abs().max() > 1e-4  # different prefixes, different streams


def test_aggregator_matches_explicit_computation():
    model = make(3, n_streams=3, agg_smoothing=0.1)
    agg, P, B, T, C = model.aggregator, 3, 2, 5, model.config.n_embd
    torch.nn.init.normal_(agg.proj_out.weight, std=0.5)  # leave the uniform start behind
    torch.nn.init.normal_(agg.proj_out.bias, std=0.5)
    x = torch.randn(P * B, T, C)
    out = agg(x)
    for b in range(B):
        for t in range(T):
            hs = [x[s * B + b, t] for s in range(P)]
            z = agg.proj_out.weight @ F.silu(agg.proj_in.weight @ torch.cat(hs) + agg.proj_in.bias) + agg.proj_out.bias
            w = torch.exp(z) / torch.exp(z).sum()
            w = w * 0.9 + 0.1 / P
            assert_close(out[b, t], sum(w[s] * hs[s] for s in range(P)), what=f"aggregate b={b} t={t}")
    assert agg.weights(x).dtype == torch.float32


def test_fresh_aggregator_averages_streams_and_prefix_init_is_seeded():
    a, b = make(4, n_streams=4), make(4, n_streams=4)
    for (na, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), na  # same seed, same model
    prefix_k = a.transformer.h[0].attn.prefix_k
    assert torch.isfinite(prefix_k).all() and (prefix_k[0] - prefix_k[1]).abs().max() > 0  # streams differ
    w = a.aggregator.weights(torch.randn(4 * 2, 3, a.config.n_embd))
    assert_close(w, torch.full_like(w, 0.25), what="uniform start")


@pytest.mark.parametrize("P", [1, 2, 4])
def test_prefix_reaches_every_position_and_causality_holds(P):
    model = make(5, n_streams=P)
    T = 12
    idx = torch.randint(0, model.config.vocab_size, (2, T))
    base = all_logits(model, idx)
    for j in (0, 5, T - 1):  # change token j: logits before j must not move, logits at j must
        changed = idx.clone()
        changed[:, j] = (changed[:, j] + 1) % model.config.vocab_size
        out = all_logits(model, changed)
        assert_close(out[:, :j], base[:, :j], what=f"positions before {j}")
        assert (out[:, j] - base[:, j]).abs().max() > 1e-6
    if P > 1:
        with torch.no_grad():
            model.transformer.h[0].attn.prefix_v[P - 1] += 1.0  # only the last stream's prefix
        moved = (all_logits(model, idx) - base).abs().amax(dim=-1)  # (B, T)
        assert (moved > 1e-6).all(), "some position does not see the prefix"


@pytest.mark.parametrize("P", [1, 2, 4])
@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("kv", [4, 2, 1])
def test_cached_decoding_equals_full_recompute(P, B, kv):
    model = make(6, n_streams=P, n_kv_head=kv)
    cfg = model.config
    idx = torch.randint(0, cfg.vocab_size, (B, cfg.block_size))
    full = all_logits(model, idx)
    cache = KVCache(model, B)
    chunks = [all_logits(model, idx[:, a:b], cache) for a, b in [(0, 9), (9, 10), (10, 11), (11, cfg.block_size)]]
    assert cache.pos == cfg.block_size
    assert_close(torch.cat(chunks, dim=1), full, atol=2e-5, what="cached vs full logits")
    # greedy tokens (top_k=1: nanoGPT's generate divides by the temperature): through the cache against a loop
    # of full recomputes
    prompt = idx[:, :5]
    out = model.generate(prompt, cfg.block_size - 5, top_k=1)
    x = prompt
    for _ in range(cfg.block_size - 5):
        x = torch.cat([x, all_logits(model, x)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, x)


def step_allocations(model, cache, pos):
    """Bytes of every allocation one decode step makes (torch.profiler's CPU memory events), from pos."""
    cache.pos = pos
    tok = torch.zeros(cache.k.size(1) // model.config.n_streams, 1, dtype=torch.long)
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model(tok, cache=cache)
    return sorted(e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage > 0)


@pytest.mark.parametrize("P, kv", [(1, 4), (4, 2)])
def test_a_decode_step_allocates_nothing_that_grows_with_the_context(P, kv):
    # bf16, as bench.py decodes on CPU; head_dim 32, so one layer's keys dwarf its attention scores
    model = make(11, n_streams=P, n_kv_head=kv, n_embd=128, n_head=4, block_size=64).to(torch.bfloat16)
    cache = KVCache(model, 2)
    cache.k.normal_(), cache.v.normal_()
    early, late = step_allocations(model, cache, 4), step_allocations(model, cache, 60)
    assert early == late, "a decode step allocates more at a longer context"
    layer_keys = cache.k[0].nbytes
    assert max(late) < layer_keys / 4, f"an allocation of {max(late)} B: a copy of the cache ({layer_keys} B a layer)?"


def test_a_cache_sized_to_the_run_decodes_like_a_full_one():
    model = make(12, n_streams=2, n_kv_head=2)
    idx = torch.randint(0, model.config.vocab_size, (2, 12))
    short, full = KVCache(model, 2, max_len=12), KVCache(model, 2)
    for a, b in [(0, 8), (8, 9), (9, 10), (10, 12)]:
        assert_close(model(idx[:, a:b], cache=short)[0], model(idx[:, a:b], cache=full)[0], what=f"tokens {a}..{b}")
    with pytest.raises(ValueError, match="KVCache holds 12 tokens; 13 do not fit"):
        model(idx[:, :1], cache=short)
    with pytest.raises(ValueError, match="max_len must be in"):
        KVCache(model, 1, max_len=model.config.block_size + 1)


def test_generate_past_block_size_crops_like_nanogpt():
    model = make(7, n_streams=2)
    out = model.generate(torch.zeros(1, 3, dtype=torch.long), model.config.block_size + 6, top_k=1)
    assert out.shape == (1, model.config.block_size + 9)
    x = out[:, :-1][:, -model.config.block_size:]
    assert out[0, -1] == all_logits(model, x)[0, -1].argmax()


def test_two_stage_conversion_keeps_backbone_and_freezing_trains_only_parscale():
    base = make(8)
    model = convert_to_streams(base, 4, n_prefix=2)
    assert model.config.n_streams == 4 and model.config.n_prefix == 2
    bsd = base.state_dict()
    for k, v in model.state_dict().items():
        if k in bsd:
            assert torch.equal(v, bsd[k]), k
        else:
            assert is_parscale_param(k), k
    # the LM head stays tied to the embedding: one tensor, counted once, trained as one
    assert model.lm_head.weight is model.transformer.wte.weight
    assert param_report(model) == param_report(GPT(model.config))
    freeze_backbone(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(is_parscale_param(n) for n in trainable)
    opt = model.configure_optimizers(0.1, 1e-2, (0.9, 0.99), "cpu")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    idx = torch.randint(0, model.config.vocab_size, (2, 16))
    for _ in range(2):  # two steps: the zero-initialised aggregator output lets proj_in move on step 2
        _, loss = model(idx, idx)
        loss.backward()
        opt.step()
        opt.zero_grad()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) != is_parscale_param(n), n
    with pytest.raises(ValueError, match="P=1"):
        convert_to_streams(model, 2)


@pytest.mark.parametrize("P,paper_delta", [(2, 2_382_466), (4, 4_764_036), (8, 9_527_176)])
def test_parscale_parameter_count_matches_the_paper(P, paper_delta):
    """The paper's N rows (arXiv 2505.10475, the Stack-V2-Python grid), 0.5B model: N(P) - N(1) is ParScale's own
    parameters."""
    with torch.device("meta"):
        model = GPT(GPTConfig(n_layer=36, n_embd=896, n_head=16, n_kv_head=2, n_streams=P, n_prefix=48, vocab_size=256))
    r = param_report(model)
    assert r["prefixes"] + r["aggregator"] == paper_delta
    assert r["non_embedding"] == r["backbone"] + paper_delta


@pytest.mark.parametrize("field,value", [("n_embd", 30), ("n_kv_head", 3), ("n_streams", 0), ("dropout", 1.5),
                                         ("agg_smoothing", -0.1), ("block_size", 0), ("n_prefix", -1)])
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        tiny_config(**{field: value})
    with pytest.raises(ValueError, match="n_prefix"):
        tiny_config(n_streams=2, n_prefix=0)


def test_too_long_input_is_refused():
    model = make(9)
    with pytest.raises(AssertionError, match="block size is only"):  # nanoGPT's assert
        model(torch.zeros(1, model.config.block_size + 1, dtype=torch.long))
    cache = KVCache(model, 1)
    model(torch.zeros(1, model.config.block_size - 2, dtype=torch.long), cache=cache)
    with pytest.raises(AssertionError, match=f"length {model.config.block_size + 1}, block size"):  # cached ones count
        model(torch.zeros(1, 3, dtype=torch.long), cache=cache)


def test_dynamic_p_streams_share_one_backbone():
    base = make(10)
    sets = {}
    for P in (2, 4):
        m = convert_to_streams(base, P)
        with torch.no_grad():  # stand-in for training the streams on a frozen backbone
            m.transformer.h[1].attn.prefix_k.add_(0.3)
        sets[P] = streams_state(m)
        assert all(is_parscale_param(k) for k in sets[P]["model"])
    before = {k: v.clone() for k, v in base.state_dict().items()}
    idx = torch.randint(0, base.config.vocab_size, (2, 9))
    for P, st in sets.items():
        m = attach_streams(base, st)
        assert m.config.n_streams == P
        assert m.transformer.h[0].mlp.c_fc.weight.data_ptr() == base.transformer.h[0].mlp.c_fc.weight.data_ptr()
        assert_close(m.transformer.h[1].attn.prefix_k, st["model"]["transformer.h.1.attn.prefix_k"], what="prefix")
        all_logits(m, idx)
    for k, v in base.state_dict().items():
        assert torch.equal(v, before[k]), k
    with pytest.raises(ValueError, match="different backbone"):
        attach_streams(make(11), sets[2])


def per_stream_loss_under_ddp(store):
    """The DDP half of the test below, run in a Python of its own: a gloo process group made inside pytest's
    process outlives its test (DDP holds it in a reference cycle) until some later garbage collection destroys
    it, and the suite twice stalled with gloo's threads still running."""
    model = make(13, n_streams=3, n_kv_head=2)
    P, idx = 3, torch.randint(0, model.config.vocab_size, (2, 10))
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    try:
        ddp = DDP(model)
        _, loss, stream_logits = ddp(idx, idx, streams=True)
        aux = F.cross_entropy(stream_logits.flatten(0, 2), idx.repeat(P, 1).flatten())  # the mean per-stream loss
        (loss + 0.5 * aux).backward()  # through DDP's reducer: the wrapper must live until here
        del ddp
        gc.collect()  # after a backward the wrapper sits in a reference cycle: it goes now, before its group
    finally:
        dist.destroy_process_group()
    prefix_grad = model.transformer.h[0].attn.prefix_k.grad
    assert prefix_grad is not None and prefix_grad.abs().sum() > 0
    print("prefix_k gradient", prefix_grad.abs().sum().item())


def test_forward_returns_each_streams_logits_for_a_per_stream_loss(tmp_path):
    """Exercise 5's hook: model(X, Y, streams=True) gives every stream's own logits, from the same forward,
    so that lambda * mean(per-stream loss) trains the prefixes, also inside DistributedDataParallel."""
    model = make(13, n_streams=3, n_kv_head=2)
    P, (B, T) = 3, (2, 10)
    idx = torch.randint(0, model.config.vocab_size, (B, T))
    logits, loss, stream_logits = model(idx, idx, streams=True)
    assert stream_logits.shape == (P, B, T, model.config.vocab_size)
    h = stream_hidden(model, idx).view(P, B, T, -1)
    assert_close(stream_logits, model.lm_head(h), what="each stream through the LM head")
    assert torch.equal(logits, model(idx, idx)[0]) and torch.equal(loss, model(idx, idx)[1])
    code = IMPORTABLE + f"import test_model; test_model.per_stream_loss_under_ddp({str(tmp_path / 'store')!r})"
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "prefix_k gradient" in res.stdout, (res.stdout + res.stderr)[-4000:]


def test_config_defaults_and_sentinels():
    cfg = GPTConfig(n_head=8, n_embd=64)
    assert cfg.n_kv_head == 8 and cfg.head_dim == 8  # None = as many kv heads as query heads: no GQA
    assert GPTConfig(n_head=8, n_embd=64, n_kv_head=2).n_kv_head == 2
    # the smoothing the paper's text gives (arXiv 2505.10475); the official code's 0.01 is one field away
    assert GPTConfig().agg_smoothing == 0.1
    model = make(14, n_streams=4)
    with torch.no_grad():  # a confident aggregator: one stream takes all the weight before smoothing
        model.aggregator.proj_out.bias.copy_(torch.tensor([50.0, 0.0, 0.0, 0.0]))
    w = model.aggregator.weights(torch.randn(4 * 2, 3, model.config.n_embd))
    assert_close(w[..., 1:], torch.full_like(w[..., 1:], 0.1 / 4), what="smoothing 0.1: each stream keeps eps/P")
    model.aggregator.smoothing = 0.01
    w = model.aggregator.weights(torch.randn(4 * 2, 3, model.config.n_embd))
    assert_close(w[..., 1:], torch.full_like(w[..., 1:], 0.01 / 4), what="smoothing 0.01")


def test_backbone_of_shares_the_tensors_and_computes_the_plain_gpt():
    model = make(15, n_streams=2, n_kv_head=2)
    base = backbone_of(model)
    assert base.config.n_streams == 1 and not any(is_parscale_param(k) for k in base.state_dict())
    assert base.lm_head.weight is base.transformer.wte.weight
    assert base.transformer.h[0].mlp.c_fc.weight.data_ptr() == model.transformer.h[0].mlp.c_fc.weight.data_ptr()
    idx = torch.randint(0, model.config.vocab_size, (2, 7))
    plain = GPT(base.config).eval()
    plain.load_state_dict(base.state_dict())
    assert_close(all_logits(base.eval(), idx), all_logits(plain, idx), what="backbone_of vs a P=1 model of its weights")


def test_model_py_imports_torch_and_the_standard_library_only():
    with open(os.path.join(ROOT, "model.py")) as f:
        tree = ast.parse(f.read())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    project = {name[:-3] for name in os.listdir(ROOT) if name.endswith(".py")} | {"kernels", "experiments"}
    assert imported & project == set(), imported & project
    assert "torch" in imported


@pytest.mark.skipif(not os.path.isfile(os.environ.get("NANOGPT_MODEL_PY", "")),
                    reason="set NANOGPT_MODEL_PY to nanoGPT's model.py (3adf61e; docs/model.md says how to get it)")
def test_p1_computes_what_nanogpts_own_model_py_computes():
    """Against nanoGPT's own file, not a rewrite of it: the same weights give the same logits, loss and greedy text."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("nanogpt_model", os.environ["NANOGPT_MODEL_PY"])
    nanogpt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(nanogpt)
    fields = dict(block_size=32, vocab_size=61, n_layer=2, n_head=4, n_embd=32, dropout=0.0, bias=True)
    torch.manual_seed(16)
    theirs = nanogpt.GPT(nanogpt.GPTConfig(**fields)).eval()
    ours = GPT(GPTConfig(**fields)).eval()
    ours.load_state_dict(clean_state_dict(theirs.state_dict()))
    idx = torch.randint(0, 61, (3, 20))
    with torch.no_grad():
        for targets in (None, idx):
            (a, loss_a), (b, loss_b) = ours(idx, targets), theirs(idx, targets)
            assert_close(a, b, what=f"logits, targets={targets is not None}")
            if targets is not None:
                assert_close(loss_a, loss_b, what="loss")
    assert torch.equal(ours.generate(idx[:, :4], 20, top_k=1), theirs.generate(idx[:, :4], 20, top_k=1))
