"""
Full definition of a GPT Language Model, all of it in this single file.
References:
1) the official GPT-2 TensorFlow implementation released by OpenAI:
https://github.com/openai/gpt-2/blob/master/src/model.py
2) huggingface/transformers PyTorch implementation:
https://github.com/huggingface/transformers/blob/main/src/transformers/models/gpt2/modeling_gpt2.py
3) ParScale: Chen et al. 2025, "Parallel Scaling Law for Language Models", arXiv 2505.10475.
P parallel streams of this one transformer read the same input: they share every weight and differ
only by learned key/value prefixes in every attention layer; a learned aggregator mixes their final
hidden states. ParScale's lines sit behind n_streams > 1: with n_streams = 1 this is nanoGPT's GPT,
and a nanoGPT checkpoint loads unchanged. The P streams are folded into the batch, stream-major:
row s * B + b is stream s of batch element b, shape (P*B, T, C).
Also added: a KV cache with a one-token decode step, and grouped-query attention (GQA).
This is nanoGPT's model.py (github.com/karpathy/nanoGPT, MIT License, (c) 2022 Andrej Karpathy)
plus ParScale, the KV cache and GQA; docs/model.md counts the lines added.
"""

import math
import inspect
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

# KV cache: attention over cached keys, whose number changes every step, skips cuDNN,
# which builds a new plan for every new number
DECODE_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]

