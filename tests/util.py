"""Shared test helpers. pytest puts tests/ on sys.path, so test files `from util import ...`."""
import contextlib
import io
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from model import GPT, GPTConfig  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
# the first line of `python -c` code a test runs in a process of its own: the test files and the repo importable
IMPORTABLE = f"import sys; sys.path[:0] = [{os.path.dirname(os.path.abspath(__file__))!r}, {ROOT!r}]\n"


def assert_close(actual, expected, atol=1e-5, rtol=1e-5, what="tensors"):
    """torch.testing.assert_close, but the message always carries max and mean |difference|."""
    diff = (actual.float() - expected.float()).abs()
    if diff.numel() == 0:
        diff = torch.zeros(1)
    msg = f"{what}: max |diff| {diff.max().item():.3e}, mean |diff| {diff.mean().item():.3e}"
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, msg=lambda m: f"{msg}\n{m}")


def tiny_config(**kw):
    """A model small enough for a CPU test to build and run in milliseconds."""
    args = dict(block_size=32, vocab_size=61, n_layer=2, n_head=4, n_embd=32, dropout=0.0, n_prefix=3)
    args.update(kw)
    return GPTConfig(**args)


def make_model(seed=0, device="cpu", **kw):
    """A small model for the fused path's tests, every parameter off its trivial init value: prefixes large so
    the streams really differ, the aggregator's mix non-uniform, LayerNorms and biases non-trivial. Written by
    parameter name and shape alone, so a modified model.py (the README's exercises) works too."""
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


def reference_attention(qkv, pk, pv, ck, cv, pos, B, H, Hkv, n_pre, scale):
    """Plain softmax attention, in float64, of each row's new query over [prefix | cache[:pos] | new k/v]:
    what attention.cu's attn_decode computes (rows stream-major, GQA by head groups)."""
    R, hd = qkv.size(0), ck.size(-1)
    q, k, v = qkv.double().split([H * hd, Hkv * hd, Hkv * hd], dim=1)
    out = torch.empty(R, H, hd, dtype=torch.float64)
    for r in range(R):
        for h in range(H):
            hk = h // (H // Hkv)
            parts_k = [ck[r, hk, :pos].double(), k[r, hk * hd:(hk + 1) * hd][None]]
            parts_v = [cv[r, hk, :pos].double(), v[r, hk * hd:(hk + 1) * hd][None]]
            if n_pre:
                parts_k.insert(0, pk[r // B, hk].double())
                parts_v.insert(0, pv[r // B, hk].double())
            K, V = torch.cat(parts_k), torch.cat(parts_v)
            att = (K @ (q[r, h * hd:(h + 1) * hd] * scale)).softmax(0)
            out[r, h] = att @ V
    return out.view(R, H * hd)


def model_from(ckpt):
    """The model a loaded checkpoint describes, with its weights: what sample.py builds."""
    model = GPT(GPTConfig(**ckpt["model_args"]))
    model.load_state_dict(ckpt["model"])
    return model


def train_in_this_process(monkeypatch):
    """The experiments' train.py runs inside the test's own process, not one process each: starting Python and
    torch costs more than a tiny run. runner.call_train's contract is kept (argv in; the run's output appended to
    out_dir/train.out and returned; train.py's UserError for a refused run). The subprocess itself is tested too:
    test_experiments' sweep end to end and its refused run, and every experiment's command line."""
    import train
    from experiments import runner

    def call_train(argv, out_dir):
        os.makedirs(out_dir, exist_ok=True)
        out, threads = io.StringIO(), torch.get_num_threads()
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
                train.main(list(argv))
        finally:  # --threads sets torch's for the whole process: give the tests theirs back
            torch.set_num_threads(threads)
            with open(os.path.join(out_dir, "train.out"), "a") as log:
                log.write(f"$ python train.py {' '.join(argv)}\n{out.getvalue()}")
        return out.getvalue()

    monkeypatch.setattr(runner, "call_train", call_train)
