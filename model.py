"""
A GPT language model with ParScale's parallel streams, in one file.

ParScale (Chen et al., 2025, "Parallel Scaling Law for Language Models", arXiv 2505.10475)
runs P copies ("streams") of one transformer on the same input. The streams share every
weight; they differ only by a few learned key/value vectors (a prefix) in every attention
layer. All P streams run as one batch, and a small learned aggregator mixes their final
hidden states before the LM head. P streams behave like ~(1 + 0.39 ln P) times the parameters.

Everything ParScale adds sits behind `n_streams > 1`: with n_streams = 1 this file is a plain
nanoGPT-style GPT, and a nanoGPT checkpoint loads into it unchanged. Stream layout, used everywhere
below: the P streams are folded into the batch dimension, stream-major, so row r = s * B + b holds
stream s of batch element b, shape (P*B, T, C).

Read top to bottom: config -> attention, MLP -> Block -> Aggregator -> GPT -> KVCache and sampling ->
the paper's recipes (two-stage, frozen backbone) -> the config's checks. Checkpoints: checkpoint.py.
"""

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from common import UserError

DECODE_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64 for speed
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: Optional[int] = None  # None = n_head; fewer gives grouped-query attention (GQA)
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # bias in Linears and LayerNorms, like GPT-2
    # ParScale
    n_streams: int = 1  # P, the number of parallel streams; 1 = plain GPT
    n_prefix: int = 48  # learned prefix key/value slots per layer per stream (the paper: 48)
    agg_smoothing: float = 0.01  # eps in w = w(1-eps) + eps/P; official code 0.01, paper text 0.1
    prefix_init_std: float = 0.02  # prefixes start as N(0, std) draws from the global torch RNG

    def __post_init__(self):
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        check_config(self)  # UserError naming the field: the rules are at the end of this file

    @property
    def head_dim(self):
        return self.n_embd // self.n_head

    @property
    def n_prefix_slots(self):
        """Key/value slots in front of the real tokens in every attention layer: 0 at P = 1."""
        return self.n_prefix if self.n_streams > 1 else 0


