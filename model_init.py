"""
Model init for train.py, the section nanoGPT's train.py calls "model init": the model a run starts from,
for each --init_from (scratch, resume, or the PATH of a checkpoint: a P=1 model converted to P streams by
the two-stage recipe, a P=1 backbone with a --streams file attached, or a model of the same P), then the
training-time wrappers --prefix_reparam and --freeze_backbone. Also the way back for saving: the
reparameterised prefixes folded into plain tensors.

Every refusal is a common.UserError that names the flag or the file, raised before train.py writes anything.
"""

import math
import os

import numpy as np
import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from checkpoint import attach_streams, load_checkpoint, model_from_checkpoint
from common import UserError, check
from model import GPT, GPTConfig, KVCache, convert_to_streams, freeze_backbone

# The GPTConfig fields a checkpoint fixes. Converting a P=1 checkpoint keeps its backbone's and takes the
# stream fields from the command line; a resume, or a checkpoint of the same P, fixes both.
BACKBONE_FIELDS = ("n_layer", "n_head", "n_kv_head", "n_embd", "block_size", "bias")
STREAM_FIELDS = ("n_streams", "n_prefix", "agg_smoothing", "prefix_init_std")


def model_args(args, vocab_size):
    """The GPTConfig fields the flags describe."""
    return dict(n_layer=args.n_layer, n_head=args.n_head, n_kv_head=None if args.n_kv_head == -1 else args.n_kv_head,
                n_embd=args.n_embd, block_size=args.block_size, bias=bool(args.bias), vocab_size=vocab_size,
                dropout=args.dropout, n_streams=args.n_streams, n_prefix=args.n_prefix, agg_smoothing=args.agg_smoothing,
                prefix_init_std=args.prefix_init_std)


def build_model(args, given, meta):
    """The model --init_from asks for. Returns (model, the checkpoint a resume continues or None,
    how the model began, the given flags a checkpoint overrode)."""
    if args.init_from == "scratch":
        vocab_size = math.ceil(meta["vocab_size"] / 64) * 64  # pad to a multiple of 64 for fast matmuls
        return GPT(GPTConfig(**model_args(args, vocab_size))), None, "from scratch", []
    if args.init_from == "resume":
        return resumed_model(args, given, meta)
    return model_from_path(args, given, meta)


def checkpoint_model(path, args, meta):
    """A checkpoint and the model it describes; refuses one trained on another vocabulary."""
    ckpt = load_checkpoint(path)
    model = model_from_checkpoint(ckpt, dropout=args.dropout)  # the architecture comes from the checkpoint
    vocab_size, tokenizer = model.config.vocab_size, ckpt.get("meta", {}).get("tokenizer")
    check(vocab_size >= meta["vocab_size"] and tokenizer in (None, meta.get("tokenizer")),
          f"vocabulary mismatch: {path} holds a model of {vocab_size} tokens ({tokenizer or 'tokenizer unknown'}), "
          f"the data in --data_dir={args.data_dir} has {meta['vocab_size']} ({meta.get('tokenizer')}): use the data it was trained on")
    return model, ckpt


def adopt_shape(args, given, config, fields):
    """A checkpoint fixes these fields: copy them into args (so the args saved with the next checkpoint
    are true) and return "--flag=given -> used" for every flag the command line gave that it overrides,
    as nanoGPT takes the model shape from the checkpoint on resume."""
    asked = GPTConfig(**model_args(args, config.vocab_size))  # what the flags alone describe
    overridden = []
    for name in fields:
        if name == "block_size" and name in given:  # a shorter context than the model's is fine, a longer one is not
            check(args.block_size <= config.block_size, f"--block_size={args.block_size} exceeds the checkpoint's block_size "
                                                        f"{config.block_size}: the model has no positions past it")
            continue
        used = getattr(config, name)
        if name in given and getattr(asked, name) != used:
            overridden.append(f"--{name}={getattr(asked, name)} -> {used}")
        setattr(args, name, type(getattr(args, name))(used))  # keep the flag's type: --bias is 1 or 0
    return overridden