class CausalSelfAttention(nn.Module):

    def __init__(self, config, layer_idx):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        # key, query, value projections for all heads, but in a batch
        # GQA: n_kv_head key and value heads, each shared by n_head // n_kv_head query heads
        kv_dim = config.n_kv_head * config.head_dim
        self.c_attn = nn.Linear(config.n_embd, config.n_embd + 2 * kv_dim, bias=config.bias)
        # output projection
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        # regularization
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        self.n_kv_head, self.head_dim, self.kv_dim = config.n_kv_head, config.head_dim, kv_dim # GQA
        self.layer_idx = layer_idx # KV cache: this layer's slot in it
        self.n_streams = config.n_streams
        if config.n_streams > 1:
            # ParScale prefix, per stream: n_prefix raw key and value vectors per kv head. They skip
            # c_attn, carry no position and occupy none (real tokens still sit at 0..T-1).
            # N(0, prefix_init_std), each stream its own draw: the only thing that makes them differ
            shape = (config.n_streams, config.n_kv_head, config.n_prefix, config.head_dim)
            self.prefix_k = nn.Parameter(torch.randn(shape) * config.prefix_init_std)
            self.prefix_v = nn.Parameter(torch.randn(shape) * config.prefix_init_std)

    def keys_values(self, k, v, cache):
        """k, v of the T new tokens, (R, n_kv_head, T, hs) for R = P*B rows -> the keys and values
        their queries attend to, [stream prefix | cached tokens | new tokens]. The cache holds real
        tokens only: ParScale's prefix exists once per stream (the parameter), not once per row."""
        if cache is not None:
            k, v = cache.append(self.layer_idx, k, v) # KV cache: (R, n_kv_head, pos + T, hs)
        if self.n_streams > 1:
            B = k.size(0) // self.n_streams # stream-major: stream s owns rows s*B .. s*B+B-1
            k = torch.cat([self.prefix_k.to(k.dtype).repeat_interleave(B, dim=0), k], dim=2)
            v = torch.cat([self.prefix_v.to(v.dtype).repeat_interleave(B, dim=0), v], dim=2)
        return k, v

    def decode_attention(self, q, cache):
        """
        The decode step: one new token per row, its key and value already in the cache;
        q (R, n_head, 1, hs). Written out so that nothing the size of the cache is copied, as
        keys_values + SDPA would (prefix concatenated, GQA's kv heads repeated): the scores are
        taken against this layer's whole buffer, (R, n_kv_head, max_len, hs), which is contiguous
        (torch's bf16 CPU matmul copies a strided [..., :pos + 1, :] first), its empty slots
        masked; GQA stacks the g = n_head // n_kv_head query heads of a kv head against it;
        ParScale's prefix is scored straight from the parameter.
        """
        R, Hkv, hs = q.size(0), self.n_kv_head, self.head_dim
        g = self.n_head // Hkv # GQA: query heads per kv head
        k, v = cache.k[self.layer_idx], cache.v[self.layer_idx] # (R, Hkv, max_len, hs)
        q = q.reshape(R, Hkv, g, hs) / math.sqrt(hs) # scaled here: it is smaller than the scores
        scores = q @ k.transpose(-1, -2) # (R, Hkv, g, max_len)
        scores[..., cache.pos + 1:] = float('-inf') # the empty slots: pos + 1 tokens are cached
        if self.n_streams > 1: # ParScale: the B rows of stream s score stream s's prefix
            P, n_pre = self.n_streams, self.prefix_k.size(2)
            prefix_k = self.prefix_k.to(q.dtype).unsqueeze(1).transpose(-1, -2) # (P,1,Hkv,hs,n_pre)
            prefix = q.view(P, R // P, Hkv, g, hs) @ prefix_k # (P, B, Hkv, g, n_pre)
            scores = torch.cat([prefix.view(R, Hkv, g, n_pre), scores], dim=-1) # prefix, tokens
        w = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) # softmax in float32
        if self.n_streams == 1:
            return (w @ v).view(R, self.n_head, 1, hs)
        y = w[..., n_pre:] @ v # (R, Hkv, g, hs), the cached tokens' share; then ParScale's prefix's
        w_prefix = w[..., :n_pre].reshape(P, R // P, Hkv, g, n_pre)
        y = y + (w_prefix @ self.prefix_v.to(q.dtype).unsqueeze(1)).view(R, Hkv, g, hs)
        return y.view(R, self.n_head, 1, hs)

    def forward(self, x, cache=None):
        B, T, C = x.size() # batch size, sequence length, embedding dimensionality (n_embd)
        # ParScale: the batch holds P*B rows, stream-major

        # calculate query, key, values for all heads in batch and move head forward to be the batch dim
        q, k, v  = self.c_attn(x).split([C, self.kv_dim, self.kv_dim], dim=2) # GQA: narrower k, v
        k = k.view(B, T, self.n_kv_head, C // self.n_head).transpose(1, 2) # GQA: (B, nkvh, T, hs)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) # (B, nh, T, hs)
        v = v.view(B, T, self.n_kv_head, C // self.n_head).transpose(1, 2) # GQA: (B, nkvh, T, hs)

        if cache is not None and T == 1: # the decode step: attention on the cache in place
            cache.append(self.layer_idx, k, v)
            y = self.decode_attention(q, cache)
        else:
            k, v = self.keys_values(k, v, cache) # (B, nkvh, S, hs): ParScale prefix, cache, new
            if self.n_kv_head != self.n_head: # GQA: each kv head serves several query heads
                k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
                v = v.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
            # ParScale prefix and KV cache: every query sees the S - T keys before the new tokens;
            # among the T new ones, query i sees key j <= i. Without either, plain causal
            S = k.size(2)
            mask = torch.ones(T, S, dtype=bool, device=x.device).tril(S - T) if S > T > 1 else None
            # causal self-attention; Self-attend: (B, nh, T, hs) x (B, nh, hs, T) -> (B, nh, T, T)
            with sdpa_kernel(DECODE_BACKENDS) if cache is not None else nullcontext(): # KV cache
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=S == T > 1,
                                                   dropout_p=self.dropout if self.training else 0)
        y = y.transpose(1, 2).contiguous().view(B, T, C) # re-assemble all head outputs side by side

        # output projection
        y = self.resid_dropout(self.c_proj(y))
        return y

class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc    = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu    = nn.GELU()
        self.c_proj  = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        x = self.c_fc(x)
        x = self.gelu(x)
        x = self.c_proj(x)
        x = self.dropout(x)
        return x

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
    """ParScale's output aggregation (arXiv 2505.10475, section 2), per position: the P streams'
    final hidden states concatenated, (B, T, P*C) -> Linear -> SiLU -> Linear -> softmax over P in
    float32 -> label smoothing -> their weighted sum, (B, T, C). Both Linears have biases, as the
    paper's parameter counts imply."""

    def __init__(self, config):
        super().__init__()
        self.n_streams, self.smoothing = config.n_streams, config.agg_smoothing
        self.proj_in = nn.Linear(config.n_streams * config.n_embd, config.n_embd)
        self.proj_out = nn.Linear(config.n_embd, config.n_streams)

    def weights(self, x):
        """x: (P*B, T, C), stream-major -> the streams' mixing weights, (B, T, P) in float32."""
        P, (R, T, C) = self.n_streams, x.shape
        streams = x.view(P, R // P, T, C).permute(1, 2, 0, 3).reshape(R // P, T, P * C) # (B,T,P*C)
        w = self.proj_out(F.silu(self.proj_in(streams))).float().softmax(dim=-1)
        return w * (1 - self.smoothing) + self.smoothing / P # no weight falls below smoothing / P

    def forward(self, x):
        P, (R, T, C) = self.n_streams, x.shape
        w = self.weights(x).to(x.dtype)
        return torch.einsum('btp,pbtc->btc', w, x.view(P, R // P, T, C)) # (B, T, C)

class KVCache:
    """
    The KV cache: keys and values of the real tokens, all layers in one preallocated buffer each,
    k and v of (n_layer, P*B, n_kv_head, max_len, head_dim); max_len = block_size unless given (a
    decode step reads the whole buffer, so size it to the run). No ParScale prefix: attention reads
    it from the parameter. pos counts the tokens cached so far, the next token's position.
    """

    def __init__(self, model, batch_size, device=None, dtype=None, max_len=None):
        cfg = model.config
        max_len = max_len or cfg.block_size
        if not 1 <= max_len <= cfg.block_size:
            raise ValueError(f"KVCache max_len must be in [1, {cfg.block_size}], got {max_len}")
        p = next(model.parameters())
        shape = (cfg.n_layer, cfg.n_streams * batch_size, cfg.n_kv_head, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device or p.device, dtype=dtype or p.dtype)
        self.v = torch.zeros_like(self.k)
        self.pos = 0

    def append(self, layer, k, v):
        """Appends this layer's k, v (P*B, n_kv_head, T, hs) to the cache; returns all it holds."""
        end = self.pos + k.size(2)
        if end > self.k.size(3):
            raise ValueError(f"KVCache holds {self.k.size(3)} tokens; {end} do not fit")
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304 # GPT-2 vocab_size of 50257, padded up to nearest multiple of 64 for efficiency
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int = None # GQA: key/value heads, a divisor of n_head; None = n_head (no GQA)
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True # True: bias in Linears and LayerNorms, like GPT-2. False: a bit better and faster
    n_streams: int = 1 # ParScale: P, the number of parallel streams; 1 = the plain GPT above
    n_prefix: int = 48 # ParScale: prefix key/value slots per layer and stream (the paper: 48)
    # ParScale: eps in the aggregator's w(1 - eps) + eps / P: 0.1, the paper's text (arXiv
    # 2505.10475). The official modeling code defaults to 0.01; its released checkpoints'
    # config.json set parscale_attn_smooth, reportedly to 0.1
    agg_smoothing: float = 0.1
    prefix_init_std: float = 0.02 # ParScale: prefixes start as N(0, prefix_init_std)

    def __post_init__(self):
        # config checks: a ValueError naming the field, before any weight is made
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        for name in ('block_size', 'vocab_size', 'n_layer', 'n_head', 'n_kv_head', 'n_embd',
                     'n_streams'):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.n_head % self.n_kv_head != 0:
            raise ValueError(f"n_kv_head ({self.n_kv_head}) must divide n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.n_prefix < (1 if self.n_streams > 1 else 0): # no prefix: the streams are all equal
            raise ValueError(f"n_prefix must be >= {int(self.n_streams > 1)} at n_streams="
                             f"{self.n_streams}, got {self.n_prefix}")
        if not 0.0 <= self.agg_smoothing <= 1.0:
            raise ValueError(f"agg_smoothing must be in [0, 1], got {self.agg_smoothing}")
        if not self.prefix_init_std >= 0:
            raise ValueError(f"prefix_init_std must be >= 0, got {self.prefix_init_std}")

    @property
    def head_dim(self): # GQA: the keys and values are n_kv_head * head_dim wide
        return self.n_embd // self.n_head

    @property
    def n_prefix_slots(self): # ParScale: key/value slots before the real tokens in every layer
        return self.n_prefix if self.n_streams > 1 else 0

class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.vocab_size is not None
        assert config.block_size is not None
        self.config = config

        self.transformer = nn.ModuleDict(dict(
            wte = nn.Embedding(config.vocab_size, config.n_embd),
            wpe = nn.Embedding(config.block_size, config.n_embd),
            drop = nn.Dropout(config.dropout),
            h = nn.ModuleList([Block(config, layer_idx) for layer_idx in range(config.n_layer)]),
            ln_f = nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        if config.n_streams > 1:
            self.aggregator = Aggregator(config) # ParScale: mixes the P streams before the LM head
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight # https://paperswithcode.com/method/weight-tying

        # init all weights
        self.apply(self._init_weights)
        # apply special scaled init to the residual projections, per GPT-2 paper
        for pn, p in self.named_parameters():
            if pn.endswith('c_proj.weight'):
                torch.nn.init.normal_(p, mean=0.0, std=0.02/math.sqrt(2 * config.n_layer))
        if config.n_streams > 1: # ParScale: the aggregator starts as the streams' plain average
            torch.nn.init.zeros_(self.aggregator.proj_out.weight)

    def get_num_params(self, non_embedding=True):
        """
        Return the number of parameters in the model.
        For non-embedding count (default), the position embeddings get subtracted.
        The token embeddings would too, except due to the parameter sharing these
        params are actually used as weights in the final layer, so we include them.
        """
        n_params = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n_params -= self.transformer.wpe.weight.numel()
        return n_params

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None, cache=None, streams=False):
        device = idx.device
        b, t = idx.size()
        start = cache.pos if cache is not None else 0 # KV cache: new tokens follow the cached ones
        assert start + t <= self.config.block_size, \
            f"Cannot forward sequence of length {start + t}, block size is only {self.config.block_size}"
        pos = torch.arange(start, start + t, dtype=torch.long, device=device) # shape (t)

        # forward the GPT model itself
        tok_emb = self.transformer.wte(idx) # token embeddings of shape (b, t, n_embd)
        pos_emb = self.transformer.wpe(pos) # position embeddings of shape (t, n_embd)
        x = self.transformer.drop(tok_emb + pos_emb)
        if self.config.n_streams > 1: # ParScale: every stream reads the same input, stream-major
            x = x.repeat(self.config.n_streams, 1, 1) # (P*b, t, n_embd)
        for block in self.transformer.h:
            x = block(x, cache)
        if cache is not None:
            cache.pos += t
        x = self.transformer.ln_f(x)
        h_streams = x # ParScale: each stream's own final hidden states, for streams=True
        if self.config.n_streams > 1: # ParScale: the P streams mixed per position, (b, t, n_embd),
            x = self.aggregator(x) # so the LM head runs on b rows, not P*b

        if targets is not None:
            # if we are given some desired targets also calculate the loss
            logits = self.lm_head(x)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        else:
            # inference-time mini-optimization: only forward the lm_head on the very last position
            logits = self.lm_head(x[:, [-1], :]) # note: using list [-1] to preserve the time dim
            loss = None

        if streams: # ParScale: also each stream's own logits, (P, b, t, vocab_size)
            return logits, loss, self.lm_head(h_streams).view(self.config.n_streams, *logits.shape)
        return logits, loss

    def crop_block_size(self, block_size):
        # model surgery to decrease the block size if necessary
        # e.g. we may load the GPT2 pretrained model checkpoint (block size 1024)
        # but want to use a smaller block size for some smaller, simpler model
        assert block_size <= self.config.block_size
        self.config.block_size = block_size
        self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])
        for block in self.transformer.h:
            if hasattr(block.attn, 'bias'):
                block.attn.bias = block.attn.bias[:,:,:block_size,:block_size]

    @classmethod
    def from_pretrained(cls, model_type, override_args=None):
        assert model_type in {'gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl'}
        override_args = override_args or {} # default to empty dict
        # only dropout can be overridden see more notes below
        assert all(k == 'dropout' for k in override_args)
        from transformers import GPT2LMHeadModel
        print("loading weights from pretrained gpt: %s" % model_type)

        # n_layer, n_head and n_embd are determined from model_type
        config_args = {
            'gpt2':         dict(n_layer=12, n_head=12, n_embd=768),  # 124M params
            'gpt2-medium':  dict(n_layer=24, n_head=16, n_embd=1024), # 350M params
            'gpt2-large':   dict(n_layer=36, n_head=20, n_embd=1280), # 774M params
            'gpt2-xl':      dict(n_layer=48, n_head=25, n_embd=1600), # 1558M params
        }[model_type]
        print("forcing vocab_size=50257, block_size=1024, bias=True")
        config_args['vocab_size'] = 50257 # always 50257 for GPT model checkpoints
        config_args['block_size'] = 1024 # always 1024 for GPT model checkpoints
        config_args['bias'] = True # always True for GPT model checkpoints
        # we can override the dropout rate, if desired
        if 'dropout' in override_args:
            print(f"overriding dropout rate to {override_args['dropout']}")
            config_args['dropout'] = override_args['dropout']
        # create a from-scratch initialized minGPT model
        config = GPTConfig(**config_args)
        model = GPT(config)
        sd = model.state_dict()
        sd_keys = sd.keys()
        sd_keys = [k for k in sd_keys if not k.endswith('.attn.bias')] # discard this mask / buffer, not a param

        # init a huggingface/transformers model
        model_hf = GPT2LMHeadModel.from_pretrained(model_type)
        sd_hf = model_hf.state_dict()

        # copy while ensuring all of the parameters are aligned and match in names and shapes
        sd_keys_hf = sd_hf.keys()
        sd_keys_hf = [k for k in sd_keys_hf if not k.endswith('.attn.masked_bias')] # ignore these, just a buffer
        sd_keys_hf = [k for k in sd_keys_hf if not k.endswith('.attn.bias')] # same, just the mask (buffer)
        transposed = ['attn.c_attn.weight', 'attn.c_proj.weight', 'mlp.c_fc.weight', 'mlp.c_proj.weight']
        # basically the openai checkpoints use a "Conv1D" module, but we only want to use a vanilla Linear
        # this means that we have to transpose these weights when we import them
        assert len(sd_keys_hf) == len(sd_keys), f"mismatched keys: {len(sd_keys_hf)} != {len(sd_keys)}"
        for k in sd_keys_hf:
            if any(k.endswith(w) for w in transposed):
                # special treatment for the Conv1D weights we need to transpose
                assert sd_hf[k].shape[::-1] == sd[k].shape
                with torch.no_grad():
                    sd[k].copy_(sd_hf[k].t())
            else:
                # vanilla copy over the other parameters
                assert sd_hf[k].shape == sd[k].shape
                with torch.no_grad():
                    sd[k].copy_(sd_hf[k])

        return model

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        # start with all of the candidate parameters
        param_dict = {pn: p for pn, p in self.named_parameters()}
        # filter out those that do not require grad
        param_dict = {pn: p for pn, p in param_dict.items() if p.requires_grad}
        # create optim groups. Any parameters that is 2D will be weight decayed, otherwise no.
        # i.e. all weight tensors in matmuls + embeddings decay, all biases and layernorms don't.
        # ParScale: nor do the prefixes: decay would pull every stream's prefix toward zero,
        # i.e. toward each other
        decay_params = [p for n, p in param_dict.items() if p.dim() >= 2 and '.prefix_' not in n]
        nodecay_params = [p for n, p in param_dict.items() if p.dim() < 2 or '.prefix_' in n]
        optim_groups = [
            {'params': decay_params, 'weight_decay': weight_decay},
            {'params': nodecay_params, 'weight_decay': 0.0}
        ]
        num_decay_params = sum(p.numel() for p in decay_params)
        num_nodecay_params = sum(p.numel() for p in nodecay_params)
        print(f"num decayed parameter tensors: {len(decay_params)}, with {num_decay_params:,} parameters")
        print(f"num non-decayed parameter tensors: {len(nodecay_params)}, with {num_nodecay_params:,} parameters")
        # Create AdamW optimizer and use the fused version if it is available
        fused_available = 'fused' in inspect.signature(torch.optim.AdamW).parameters
        use_fused = fused_available and device_type == 'cuda'
        extra_args = dict(fused=True) if use_fused else dict()
        optimizer = torch.optim.AdamW(optim_groups, lr=learning_rate, betas=betas, **extra_args)
        print(f"using fused AdamW: {use_fused}")

        return optimizer

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None):
        """
        Take a conditioning sequence of indices idx (LongTensor of shape (b,t)) and complete
        the sequence max_new_tokens times, feeding the predictions back into the model each time.
        Most likely you'll want to make sure to be in model.eval() mode of operation for this.
        """
        max_len = min(idx.size(1) + max_new_tokens, self.config.block_size) # KV cache, for this run
        cache = KVCache(self, idx.size(0), max_len=max_len)
        for _ in range(max_new_tokens):
            # if the sequence context is growing too long we must crop it at block_size
            idx_cond = idx if idx.size(1) <= self.config.block_size else idx[:, -self.config.block_size:]
            # KV cache: feed only the tokens not cached yet; once cropped, every position moves:
            # then recompute without it
            use_cache = idx.size(1) <= self.config.block_size
            # forward the model to get the logits for the index in the sequence
            logits, _ = self(idx[:, cache.pos:], cache=cache) if use_cache else self(idx_cond)
            # pluck the logits at the final step and scale by desired temperature
            logits = logits[:, -1, :] / temperature
            # optionally crop the logits to only the top k options
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float('Inf')
            # apply softmax to convert logits to (normalized) probabilities
            probs = F.softmax(logits, dim=-1)
            # sample from the distribution
            idx_next = torch.multinomial(probs, num_samples=1)
            # append sampled index to the running sequence and continue
            idx = torch.cat((idx, idx_next), dim=1)

        return idx