def is_prefix_param(name):
    """Per-layer ParScale prefix keys/values, e.g. 'transformer.h.0.attn.prefix_k'."""
    return ".prefix_" in name


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.n_streams = config.n_streams
        # query, key and value projections in one matmul; with n_kv_head = n_head this is nanoGPT's c_attn
        self.c_attn = nn.Linear(config.n_embd, (config.n_head + 2 * config.n_kv_head) * config.head_dim, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)
        if config.n_streams > 1:
            # ParScale prefix: raw keys and values, one set per stream. They skip c_attn, carry no
            # position and occupy none: real tokens still sit at positions 0..T-1.
            shape = (config.n_streams, config.n_kv_head, config.n_prefix, config.head_dim)
            self.prefix_k = nn.Parameter(torch.empty(shape))
            self.prefix_v = nn.Parameter(torch.empty(shape))

    def keys_values(self, k, v, cache):
        """k, v of the T new tokens (R, n_kv_head, T, hd) -> what their queries attend to, [stream prefix |
        cached tokens | new tokens], (R, n_kv_head, n_prefix_slots + pos + T, hd). The cache holds real
        tokens only: the prefix exists once per stream (the parameter), never once per row."""
        if cache is not None:
            k, v = cache.append(self.layer_idx, k, v)  # (R, n_kv_head, pos + T, hd)
        if self.n_streams > 1:
            B = k.size(0) // self.n_streams  # stream-major rows: stream s owns rows s*B .. s*B+B-1
            k = torch.cat([self.prefix_k.to(k.dtype).repeat_interleave(B, dim=0), k], dim=2)
            v = torch.cat([self.prefix_v.to(v.dtype).repeat_interleave(B, dim=0), v], dim=2)
        return k, v

    def decode_attention(self, q, cache):
        """
        One new token per row (a decode step), written out so that nothing the size of the cache is
        copied, as keys_values + SDPA would (prefix concatenated, kv heads repeated for GQA). q: (R,
        n_head, 1, hd), its key/value already in `cache`. Keys and values are this layer's whole buffer,
        (R, n_kv_head, max_len, hd): contiguous, so no matmul copies it (torch's bf16 CPU matmul copies a
        strided [..., :pos + 1, :] first); empty slots are masked. GQA stacks the g = n_head / n_kv_head
        query heads of a kv head against it; the prefix is scored straight from the parameter.
        """
        R, Hkv, hd = q.size(0), self.n_kv_head, self.head_dim
        g = self.n_head // Hkv
        k, v = cache.k[self.layer_idx], cache.v[self.layer_idx]  # (R, Hkv, max_len, hd)
        q = q.reshape(R, Hkv, g, hd) / math.sqrt(hd)  # (R, Hkv, g, hd), scaled here: it is smaller than the scores
        scores = q @ k.transpose(-1, -2)  # (R, Hkv, g, max_len)
        scores[..., cache.pos + 1:] = float("-inf")  # empty slots; pos + 1 tokens are cached
        if self.n_streams > 1:
            P, n_pre = self.n_streams, self.prefix_k.size(2)
            qs = q.view(P, R // P, Hkv, g, hd)  # stream-major rows: the B rows of a stream share its prefix
            prefix = qs @ self.prefix_k.to(q.dtype).unsqueeze(1).transpose(-1, -2)  # (P, B, Hkv, g, n_prefix)
            scores = torch.cat([prefix.view(R, Hkv, g, n_pre), scores], dim=-1)  # (R, Hkv, g, n_prefix + max_len)
        w = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)  # softmax in float32
        if self.n_streams == 1:
            return (w @ v).view(R, self.n_head, 1, hd)
        y = w[..., n_pre:] @ v  # (R, Hkv, g, hd)
        wp = w[..., :n_pre].reshape(P, R // P, Hkv, g, n_pre)
        y = y + (wp @ self.prefix_v.to(q.dtype).unsqueeze(1)).view(R, Hkv, g, hd)
        return y.view(R, self.n_head, 1, hd)

    def forward(self, x, cache=None):
        R, T, C = x.size()  # R = P*B rows, stream-major
        kv_dim = self.n_kv_head * self.head_dim
        q, k, v = self.c_attn(x).split([C, kv_dim, kv_dim], dim=2)
        q = q.view(R, T, self.n_head, self.head_dim).transpose(1, 2)  # (R, n_head, T, hd)
        k = k.view(R, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (R, n_kv_head, T, hd)
        v = v.view(R, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if cache is not None and T == 1:  # one decode step: read the cache in place, copy nothing of it
            cache.append(self.layer_idx, k, v)
            y = self.decode_attention(q, cache)
            return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(R, T, C)))
        k, v = self.keys_values(k, v, cache)  # (R, n_kv_head, S, hd)
        if self.n_kv_head != self.n_head:  # GQA: each kv head serves n_head / n_kv_head query heads
            k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
            v = v.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
        # The S - T keys in front of the queries (prefix slots, cached tokens) are visible to every
        # query; among the T new ones, query i sees key j <= i. One rule for every case.
        S = k.size(2)
        mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=S - T) if S > T > 1 else None
        with sdpa_kernel(DECODE_BACKENDS) if cache is not None else nullcontext():  # no cuDNN: a new plan per S
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=(S == T > 1),
                                               dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(R, T, C)  # (R, T, C), heads side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, cache=None):
        x = x + self.attn(self.ln_1(x), cache)
        x = x + self.mlp(self.ln_2(x))
        return x


