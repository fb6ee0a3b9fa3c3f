"""Shared test helpers. pytest puts tests/ on sys.path, so test files `from util import ...`."""
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from model import GPT, GPTConfig  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


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


def model_from(ckpt):
    """The model a loaded checkpoint describes, with its weights: what sample.py builds."""
    model = GPT(GPTConfig(**ckpt["model_args"]))
    model.load_state_dict(ckpt["model"])
    return model