def resumed_model(args, given, meta):
    """--init_from=resume: out_dir/ckpt.pt with its shape, step and optimizer state, continued as if never stopped."""
    path = os.path.join(args.out_dir, "ckpt.pt")
    check(os.path.isfile(path), f"--init_from=resume, but there is no checkpoint at {path}: train into --out_dir first, or check --out_dir")
    model, ckpt = checkpoint_model(path, args, meta)
    check(all(k in ckpt for k in ("optimizer", "iter_num", "best_val_loss", "rng", "args")),
          f"{path} is not a train.py checkpoint that can resume (no optimizer state): start from it with --init_from={path}")
    overridden = adopt_shape(args, given, model.config, BACKBONE_FIELDS + STREAM_FIELDS)
    args.freeze_backbone = args.freeze_backbone or ckpt["args"].get("freeze_backbone", False)
    args.prefix_reparam = ckpt["args"].get("prefix_reparam", 0)  # the run's own choice: its MLP is in the checkpoint
    return model, ckpt, f"resumed at step {ckpt['iter_num']}", overridden


def model_from_path(args, given, meta):
    """--init_from=PATH, a fresh start at step 0 from a checkpoint: a P=1 model converted to --n_streams
    (two-stage), a P=1 backbone with --streams attached (dynamic P), or a model of the same P."""
    path = args.init_from
    check(os.path.isfile(path), f"--init_from={path}: no checkpoint at that path (use scratch, resume, or the path of a ckpt.pt)")
    model, _ = checkpoint_model(path, args, meta)
    src = model.config
    overridden = adopt_shape(args, given, src, BACKBONE_FIELDS)
    check(args.prefix_init == "random" or (src.n_streams == 1 and args.n_streams > 1 and not args.streams),
          "--prefix_init=kv sets the prefixes of a P=1 checkpoint converted to P > 1: give --n_streams > 1 and a P=1 --init_from")
    check(not args.prefix_reparam or (src.n_streams == 1 and not args.streams),
          f"--prefix_reparam starts the prefixes afresh from an MLP: it would throw away the trained prefixes of "
          f"{'--streams=' + args.streams if args.streams else '--init_from=' + path}; use it from scratch or with a P=1 --init_from")
    if args.streams:
        check(src.n_streams == 1, f"--streams attaches to a P=1 backbone, but --init_from={path} holds a P={src.n_streams} model")
        model = attach(model, args.streams)
        overridden += adopt_shape(args, given, model.config, STREAM_FIELDS)
        return model, None, f"backbone {path} + streams {args.streams}", overridden
    if src.n_streams > 1:
        check("n_streams" not in given or args.n_streams == src.n_streams, f"cannot start P={args.n_streams} from a "
              f"P={src.n_streams} checkpoint ({path}): convert a P=1 checkpoint, or drop --n_streams to go on at P={src.n_streams}")
        return model, None, f"initialised from {path}", overridden + adopt_shape(args, given, src, STREAM_FIELDS)
    if args.n_streams == 1:
        return model, None, f"initialised from {path}", overridden
    how = f"converted P=1 -> P={args.n_streams} from {path}, {args.prefix_init} prefixes"
    return two_stage(model, args), None, how, overridden


def attach(backbone, path):
    """Dynamic P: a P=1 backbone plus a streams_p{P}.pt file (prefixes and aggregator, trained on that backbone frozen)."""
    streams = load_checkpoint(path)
    check(streams.get("kind") == "streams", f"--streams={path} is a full checkpoint, not a streams_p{{P}}.pt file "
                                            "(train.py --freeze_backbone writes one); a full checkpoint goes to --init_from")
    try:
        return attach_streams(backbone, streams)
    except UserError as e:  # name the flag: "trained on a different backbone" alone does not say which file
        raise UserError(f"--streams={path}: {e}") from e


def two_stage(base, args):
    """P=1 -> P, the paper's two-stage recipe (README, "Walk-through"): the trained backbone's very tensors
    with fresh prefixes and aggregator. With --prefix_init=kv each stream's prefix becomes the backbone's
    own keys and values on a training snippet, so the loss does not jump at conversion."""
    model = convert_to_streams(base, args.n_streams, n_prefix=args.n_prefix, agg_smoothing=args.agg_smoothing,
                               prefix_init_std=args.prefix_init_std)
    if args.prefix_init == "kv":  # one training snippet per stream, fixed by the seed
        data = np.memmap(os.path.join(args.data_dir, "train.bin"), dtype=np.uint16, mode="r")
        ix = np.random.default_rng([args.seed, 2]).integers(0, len(data) - args.n_prefix, size=args.n_streams)
        snippets = torch.from_numpy(np.stack([data[i:i + args.n_prefix] for i in ix]).astype(np.int64))  # (P, n_prefix)
        prefixes_from_kv(model, snippets)
    return model


