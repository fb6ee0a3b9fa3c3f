"""
Checkpoints and streams files: what train.py writes and sample.py, bench.py and the experiments read.

A checkpoint is a plain dict of tensors and Python values (model, optimizer, model_args, iter_num, args,
...), written to a temporary file and renamed, and loaded with torch.load(weights_only=True). A streams
file (dynamic parallel scaling, arXiv 2505.10475 section 4) holds only what one P adds to a frozen
P = 1 backbone: its prefixes and aggregator, tied to that backbone by a fingerprint of its weights.
load_checkpoint checks a file before anything is built from it: its model_args make a GPTConfig and its
weights fit that model, so that the scripts then build GPT(GPTConfig(**ckpt["model_args"])) plainly.
"""

import errno
import hashlib
import os
import shutil
from dataclasses import asdict

import torch

from cli import UserError, check, model_config
from model import GPT
from model_init import convert_to_streams, is_parscale_param


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
        full = (getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT)
                or shutil.disk_usage(out_dir).free < 2**20)
        if os.path.exists(tmp):
            os.remove(tmp)
        if full:
            raise UserError(f"no space left on the device to save {path}: free some space, or choose another "
                            f"--out_dir; the earlier {name} there is unchanged") from None
        if isinstance(e, OSError):
            raise UserError(f"could not save {path}: {e}") from None
        raise  # not a full disk: a bug, with its traceback


def load_checkpoint(path, flag=""):
    """
    A checkpoint or streams file, loaded with weights_only=True and checked: its model_args make a
    GPTConfig, its weights fit that model (a streams file: its prefixes and aggregator). nanoGPT's
    checkpoints load as they are: the `_orig_mod.` key prefix of its compiled runs and its mask buffers
    are fixed here. Every refusal is a UserError that starts with flag ("--ckpt: ...") when one is given.
    """
    say = f"{flag}: " if flag else ""
    check(os.path.isfile(path),
          f"{say}no checkpoint at {path}: train one first (python train.py), or check the path")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first_line = str(e).splitlines()[0] if str(e) else ""
        raise UserError(f"{say}checkpoint {path} is corrupt or not a checkpoint "
                        f"({type(e).__name__}: {first_line})") from e
    check(isinstance(ckpt, dict) and all(isinstance(ckpt.get(k), dict) for k in ("model", "model_args")),
          f"{say}checkpoint {path} lacks 'model' or 'model_args': is it a training checkpoint?")
    ckpt["model"] = clean_state_dict(ckpt["model"])
    with torch.device("meta"):  # the model the file describes, without memory or init: only its shapes
        model = GPT(model_config(f"{say}checkpoint {path}: its model_args", **ckpt["model_args"]))
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()
            if ckpt.get("kind") != "streams" or is_parscale_param(k)}
    have = {k: tuple(v.shape) for k, v in ckpt["model"].items()}
    if have != want:
        wrong = (sorted(set(want) ^ set(have)) or [k for k in want if want[k] != have[k]])[0]
        raise UserError(f"{say}checkpoint {path}: its weights do not fit its model_args ({wrong}: "
                        f"{have.get(wrong, 'missing')} in the file, {want.get(wrong, 'none')} in the model)")
    return ckpt


def clean_state_dict(state_dict):
    """nanoGPT's checkpoints as they are: drop the `_orig_mod.` prefix its compiled runs save and the
    causal-mask buffers (`attn.bias`) that nanoGPT saves when flash attention is off."""
    return {k.removeprefix("_orig_mod."): v for k, v in state_dict.items()
            if not (k.endswith(".attn.bias") and v.dim() == 4)}


# -----------------------------------------------------------------------------
# streams files: one P's prefixes and aggregator for a frozen backbone

def backbone_fingerprint(model):
    """A short hash of the backbone's weights: ties a streams file to the backbone it was trained on."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        if not is_parscale_param(name):
            h.update(name.encode())
            h.update(t.detach().to("cpu", torch.float32).numpy().tobytes())
    return h.hexdigest()[:16]


def streams_state(model):
    """
    Dynamic parallel scaling (arXiv 2505.10475, section 4): with a frozen backbone, all that a given P
    adds is its prefixes and aggregator. This is that small set, as a checkpoint-like dict.
    """
    return dict(kind="streams", model_args=asdict(model.config), backbone=backbone_fingerprint(model),
                model={k: v for k, v in model.state_dict().items() if is_parscale_param(k)})


def attach_streams(backbone, streams):
    """A P=1 model + a streams_state dict -> a P-stream model sharing the backbone's tensors."""
    if streams.get("kind") != "streams":
        raise UserError("not a streams file (expected kind='streams'); a full checkpoint is the model itself")
    if backbone.config.n_streams != 1:
        raise UserError(f"streams attach to a P=1 backbone, not to a P={backbone.config.n_streams} model")
    if backbone_fingerprint(backbone) != streams["backbone"]:
        raise UserError("these streams were trained on a different backbone (weight fingerprints differ)")
    args = streams["model_args"]
    model = convert_to_streams(backbone, args["n_streams"], n_prefix=args["n_prefix"],
                               agg_smoothing=args["agg_smoothing"], prefix_init_std=args["prefix_init_std"])
    model.load_state_dict(streams["model"], strict=False)
    return model


def load_streams(backbone, path, model_flag):
    """Dynamic P from the command line (train.py and sample.py --streams=PATH): the P = 1 model that
    model_flag ("--ckpt=PATH") names, with the streams file at path attached. Every refusal names both."""
    check(backbone.config.n_streams == 1, f"--streams attaches to a P=1 backbone, but {model_flag} holds a "
          f"P={backbone.config.n_streams} model: give a P=1 one, or drop --streams")
    streams = load_checkpoint(path, "--streams")
    check(streams.get("kind") == "streams", f"--streams={path} is a full checkpoint, not a streams_p{{P}}.pt "
          "file (train.py --freeze_backbone writes one); a full checkpoint goes to "
          f"{model_flag.split('=')[0]}")
    try:
        return attach_streams(backbone, streams)
    except UserError as e:  # "trained on a different backbone" alone would not say which file
        raise UserError(f"--streams={path}: {e}") from None
