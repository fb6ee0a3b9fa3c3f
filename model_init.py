"""
The paper's recipes, and this project's own, as functions on a model.GPT. train.py calls them where it
builds its model (nanoGPT's "model init"); checkpoint.py where it attaches a streams file.
- Two-stage training (arXiv 2505.10475, section 4): convert_to_streams puts a trained P = 1 backbone
  into a P-stream model with fresh prefixes and aggregator; prefixes_from_kv is our prefix init for it
  (the paper leaves the prefix init open).
- The frozen backbone ("dynamic parallel scaling", section 4): freeze_backbone.
- --prefix_reparam: prefixes trained through an MLP (Li & Liang's prefix reparameterisation), folded
  into plain tensors for every checkpoint, so sample.py and the fused path never see the MLP.
- A model on another model's tensors, built on the meta device (no memory, no init): model_on, and
  backbone_of for the P = 1 model inside a P-stream one.
"""

import dataclasses

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from model import GPT, KVCache


def is_parscale_param(name):
    """The parameters ParScale adds: every layer's prefix keys and values, and the aggregator."""
    return ".prefix_" in name or name.startswith("aggregator.")


def model_on(config, state_dict):
    """GPT(config) holding the very tensors of state_dict (no copy): built on the meta device, so nothing
    is allocated or initialised. Entries config has no place for are left out (a P-stream model's prefixes
    and aggregator, for a P = 1 config); every place config has must be filled."""
    with torch.device("meta"):
        model = GPT(config)
    missing, _ = model.load_state_dict(state_dict, strict=False, assign=True)
    if missing:
        raise ValueError(f"model_on: the state dict lacks {missing[:3]}")
    model.lm_head.weight = model.transformer.wte.weight  # assign=True gives each key a Parameter of its own
    return model


def backbone_of(model):
    """The P = 1 model inside a P-stream model, on the same backbone tensors (no copy, no memory)."""
    return model_on(dataclasses.replace(model.config, n_streams=1), model.state_dict())


# -----------------------------------------------------------------------------
# two-stage training and the frozen backbone (arXiv 2505.10475, section 4)

def convert_to_streams(model, n_streams, **stream_fields):
    """Two-stage ParScale: a P-stream model around a trained P = 1 model's backbone, the very same
    tensors, with fresh prefixes and aggregator (drawn from the global torch RNG). stream_fields may
    set n_prefix, agg_smoothing and prefix_init_std."""
    if model.config.n_streams != 1:
        raise ValueError(f"convert_to_streams needs a P=1 model, got n_streams={model.config.n_streams}")
    p = next(model.parameters())
    new = GPT(dataclasses.replace(model.config, n_streams=n_streams, **stream_fields)).to(p.device, p.dtype)
    missing, unexpected = new.load_state_dict(model.state_dict(), strict=False, assign=True)
    assert not unexpected and all(is_parscale_param(k) for k in missing), (missing, unexpected)
    new.lm_head.weight = new.transformer.wte.weight  # tied again: assign=True gave each key a Parameter
    return new


def freeze_backbone(model):
    """Train only the prefixes and the aggregator ("dynamic parallel scaling")."""
    if model.config.n_streams == 1:
        raise ValueError("freeze_backbone needs n_streams > 1: with one stream nothing would train")
    for name, p in model.named_parameters():
        p.requires_grad = is_parscale_param(name)


@torch.no_grad()
def prefixes_from_kv(model, snippets):
    """Prefix init for the two-stage recipe (ours; docs/results.md, two-stage): stream s's prefix becomes
    the backbone's own keys and values on snippets[s], (P, n_prefix) training token ids, so each stream
    starts as the trained model reading a short real context and the loss does not jump."""
    cfg = model.config
    if tuple(snippets.shape) != (cfg.n_streams, cfg.n_prefix):
        raise ValueError(f"snippets must be (n_streams, n_prefix) = {(cfg.n_streams, cfg.n_prefix)}, "
                         f"got {tuple(snippets.shape)}")
    base = backbone_of(model)
    cache = KVCache(base, cfg.n_streams, max_len=cfg.n_prefix)  # one row per stream
    base(snippets, cache=cache)
    for i, block in enumerate(model.transformer.h):
        block.attn.prefix_k.copy_(cache.k[i])  # (P, n_kv_head, n_prefix, hd)
        block.attn.prefix_v.copy_(cache.v[i])


# -----------------------------------------------------------------------------
# --prefix_reparam: Li & Liang's prefix reparameterisation, used only while training

class PrefixMLP(nn.Module):
    """
    One layer's prefix keys (or values), (P, n_kv_head, n_prefix, hd), as MLP(E): E a learned
    (P, n_prefix, C) embedding, the MLP Linear(C, H) -> tanh -> Linear(H, n_kv_head * hd). The ParScale
    authors trained their prefixes through such a reparameterisation (QwenLM/ParScale issue #1), as
    prefix tuning does (Li & Liang 2021). Registered with torch.nn.utils.parametrize, so the attention
    code reads `self.prefix_k` unchanged; checkpoints fold it into the plain tensor (folded_state_dict).
    """

    def __init__(self, cfg, hidden):
        super().__init__()
        self.shape, self.width = (cfg.n_streams, cfg.n_kv_head, cfg.n_prefix, cfg.head_dim), cfg.n_embd
        self.mlp = nn.Sequential(nn.Linear(cfg.n_embd, hidden), nn.Tanh(),
                                 nn.Linear(hidden, cfg.n_kv_head * cfg.head_dim))

    def forward(self, emb):  # (P, n_prefix, C) -> (P, n_kv_head, n_prefix, hd)
        P, H, S, hd = self.shape
        return self.mlp(emb).view(P, S, H, hd).transpose(1, 2)

    def right_inverse(self, prefix):  # at registration: a fresh N(0, 1) embedding replaces the plain prefix
        P, _, S, _ = self.shape
        return torch.randn(P, S, self.width, device=prefix.device, dtype=prefix.dtype)


def add_prefix_reparam(model, hidden):
    if model.config.n_streams == 1:
        raise ValueError("add_prefix_reparam needs n_streams > 1: P = 1 has no prefixes")
    for block in model.transformer.h:
        for name in ("prefix_k", "prefix_v"):
            mlp = PrefixMLP(model.config, hidden)
            parametrize.register_parametrization(block.attn, name, mlp, unsafe=True)


def is_reparameterised(model):
    return any(parametrize.is_parametrized(block.attn) for block in model.transformer.h)


def folded_state_dict(model):
    """model.state_dict() with every reparameterised prefix folded into the plain tensor it produces:
    what the checkpoint's model and the streams file hold."""
    sd = {k: v for k, v in model.state_dict().items() if ".parametrizations." not in k}
    for i, block in enumerate(model.transformer.h):
        if parametrize.is_parametrized(block.attn):
            sd[f"transformer.h.{i}.attn.prefix_k"] = block.attn.prefix_k.detach().clone()
            sd[f"transformer.h.{i}.attn.prefix_v"] = block.attn.prefix_v.detach().clone()
    return sd


def reparam_state(model):
    """The reparameterisation's own tensors (embeddings and MLPs), for the training checkpoint."""
    return {k: v for k, v in model.state_dict().items() if ".parametrizations." in k}