def prepare_for_training(model, ckpt, args):
    """The wrappers the flags put on the model before training: --prefix_reparam's MLPs (as they were,
    on resume) and --freeze_backbone. Each is refused where it cannot work."""
    check(not args.freeze_backbone or model.config.n_streams > 1,
          "--freeze_backbone trains only the prefixes and the aggregator: it needs --n_streams > 1")
    if args.prefix_reparam:
        check(model.config.n_streams > 1, "--prefix_reparam needs --n_streams > 1: P = 1 has no prefixes")
        check(args.prefix_init != "kv", "--prefix_init=kv sets plain prefixes, --prefix_reparam makes them from an MLP: use one")
        add_prefix_reparam(model, args.prefix_reparam)
        if ckpt is not None:  # resume: the embeddings and MLPs as they were
            missing, unexpected = model.load_state_dict(ckpt.get("prefix_reparam", {}), strict=False)
            check(not unexpected and not any(".parametrizations." in k for k in missing),
                  f"{args.out_dir}/ckpt.pt does not hold the --prefix_reparam={args.prefix_reparam} MLPs its args name: "
                  "it cannot resume; start from it with --init_from=PATH instead")
    if args.freeze_backbone:
        freeze_backbone(model)


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
        self.mlp = nn.Sequential(nn.Linear(cfg.n_embd, hidden), nn.Tanh(), nn.Linear(hidden, cfg.n_kv_head * cfg.head_dim))

    def forward(self, emb):  # (P, n_prefix, C) -> (P, n_kv_head, n_prefix, hd)
        P, H, S, hd = self.shape
        return self.mlp(emb).view(P, S, H, hd).transpose(1, 2)

    def right_inverse(self, prefix):  # at registration: a fresh N(0, 1) embedding takes the plain prefix's place
        P, _, S, _ = self.shape
        return torch.randn(P, S, self.width, device=prefix.device, dtype=prefix.dtype)


def add_prefix_reparam(model, hidden):
    for block in model.transformer.h:
        for name in ("prefix_k", "prefix_v"):
            parametrize.register_parametrization(block.attn, name, PrefixMLP(model.config, hidden), unsafe=True)


def folded_state_dict(model):
    """model.state_dict() with every reparameterised prefix folded into the plain tensor it produces:
    what the sampling checkpoint and the streams file hold, so sample.py and the fused path never see the MLP."""
    sd = {k: v for k, v in model.state_dict().items() if ".parametrizations." not in k}
    for i, block in enumerate(model.transformer.h):
        if parametrize.is_parametrized(block.attn):
            sd[f"transformer.h.{i}.attn.prefix_k"] = block.attn.prefix_k.detach().clone()
            sd[f"transformer.h.{i}.attn.prefix_v"] = block.attn.prefix_v.detach().clone()
    return sd


def reparam_state(model):
    """The reparameterisation's own tensors (embeddings and MLPs), for the training checkpoint."""
    return {k: v for k, v in model.state_dict().items() if ".parametrizations." in k}


def plain_model(model, folded):
    """The model with plain prefixes, for the streams file: itself, or with --prefix_reparam a model built
    on the meta device (no memory, no init) that holds folded, folded_state_dict(model)."""
    if not any(parametrize.is_parametrized(block.attn) for block in model.transformer.h):
        return model
    with torch.device("meta"):
        plain = GPT(model.config)
    plain.load_state_dict(folded, assign=True)
    return plain


@torch.no_grad()
def prefixes_from_kv(model, snippets):
    """Prefix init for the two-stage recipe (ours; the paper leaves it open; docs/results.md, two-stage): stream s's
    prefix becomes the backbone's own keys and values on snippets[s], (P, n_prefix) training token ids,
    so each stream starts as the trained model reading a short real context and the loss does not jump."""
    cfg = model.config
    if tuple(snippets.shape) != (cfg.n_streams, cfg.n_prefix):
        raise ValueError(f"snippets must be (n_streams, n_prefix) = {(cfg.n_streams, cfg.n_prefix)}, got {tuple(snippets.shape)}")
    with torch.device("meta"):  # no memory and no init: every tensor comes from `model` below
        base = GPT(GPTConfig(**{**vars(cfg), "n_streams": 1}))
    base.load_state_dict(model.state_dict(), strict=False, assign=True)  # the same backbone tensors
    cache = KVCache(base, cfg.n_streams)  # one row per stream
    base.hidden(snippets, cache)
    for i, block in enumerate(model.transformer.h):
        block.attn.prefix_k.copy_(cache.k[i, :, :, :cfg.n_prefix])  # (P, n_kv_head, n_prefix, hd)
        block.attn.prefix_v.copy_(cache.v[i, :, :, :cfg.n_prefix])
