"""
Checkpoints and streams files: what train.py writes and sample.py, bench.py and the experiments read.

A checkpoint is a plain dict of tensors and Python values (model, optimizer, model_args, iter_num, args,
...), written to a temporary file and renamed, and loaded with torch.load(weights_only=True). A streams
file (dynamic parallel scaling, arXiv 2505.10475 section 4) holds only what one P adds to a frozen
P = 1 backbone: its prefixes and aggregator, tied to that backbone by a fingerprint of its weights.
"""

import errno
import hashlib
import os
import shutil
from dataclasses import asdict

import torch

from common import UserError
from model import GPT, GPTConfig, convert_to_streams


def save_checkpoint(ckpt, out_dir, name="ckpt.pt"):
    """Write to a temporary file, then rename: a crash mid-write never leaves a half checkpoint, and a
    full disk leaves the earlier checkpoint as it was, no temporary file, and one UserError."""
    path = os.path.join(out_dir, name)
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(ckpt, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        # torch's writer can report a full disk as RuntimeError("... unexpected pos ..."), without an
        # errno: then the free space, read before the temporary file is removed, says what happened
        full = getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or shutil.disk_usage(out_dir).free < 2**20
        if os.path.exists(tmp):
            os.remove(tmp)
        if full:
            raise UserError(f"no space left on the device to save {path}: free some space, or choose another "
                            f"--out_dir; the earlier {name} there is unchanged") from None
        if isinstance(e, OSError):
            raise UserError(f"could not save {path}: {e}") from None
        raise  # not a full disk: a bug, with its traceback


def load_checkpoint(path):
    """torch.load with weights_only=True and errors that say what is wrong."""
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint at {path}: train one first (python train.py), or check the path")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"checkpoint {path} is corrupt or not a checkpoint ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_args" not in ckpt:
        raise UserError(f"checkpoint {path} lacks 'model' or 'model_args': is it a training checkpoint?")
    return ckpt


def clean_state_dict(state_dict):
    """Accept nanoGPT's checkpoints as they are: drop the `_orig_mod.` prefix torch.compile adds
    and the causal-mask buffers (`attn.bias`) that nanoGPT saves when flash attention is off."""
    return {k.removeprefix("_orig_mod."): v for k, v in state_dict.items() if not (k.endswith(".attn.bias") and v.dim() == 4)}


def model_from_checkpoint(ckpt, **overrides):
    """Rebuild the model a checkpoint (ours or nanoGPT's) describes and load its weights."""
    model = GPT(GPTConfig(**{**ckpt["model_args"], **overrides}))
    try:
        model.load_state_dict(clean_state_dict(ckpt["model"]))
    except RuntimeError as e:
        raise UserError(f"checkpoint weights do not match its model_args: {e}") from e
    return model


# -----------------------------------------------------------------------------
# streams files: one P's prefixes and aggregator for a frozen backbone

def backbone_fingerprint(model):
    """A short hash of the backbone's weights: ties a streams file to the backbone it was trained on."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        if not GPT.is_parscale_param(name):
            h.update(name.encode())
            h.update(t.detach().to("cpu", torch.float32).numpy().tobytes())
    return h.hexdigest()[:16]


def streams_state(model):
    """
    Dynamic parallel scaling (arXiv 2505.10475, section 4): with a frozen backbone, all that a given P
    adds is its prefixes and aggregator. This is that small set, as a checkpoint-like dict.
    """
    return dict(kind="streams", model_args=asdict(model.config), backbone=backbone_fingerprint(model),
                model={k: v for k, v in model.state_dict().items() if GPT.is_parscale_param(k)})


def attach_streams(backbone, streams):
    """A P=1 model + a streams_state dict -> a P-stream model sharing the backbone's tensors."""
    if streams.get("kind") != "streams":
        raise UserError("not a streams file (expected kind='streams'); a full checkpoint goes to --ckpt")
    if backbone_fingerprint(backbone) != streams["backbone"]:
        raise UserError("these streams were trained on a different backbone (weight fingerprints differ)")
    args = streams["model_args"]
    model = convert_to_streams(backbone, args["n_streams"], n_prefix=args["n_prefix"],
                               agg_smoothing=args["agg_smoothing"], prefix_init_std=args["prefix_init_std"])
    model.load_state_dict(streams["model"], strict=False)
    return model