class Aggregator(nn.Module):
    """ParScale's output aggregation (arXiv 2505.10475, section 2), per position: the P streams' final
    hidden states concatenated, (B, T, P*C) -> Linear -> SiLU -> Linear -> softmax over P in float32 ->
    label smoothing -> their weighted sum, (B, T, C). Both Linears have biases, as the paper's N implies."""

    def __init__(self, config):
        super().__init__()
        self.n_streams, self.eps = config.n_streams, config.agg_smoothing
        self.proj_in = nn.Linear(config.n_streams * config.n_embd, config.n_embd)
        self.proj_out = nn.Linear(config.n_embd, config.n_streams)

    def weights(self, x):
        """x: (P*B, T, C), stream-major -> mixing weights (B, T, P) in float32."""
        P, (R, T, C) = self.n_streams, x.shape
        per_position = x.view(P, R // P, T, C).permute(1, 2, 0, 3).reshape(R // P, T, P * C)  # (B, T, P*C)
        w = self.proj_out(F.silu(self.proj_in(per_position))).float().softmax(dim=-1)
        return w * (1 - self.eps) + self.eps / P  # smoothing: no stream's weight falls below eps/P

    def forward(self, x):
        P, (R, T, C) = self.n_streams, x.shape
        w = self.weights(x)  # (B, T, P)
        return torch.einsum("btp,pbtc->btc", w.to(x.dtype), x.view(P, R // P, T, C))  # (B, T, C)


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        if config.n_streams > 1:
            self.aggregator = Aggregator(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying, as GPT-2
        # init as nanoGPT: N(0, 0.02), residual projections scaled by 1/sqrt(2 * n_layer) (GPT-2 paper)
        self.apply(self._init_weights)
        for pn, p in self.named_parameters():
            if pn.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        if config.n_streams > 1:
            self.reset_parscale_parameters()

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def reset_parscale_parameters(self):
        """Prefixes: N(0, prefix_init_std) from the global torch RNG, each stream its own draw (the only
        thing that makes the streams differ). Aggregator: its output layer starts at zero, so the
        streams start exactly averaged (weights 1/P) and the mix is learned."""
        for block in self.transformer.h:
            torch.nn.init.normal_(block.attn.prefix_k, std=self.config.prefix_init_std)
            torch.nn.init.normal_(block.attn.prefix_v, std=self.config.prefix_init_std)
        torch.nn.init.normal_(self.aggregator.proj_in.weight, std=0.02)
        torch.nn.init.zeros_(self.aggregator.proj_in.bias)
        torch.nn.init.zeros_(self.aggregator.proj_out.weight)
        torch.nn.init.zeros_(self.aggregator.proj_out.bias)

    @staticmethod
    def is_parscale_param(name):
        """The parameters ParScale adds: per-layer prefixes and the aggregator."""
        return is_prefix_param(name) or name.startswith("aggregator.")

    def param_report(self):
        """Parameter counts by role. 'non_embedding' is the N of the scaling law (ParScale's own included)."""
        r = dict(embedding=0, backbone=0, prefixes=0, aggregator=0)
        for name, p in self.named_parameters():  # tied lm_head/wte counted once, as embedding
            key = ("embedding" if name.startswith(("transformer.wte", "transformer.wpe")) else
                   "prefixes" if is_prefix_param(name) else "aggregator" if name.startswith("aggregator.") else "backbone")
            r[key] += p.numel()
        r["non_embedding"] = r["backbone"] + r["prefixes"] + r["aggregator"]
        r["total"] = r["non_embedding"] + r["embedding"]
        return r

    def stream_hidden(self, idx, cache=None):
        """Token ids (B, T) -> every stream's final hidden states after ln_f, (P*B, T, C), stream-major."""
        B, T = idx.size()
        pos0 = cache.pos if cache is not None else 0
        if pos0 + T > self.config.block_size:
            raise ValueError(f"sequence of {pos0 + T} tokens is longer than block_size {self.config.block_size}")
        pos = torch.arange(pos0, pos0 + T, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C), once for all streams
        if self.config.n_streams > 1:
            x = x.repeat(self.config.n_streams, 1, 1)  # (P*B, T, C): every stream sees the same input
        for block in self.transformer.h:
            x = block(x, cache)
        if cache is not None:
            cache.pos += T
        return self.transformer.ln_f(x)

    def hidden(self, idx, cache=None):
        """Token ids (B, T) -> final hidden states (B, T, C), the P streams mixed by the aggregator."""
        x = self.stream_hidden(idx, cache)
        return self.aggregator(x) if self.config.n_streams > 1 else x  # the LM head then runs on B rows, not P*B

    def forward(self, idx, targets=None, cache=None, streams=False):
        """Logits and the loss (None without targets). streams=True also returns each stream's own
        logits, (P, B, T, vocab): a loss on them is part of this forward, so it trains under DDP too."""
        h = self.stream_hidden(idx, cache)  # (P*B, T, C)
        x = self.aggregator(h) if self.config.n_streams > 1 else h  # the LM head then runs on B rows, not P*B
        if targets is None:
            return self.lm_head(x[:, [-1], :]), None  # inference: only the last position's logits
        logits = self.lm_head(x)  # mixing hidden states before this linear head mixes logits
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)
        if streams:
            return logits, loss, self.lm_head(h).view(self.config.n_streams, *logits.shape)
        return logits, loss

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        """AdamW; matrices and embeddings decay. Biases, norms and prefixes don't: decaying the
        prefixes would pull every stream's prefix toward zero, i.e. toward each other."""
        params = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        decay = [p for n, p in params if p.dim() >= 2 and not is_prefix_param(n)]
        no_decay = [p for n, p in params if p.dim() < 2 or is_prefix_param(n)]
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        fused = {"fused": True} if device_type == "cuda" else {}
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **fused)

    def flops_per_token(self, seq_len):
        """Training FLOPs per token (forward + backward): the backbone runs P times, the LM head
        once (PaLM appendix B's 6N + attention, counted per stream)."""
        cfg, r = self.config, self.param_report()
        P, L, H, Q = cfg.n_streams, cfg.n_layer, cfg.n_head, cfg.head_dim
        body = 6 * (r["backbone"] + r["prefixes"]) * P
        attn = 12 * L * H * Q * (seq_len + cfg.n_prefix_slots) * P  # each query against prefix + context
        head = 6 * (cfg.vocab_size * cfg.n_embd + r["aggregator"])
        return body + attn + head

    def estimate_mfu(self, tokens_per_second, seq_len, peak):
        """Model FLOPs utilisation: achieved training FLOP/s over `peak` FLOP/s (None if peak unknown)."""
        return self.flops_per_token(seq_len) * tokens_per_second / peak if peak else None

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None):
        """Continue idx (B, T) by max_new_tokens tokens through a KV cache; temperature 0 = greedy."""
        cache = KVCache(self, idx.size(0), max_len=min(idx.size(1) + max_new_tokens, self.config.block_size))
        for i in range(max_new_tokens):
            if idx.size(1) > self.config.block_size:  # positions run out: crop and recompute, as nanoGPT does
                logits, _ = self(idx[:, -self.config.block_size:])
            else:  # the whole prompt first, then one new token per step
                logits, _ = self(idx if i == 0 else idx[:, -1:], cache=cache)
            idx = torch.cat((idx, sample_next(logits[:, -1, :], temperature, top_k)), dim=1)
        return idx


class KVCache:
    """
    Preallocated keys and values of the real tokens for all layers, k, v: (n_layer, P*B, n_kv_head,
    max_len, head_dim), max_len = block_size unless given: a decode step reads the whole buffer, so
    size it to the run. No prefix: attention (and the fused decoder) reads it from the parameter.
    `pos` counts the tokens cached so far; it is also the next token's position.
    """

    def __init__(self, model, batch_size, device=None, dtype=None, max_len=None):
        cfg = model.config
        max_len = max_len or cfg.block_size
        if not 1 <= max_len <= cfg.block_size:
            raise ValueError(f"KVCache max_len must be in [1, block_size={cfg.block_size}], got {max_len}")
        p = next(model.parameters())
        shape = (cfg.n_layer, cfg.n_streams * batch_size, cfg.n_kv_head, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device or p.device, dtype=dtype or p.dtype)
        self.v = torch.zeros_like(self.k)
        self.pos = 0

    def append(self, layer, k, v):
        """Store k, v (P*B, n_kv_head, T, hd) after what is cached; return all cached so far."""
        end = self.pos + k.size(2)
        if end > self.k.size(3):
            raise ValueError(f"KVCache holds {self.k.size(3)} tokens; {end} do not fit")
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


def sample_next(logits, temperature=1.0, top_k=None):
    """Next tokens (B, 1) from last-position logits (B, V): temperature 0 = greedy, top_k keeps the k best."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits[logits < v[:, [-1]]] = -float("inf")
    return torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)


# -----------------------------------------------------------------------------
# the paper's recipes: two-stage training and dynamic P (checkpoint.py saves and loads them)

def convert_to_streams(model, n_streams, **parscale_args):
    """Two-stage ParScale (arXiv 2505.10475, section 4): a P-stream model around a trained P=1 model's
    backbone, with fresh prefixes and aggregator; parscale_args may set n_prefix, agg_smoothing, prefix_init_std."""
    if model.config.n_streams != 1:
        raise ValueError(f"convert_to_streams needs a P=1 model, got n_streams={model.config.n_streams}")
    cfg = GPTConfig(**{**vars(model.config), **parscale_args, "n_streams": n_streams})
    p = next(model.parameters())
    new = GPT(cfg).to(device=p.device, dtype=p.dtype)
    # assign=True: the new model holds the very same backbone tensors, no copy
    missing, unexpected = new.load_state_dict(model.state_dict(), strict=False, assign=True)
    assert not unexpected and all(GPT.is_parscale_param(k) for k in missing), (missing, unexpected)
    return new


def freeze_backbone(model):
    """Train only the prefixes and the aggregator ("dynamic parallel scaling", arXiv 2505.10475, section 4)."""
    if model.config.n_streams == 1:
        raise ValueError("freeze_backbone needs n_streams > 1: with one stream nothing would train")
    for name, p in model.named_parameters():
        p.requires_grad = GPT.is_parscale_param(name)


# -----------------------------------------------------------------------------
# the config's checks (GPTConfig.__post_init__ calls them)

def check_config(cfg):
    """UserError naming the first field of cfg that is out of range."""
    for name in ["block_size", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "n_streams"]:
        if not isinstance(getattr(cfg, name), int) or getattr(cfg, name) < 1:
            raise UserError(f"GPTConfig.{name} must be a positive integer, got {getattr(cfg, name)!r}")
    rules = [  # (holds, what is wrong)
        (cfg.n_embd % cfg.n_head == 0, f"n_embd ({cfg.n_embd}) must be divisible by n_head ({cfg.n_head})"),
        (cfg.n_head % cfg.n_kv_head == 0, f"n_kv_head ({cfg.n_kv_head}) must divide n_head ({cfg.n_head})"),
        (0.0 <= cfg.dropout < 1.0, f"dropout must be in [0, 1), got {cfg.dropout}"),
        (cfg.n_prefix >= 0, f"n_prefix must be >= 0, got {cfg.n_prefix}"),
        # without prefixes every stream would compute exactly the same thing
        (cfg.n_streams == 1 or cfg.n_prefix >= 1, f"n_prefix must be >= 1 when n_streams > 1, got {cfg.n_prefix}"),
        (0.0 <= cfg.agg_smoothing <= 1.0, f"agg_smoothing must be in [0, 1], got {cfg.agg_smoothing}"),
        (cfg.prefix_init_std >= 0, f"prefix_init_std must be >= 0, got {cfg.prefix_init_std}"),
    ]
    for holds, wrong in rules:
        if not holds:
            raise UserError(f"GPTConfig.{wrong}")
