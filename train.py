"""
Train a GPT with ParScale streams. One loop, top to bottom, nanoGPT-style.

CPU toy run (the quickstart; a few minutes on a laptop, byte-level Python stdlib corpus):
    python prepare_data.py && python train.py
P = 1 against P = 4 at equal steps:
    python train.py --n_streams=1 --out_dir=out/p1 && python train.py --n_streams=4 --out_dir=out/p4
One GPU (bf16; docs/model.md, "Walk-through: every recipe as a command", has the whole command):
    python train.py --device=cuda --n_layer=6 --n_head=6 --n_embd=384 --block_size=512 --batch_size=64 \
        --n_prefix=8
Several GPUs (DDP; gloo on CPU):
    torchrun --standalone --nproc_per_node=4 train.py --device=cuda ...
Two-stage (train P=1, then continue as P=4 with fresh prefixes and aggregator):
    python train.py --n_streams=1 --out_dir=out/p1
    python train.py --init_from=out/p1/ckpt.pt --n_streams=4 --out_dir=out/p1to4 --max_iters=500
Frozen backbone (train only prefixes and aggregator): add --freeze_backbone.

The file in reading order: the flags (get_args) -> the run (main -> run) -> the model init (init_model:
GPTConfig and GPT from model.py, and the paper's recipes from model_init.py) -> the training loop (train)
-> what they call, each a short function a reader can skip: setup (DDP, device, dtype, seeds), the data,
evaluation, checkpoints, log lines, signals, then the checks on the flags. nanoGPT's order leaves the
loop at the end; here it follows the model init, as the loop is what a reader opens this file for.
Beside it: model_init.py (two-stage, the frozen backbone, --prefix_reparam), checkpoint.py (checkpoints
and streams files), diagnostics.py (the stream diagnostics), cli.py (the errors, the model-config check and
meta.json, as every script has them), machine.py (device and dtype, as sample.py and bench.py resolve them),
counts.py (parameter counts, FLOPs, MFU). A mistake the user can fix raises cli.UserError, which
`python train.py` prints as one `error: ...` line; everything that can refuse a run does so before out_dir
is written.
"""

import argparse
import gc
import json
import math
import os
import signal
import threading
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from checkpoint import load_checkpoint, load_streams, save_checkpoint, streams_state
from cli import ArgumentParser, UserError, check, entry, load_meta, model_config
from counts import estimate_mfu, param_report
from machine import peak_flops, resolve_device, resolve_dtype
from diagnostics import diversity, stream_losses
from model import GPT, GPTConfig
from model_init import (add_prefix_reparam, convert_to_streams, folded_state_dict, freeze_backbone,
                        is_reparameterised, model_on, prefixes_from_kv, reparam_state)

# The GPTConfig fields a checkpoint fixes. Converting a P=1 checkpoint keeps its backbone's and takes the
# stream fields from the command line; a resume, or a checkpoint of the same P, fixes both.
BACKBONE_FIELDS = ("n_layer", "n_head", "n_kv_head", "n_embd", "block_size", "bias")
STREAM_FIELDS = ("n_streams", "n_prefix", "agg_smoothing", "prefix_init_std")


# -----------------------------------------------------------------------------
# the command line

def get_args(argv=None):
    """The command line -> (args, the names of the flags it typed). Every value is checked here: the
    model's by model.py's own rules (GPTConfig, through cli.model_config), the others by check_args."""
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # I/O
    p.add_argument("--out_dir", default="out", help="where ckpt.pt and log.jsonl go")
    p.add_argument("--data_dir", default="data/stdlib_bytes",
                   help="folder with train.bin, val.bin, meta.json (prepare_data.py)")
    p.add_argument("--init_from", default="scratch",
                   help="scratch | resume (out_dir/ckpt.pt) | PATH to a checkpoint of P=1 or of the same P")
    # eval
    p.add_argument("--eval_interval", type=int, default=200, help="steps between evaluations and checkpoints")
    p.add_argument("--eval_iters", type=int, default=20, help="batches per split in an evaluation")
    p.add_argument("--log_interval", type=int, default=10, help="steps between log lines")
    p.add_argument("--eval_only", action="store_true", help="evaluate once and exit")
    # model
    p.add_argument("--n_layer", type=int, default=4)
    p.add_argument("--n_head", type=int, default=4)
    p.add_argument("--n_kv_head", type=int, default=None,
                   help="key/value heads (GQA), a divisor of --n_head; left out = as many as --n_head")
    p.add_argument("--n_embd", type=int, default=128)
    p.add_argument("--block_size", type=int, default=128)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--bias", type=int, default=1, help="1 = biases in Linears and LayerNorms, 0 = none")
    # ParScale
    p.add_argument("--n_streams", type=int, default=2, help="P, parallel streams; 1 = plain GPT")
    p.add_argument("--n_prefix", type=int, default=2,
                   help="prefix slots per layer per stream (paper: 48 at block 2048, ~2%%; here 2 at 128)")
    p.add_argument("--agg_smoothing", type=float, default=0.1,
                   help="aggregator label smoothing eps: 0.1, the paper's text; 0.01 = the official code's")
    p.add_argument("--prefix_init_std", type=float, default=0.02, help="std of the N(0, std) prefix init")
    p.add_argument("--prefix_init", default="random", choices=["random", "kv"],
                   help="when converting P=1 -> P>1: random N(0, prefix_init_std), or kv = the base "
                   "model's own keys/values on training snippets")
    p.add_argument("--prefix_reparam", type=int, default=0,
                   help="train the prefixes through an MLP with this hidden size (Li & Liang); 0 = plain "
                   "prefixes. Checkpoints hold the MLP; their model is folded")
    p.add_argument("--freeze_backbone", action="store_true",
                   help="train only prefixes and aggregator; also writes streams_p{P}.pt")
    p.add_argument("--streams", default="",
                   help="a streams_p{P}.pt file to attach to the P=1 checkpoint given by --init_from=PATH")
    # optimisation
    p.add_argument("--batch_size", type=int, default=32, help="sequences per micro-batch")
    p.add_argument("--gradient_accumulation_steps", type=int, default=1,
                   help="micro-batches per step (summed over DDP ranks)")
    p.add_argument("--max_iters", type=int, default=600, help="optimizer steps in total")
    p.add_argument("--learning_rate", type=float, default=2e-3)
    p.add_argument("--min_lr", type=float, default=2e-4, help="floor of the cosine decay")
    p.add_argument("--warmup_iters", type=int, default=50)
    p.add_argument("--lr_decay_iters", type=int, default=-1, help="steps of cosine decay; -1 = max_iters")
    p.add_argument("--weight_decay", type=float, default=0.1)
    p.add_argument("--beta1", type=float, default=0.9)
    p.add_argument("--beta2", type=float, default=0.99)
    p.add_argument("--grad_clip", type=float, default=1.0, help="0 = no clipping")
    # system
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu) | cpu | cuda | cuda:1 | mps")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto = bfloat16 on capable CUDA, else float32; float16 only on CUDA")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--threads", type=int, default=-1, help="CPU threads for torch; -1 = torch's default")
    p.add_argument("--peak_flops", type=float, default=-1,
                   help="peak FLOP/s for MFU; -1 = the GPU's datasheet bf16 peak if known")
    args = p.parse_args(argv)
    # parse again without defaults: what is left was typed
    p.set_defaults(**{name: None for name in vars(args)})
    typed_flags = {name for name, value in vars(p.parse_args(argv)).items() if value is not None}
    check_args(args)
    model_config("the model flags", **model_fields(args))  # vocab_size aside, which the data sets
    return args, typed_flags


def model_fields(args, vocab_size=GPTConfig.vocab_size):
    """The GPTConfig fields the flags describe."""
    return dict(n_layer=args.n_layer, n_head=args.n_head, n_kv_head=args.n_kv_head, n_embd=args.n_embd,
                block_size=args.block_size, bias=bool(args.bias), vocab_size=vocab_size, dropout=args.dropout,
                n_streams=args.n_streams, n_prefix=args.n_prefix, agg_smoothing=args.agg_smoothing,
                prefix_init_std=args.prefix_init_std)


# -----------------------------------------------------------------------------
# the run: the model init, then the training loop

def main(argv=None):
    args, typed_flags = get_args(argv)
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        run(args, typed_flags)
    finally:  # callers in the same process (the tests) get their own handlers back
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run(args, typed_flags):
    """Set up, build, check, then train (or evaluate). Nothing is written to out_dir before every check has
    passed."""
    system = setup(args)
    meta = load_meta(args.data_dir)  # and checks that train.bin and val.bin are there
    model, ckpt, origin, overridden = init_model(args, typed_flags, meta)
    # the training context: --block_size when typed (at most the model's), else the model's own
    block_size = args.block_size if "block_size" in typed_flags else model.config.block_size
    tokens = count_tokens(args, block_size)
    model.to(system.device)
    optimizer = model.configure_optimizers(args.weight_decay, args.learning_rate, (args.beta1, args.beta2),
                                           system.device_type)
    iter_num, best_val_loss = 0, float("inf")
    if ckpt is not None:  # resume
        optimizer.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["rng"]["torch"])  # dropout's RNG continues where it stopped
        iter_num, best_val_loss = ckpt["iter_num"], ckpt["best_val_loss"]
    ckpt = None  # free memory
    if system.master:
        report(args, system, model, origin, overridden, meta, tokens, block_size)
    if args.eval_only:
        if system.master:
            print(json.dumps(evaluate(model, args, system, block_size)))
        return
    train(args, system, model, optimizer, meta, block_size, iter_num, best_val_loss)


def init_model(args, typed_flags, meta):
    """
    nanoGPT's "model init", with the paper's recipes (arXiv 2505.10475, section 4) as the flags ask:
    the model --init_from names, from scratch, resumed, or a trained model that goes on as it is,
    converted P=1 -> P streams (two-stage) or with a --streams file (dynamic P); then --prefix_reparam
    and --freeze_backbone. Returns (model, the checkpoint a resume continues or None, where the model
    came from, "--flag=typed -> used" for each typed flag a checkpoint overrides).
    """
    vocab_size = math.ceil(meta["vocab_size"] / 64) * 64  # padded to a multiple of 64 for fast matmuls
    model_args = model_fields(args, vocab_size)
    ckpt, overridden = None, []
    if args.init_from == "scratch":
        model = GPT(GPTConfig(**model_args))
        origin = "from scratch"
    else:  # a checkpoint fixes the model's shape, as nanoGPT's resume does; converting a P=1 model to P
        # streams (two-stage) takes the stream fields from the flags
        path = os.path.join(args.out_dir, "ckpt.pt") if args.init_from == "resume" else args.init_from
        loaded = load_checkpoint(path, f"--init_from={args.init_from}")
        src = GPTConfig(**{**loaded["model_args"], "dropout": args.dropout})
        check_start(args, typed_flags, loaded, path, src, meta)
        model = GPT(src)
        model.load_state_dict(loaded["model"])
        keeps_p = src.n_streams > 1 or args.streams or args.init_from == "resume"  # else P is the flags'
        fixed = BACKBONE_FIELDS + (STREAM_FIELDS if keeps_p else ())
        if args.init_from == "resume":  # goes on as if never stopped: its shape, step, optimizer state
            ckpt, origin = loaded, f"resumed at step {loaded['iter_num']}"
        elif args.streams:  # dynamic P: a streams file's prefixes and aggregator on this frozen backbone
            model = load_streams(model, args.streams, f"--init_from={path}")
            origin = f"backbone {path} + streams {args.streams}"
        elif src.n_streams == 1 and args.n_streams > 1:  # two-stage: fresh prefixes and aggregator
            stream_args = {name: model_args[name] for name in STREAM_FIELDS if name != "n_streams"}
            model = convert_to_streams(model, args.n_streams, **stream_args)
            if args.prefix_init == "kv":
                prefixes_from_kv(model, prefix_snippets(args))
            origin = f"converted P=1 -> P={args.n_streams} from {path}, {args.prefix_init} prefixes"
        else:  # as it is: a P=1 model at --n_streams=1, or a P > 1 model at its own P
            origin = f"initialised from {path}"
        asked = GPTConfig(**model_args)  # what the flags alone describe
        overridden = [f"--{name}={getattr(asked, name)} -> {getattr(model.config, name)}" for name in fixed
                      if name in typed_flags and name != "block_size"
                      and getattr(asked, name) != getattr(model.config, name)]
    # the training-time wrappers: --prefix_reparam's MLPs (a resume keeps the run's own), --freeze_backbone
    reparam = ckpt["args"].get("prefix_reparam", 0) if ckpt else args.prefix_reparam
    if reparam:
        check(model.config.n_streams > 1, "--prefix_reparam needs --n_streams > 1: P = 1 has no prefixes")
        add_prefix_reparam(model, reparam)
        if ckpt is not None:  # resume: the embeddings and MLPs as they were
            missing, unexpected = model.load_state_dict(ckpt.get("prefix_reparam", {}), strict=False)
            check(not unexpected and not any(".parametrizations." in k for k in missing),
                  f"{args.out_dir}/ckpt.pt does not hold the --prefix_reparam={reparam} MLPs its args name: "
                  "it cannot resume; start from it with --init_from=PATH instead")
    if args.freeze_backbone or (ckpt is not None and ckpt["args"].get("freeze_backbone", False)):
        check(model.config.n_streams > 1,
              "--freeze_backbone trains only the prefixes and the aggregator: it needs --n_streams > 1")
        freeze_backbone(model)
    return model, ckpt, origin, overridden


def get_lr(args, it):
    """Linear warmup, then cosine decay to min_lr at lr_decay_iters (-1: max_iters), as nanoGPT."""
    decay_iters = args.max_iters if args.lr_decay_iters == -1 else args.lr_decay_iters
    if it < args.warmup_iters:
        return args.learning_rate * (it + 1) / (args.warmup_iters + 1)
    if it >= decay_iters:
        return args.min_lr
    ratio = (it - args.warmup_iters) / max(1, decay_iters - args.warmup_iters)
    return args.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (args.learning_rate - args.min_lr)


def train(args, system, model, optimizer, meta, block_size, iter_num, best_val_loss):
    """The loop: lr -> (eval, checkpoint on schedule and at the last step) -> forward/backward with gradient
    accumulation -> clip -> step -> log."""
    raw_model = model
    if system.ddp:
        model = DDP(model, device_ids=[system.local_rank] if system.device_type == "cuda" else None)
    accum = args.gradient_accumulation_steps // system.world  # micro-batches per rank
    scaler = torch.amp.GradScaler(system.device_type, enabled=(system.dtype == "float16"))
    stop = stop_on_signal()
    log = os.path.join(args.out_dir, "log.jsonl") if system.master else None  # rank 0 logs
    if log:  # the first write to out_dir
        os.makedirs(args.out_dir, exist_ok=True)
        open(log, "a").close()
    # disable=None: a bar only on a terminal, so a redirected log is plain lines. `with`: the bar ends its
    # line even when a check or a save (a full disk) raises, so main's `error:` line is a line of its own
    with tqdm(total=args.max_iters, initial=iter_num, disable=None if system.master else True,
              dynamic_ncols=True) as bar:
        t0 = time.time()
        while True:
            lr = get_lr(args, iter_num)
            for group in optimizer.param_groups:
                group["lr"] = lr

            if system.master and (iter_num % args.eval_interval == 0 or iter_num == args.max_iters):
                ev = evaluate(raw_model, args, system, block_size)
                check(math.isfinite(ev["train"]) and math.isfinite(ev["val"]),
                      f"non-finite eval loss at step {iter_num} ({ev}): lower --learning_rate? "
                      f"The last good checkpoint in {args.out_dir} is kept")
                best_val_loss = min(best_val_loss, ev["val"])
                log_eval(ev, iter_num, log)
                if iter_num > 0:
                    save(raw_model, optimizer, iter_num, best_val_loss, args, meta)
            if iter_num >= args.max_iters:
                break

            # forward / backward with gradient accumulation
            for micro in range(accum):
                micro_key = micro * system.world + system.rank  # every rank's micro-batches differ
                X, Y = get_batch(args, system, block_size, "train", 1, iter_num, micro_key)
                if system.ddp:  # all-reduce gradients only on the last micro-step
                    model.require_backward_grad_sync = micro == accum - 1
                with system.autocast():
                    # the forward. model(X, Y, streams=True) also returns each stream's logits,
                    # (P, B, T, vocab): an extra loss on them belongs here, before the division, and
                    # trains under DDP as this one does
                    logits, loss = model(X, Y)
                    loss = loss / accum
                scaler.scale(loss).backward()
            if args.grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(raw_model.parameters(), args.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            iter_num += 1
            bar.update(1)

            if iter_num % args.log_interval == 0 and system.master:
                dt, t0 = (time.time() - t0) / args.log_interval, time.time()
                lossf = loss.item() * accum  # .item(): a sync, so only here
                log_step(raw_model, lossf, lr, dt, iter_num, args, system, block_size, bar, log)
            if agreed_stop(stop, iter_num, args, system):
                if system.master:
                    save(raw_model, optimizer, iter_num, best_val_loss, args, meta)
                    tqdm.write(f"interrupted: saved step {iter_num} to {args.out_dir}/ckpt.pt; "
                               "continue with --init_from=resume")
                break
    if system.ddp:
        del model  # after a backward DDP sits in a reference cycle: collect it now, before its process group goes
        gc.collect()
        dist.destroy_process_group()


# -----------------------------------------------------------------------------
# setup: DDP, device, dtype, seeds

@dataclass
class System:
    """Where this process trains, decided once by setup()."""
    device: str  # "cpu", "cuda:0", "mps"
    device_type: str  # "cpu" | "cuda" | "mps": for autocast and pinned memory
    dtype: str  # "float32" | "bfloat16" | "float16"; all but float32 run under autocast
    peak: Optional[float]  # peak FLOP/s for MFU; None = unknown
    ddp: bool = False
    rank: int = 0
    local_rank: int = 0
    world: int = 1

    @property
    def master(self):  # rank 0 evaluates, logs and saves
        return self.rank == 0

    def autocast(self):
        if self.dtype == "float32":
            return nullcontext()
        return torch.autocast(self.device_type, dtype=getattr(torch, self.dtype))


def setup(args):
    """DDP, device, dtype and seeds. Writes no file."""
    ddp = int(os.environ.get("RANK", -1)) != -1  # started by torchrun
    rank, local_rank, world = (0, 0, 1)
    if ddp:
        rank, local_rank, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    device = resolve_device(args.device, who="train.py")
    if ddp and device.startswith("cuda"):  # one GPU per process: the local rank's
        check(local_rank < torch.cuda.device_count(), "torchrun started more processes per node than the "
              f"{torch.cuda.device_count()} GPUs: lower --nproc_per_node")
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    device_type = device.split(":")[0]
    # auto = bfloat16 on a CUDA GPU that supports it, else float32 (resolve_dtype's CPU rule,
    # cpu_auto="float32"): on the CPU, bf16 autocast does not speed up training at the quickstart's width
    # (docs/reference.md, Device and dtype)
    dtype = str(resolve_dtype(args.dtype, device)[0]).removeprefix("torch.")
    gpu_peak = peak_flops(torch.cuda.get_device_name(device)) if device_type == "cuda" else None
    peak = args.peak_flops if args.peak_flops > 0 else gpu_peak
    if ddp:
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    torch.manual_seed(args.seed + rank)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return System(device, device_type, dtype, peak, ddp, rank, local_rank, world)


# -----------------------------------------------------------------------------
# the data: train.bin and val.bin are uint16 token ids, meta.json says which tokenizer

def count_tokens(args, block_size):
    """Tokens per split; refuses a split shorter than one block plus its last target."""
    tokens = {}
    for split in ("train", "val"):
        path = os.path.join(args.data_dir, f"{split}.bin")
        tokens[split] = os.path.getsize(path) // 2  # uint16
        check(tokens[split] >= block_size + 1, f"{path} has {tokens[split]} tokens, fewer than --block_size "
              f"+ 1 = {block_size + 1}: lower --block_size or prepare more data")
    return tokens


def get_batch(args, system, block_size, split, *key):
    """A batch that is a pure function of (seed, split, key): the data position is the step number,
    so a resumed run reads exactly the batches the uninterrupted run would have."""
    # reopened every time: memmaps leak
    data = np.memmap(os.path.join(args.data_dir, f"{split}.bin"), dtype=np.uint16, mode="r")
    rng = np.random.default_rng([args.seed, split == "val", *key])
    ix = rng.integers(0, len(data) - block_size, size=args.batch_size)
    x = torch.from_numpy(np.stack([data[i:i + block_size] for i in ix]).astype(np.int64))  # (B, T)
    y = torch.from_numpy(np.stack([data[i + 1:i + 1 + block_size] for i in ix]).astype(np.int64))  # x + 1
    if system.device_type == "cuda":
        x, y = x.pin_memory(), y.pin_memory()
        return x.to(system.device, non_blocking=True), y.to(system.device, non_blocking=True)
    return x.to(system.device), y.to(system.device)


def prefix_snippets(args):
    """--prefix_init=kv: one n_prefix-token training snippet per stream, (P, n_prefix), fixed by the seed."""
    data = np.memmap(os.path.join(args.data_dir, "train.bin"), dtype=np.uint16, mode="r")
    ix = np.random.default_rng([args.seed, 2]).integers(0, len(data) - args.n_prefix, size=args.n_streams)
    return torch.from_numpy(np.stack([data[i:i + args.n_prefix] for i in ix]).astype(np.int64))


# -----------------------------------------------------------------------------
# evaluation, checkpoints, log lines, signals

@torch.no_grad()
def evaluate(model, args, system, block_size):
    """Mean loss on the same eval_iters batches of each split every time; for P > 1 also how the
    aggregator mixes the streams and, on val, the stream diagnostics (diagnostics.py).
    Runs on the raw model on rank 0 alone, so it triggers no DDP collective."""
    model.eval()
    out, weights, hook, P = {}, [], None, model.config.n_streams
    if P > 1:
        hook = model.aggregator.register_forward_hook(
            lambda m, inp, _: weights.append(m.weights(inp[0]).flatten(0, 1).detach()))
    for split in ("train", "val"):
        losses, nlls, mixes, kls = torch.zeros(args.eval_iters), [], [], []
        for k in range(args.eval_iters):
            X, Y = get_batch(args, system, block_size, split, 0, k)  # key (0, k): no training step's batch
            with system.autocast():
                if split == "val" and P > 1:  # the mixture's loss and each stream's, from one forward
                    nll, mix, kl = stream_losses(model, X, Y)
                    nlls.append(nll), mixes.append(mix), kls.append(kl)
                    losses[k] = mix.mean().item()
                else:
                    losses[k] = model(X, Y)[1].item()
        out[split] = losses.mean().item()
    if hook is not None:
        hook.remove()
        w = torch.cat(weights)  # (positions, P)
        out["stream_weight"] = [round(x, 4) for x in w.mean(0).tolist()]
        out["stream_entropy"] = -(w * w.log()).sum(-1).mean().item()  # ln P = uniform mix, 0 = one stream
        out.update(diversity(torch.cat(nlls, dim=1), torch.cat(mixes)), kl=sum(kls) / len(kls))
    model.train()
    return out


def save(model, optimizer, iter_num, best_val_loss, args, meta):
    """ckpt.pt, a plain dict that loads with weights_only=True; with a frozen backbone also streams_p{P}.pt,
    the small file dynamic P needs. A full disk is a UserError (checkpoint.save_checkpoint)."""
    folded = folded_state_dict(model)  # plain prefixes: what sample.py and the fused path read
    save_checkpoint(dict(model=folded, optimizer=optimizer.state_dict(), model_args=asdict(model.config),
                         iter_num=iter_num, best_val_loss=best_val_loss, args=vars(args), meta=meta,
                         rng=dict(torch=torch.get_rng_state()), prefix_reparam=reparam_state(model)),
                    args.out_dir)
    if not all(p.requires_grad for p in model.parameters()):  # a frozen backbone: its streams file too
        plain = model_on(model.config, folded) if is_reparameterised(model) else model
        save_checkpoint(streams_state(plain), args.out_dir, f"streams_p{model.config.n_streams}.pt")


def write_log(log, **record):
    """Append a JSON line to log.jsonl (None off rank 0): opened per record, so a full disk leaves one
    UserError."""
    if log:
        try:
            with open(log, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            raise UserError(f"could not write {log} ({e.strerror or e}): free some space, or choose another "
                            "--out_dir") from None


def log_eval(ev, iter_num, log):
    agg = ""
    if "stream_weight" in ev:
        agg = (f", stream weights {ev['stream_weight']}, entropy {ev['stream_entropy']:.3f}, streams alone "
               f"{ev['stream_loss']}, gain {ev['gain']:+.4f}, rho {ev['rho']:.3f}")
    tqdm.write(f"step {iter_num}: train loss {ev['train']:.4f}, val loss {ev['val']:.4f}{agg}")
    write_log(log, kind="eval", step=iter_num, **ev)


def log_step(model, lossf, lr, dt, iter_num, args, system, block_size, bar, log):
    """The fixed-field line: step | loss | lr | ms | tok/s | mfu."""
    check(math.isfinite(lossf), f"loss is {lossf} at step {iter_num}: lower --learning_rate? "
                                f"The last good checkpoint in {args.out_dir} is kept")
    tok_s = args.gradient_accumulation_steps * args.batch_size * block_size / dt
    mfu = estimate_mfu(model, tok_s, block_size, system.peak)
    mfu_s = f"{100 * mfu:5.1f}%" if mfu is not None else "  n/a"
    tqdm.write(f"step {iter_num:6d} | loss {lossf:.4f} | lr {lr:.2e} | {1000 * dt:7.1f} ms | "
               f"{tok_s:9.0f} tok/s | mfu {mfu_s}")
    bar.set_postfix(loss=f"{lossf:.4f}", lr=f"{lr:.1e}", tok_s=f"{tok_s:.0f}")
    write_log(log, kind="train", step=iter_num, loss=lossf, lr=lr, ms=1000 * dt, tok_s=tok_s, mfu=mfu)


def report(args, system, model, origin, overridden, meta, tokens, block_size):
    """Say once, at start-up, what runs where (device, dtype, attention path, MFU peak), the model, the
    data."""
    cfg, r = model.config, param_report(model)
    attn = "SDPA causal (flash-eligible)" if cfg.n_streams == 1 else "SDPA with prefix + shared causal mask"
    mfu = (f"MFU against {system.peak / 1e12:.0f} TFLOP/s" if system.peak else
           "MFU n/a (peak FLOP/s unknown: --peak_flops)")
    print(f"device {system.device} ({system.device_type}), dtype {system.dtype}, attention: {attn}, "
          f"DDP world {system.world}, {mfu}")
    if overridden:
        print(f"the checkpoint overrides {', '.join(overridden)}")
    print(f"model {origin}: P={cfg.n_streams}, {cfg.n_layer} layers, {cfg.n_head} heads ({cfg.n_kv_head} "
          f"kv), width {cfg.n_embd}, block {cfg.block_size}, prefix {cfg.n_prefix_slots}, "
          f"vocab {cfg.vocab_size}")
    frozen = " (backbone frozen)" if not all(p.requires_grad for p in model.parameters()) else ""
    print("parameters: " + ", ".join(f"{k} {v:,}" for k, v in r.items()) + frozen)
    per_step = args.gradient_accumulation_steps * args.batch_size * block_size
    print(f"data {args.data_dir}: {meta.get('tokenizer')} tokens, train {tokens['train']:,}, "
          f"val {tokens['val']:,}; {per_step:,} tokens per step")


def stop_on_signal():
    """SIGINT / SIGTERM only raise a flag: the loop finishes its step, saves and exits cleanly."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: stop.set())
    return stop


def agreed_stop(stop, iter_num, args, system):
    """Under DDP every rank must stop at the same step; agreeing is a sync, so only at log steps."""
    if not system.ddp:
        return stop.is_set()
    if iter_num % args.log_interval != 0:
        return False
    flag = torch.tensor(float(stop.is_set()), device=system.device)
    dist.all_reduce(flag)
    return flag.item() > 0


# -----------------------------------------------------------------------------
# the checks on the flags (get_args) and on the checkpoint --init_from names (init_model)

def check_args(args):
    """Refuse flag values that cannot work, naming the flag, before anything is built or written. The model's
    own fields (sizes, dropout, the ParScale fields) are model.py's to check: get_args asks GPTConfig."""
    for name in ("batch_size", "gradient_accumulation_steps", "eval_interval", "eval_iters", "log_interval"):
        check(getattr(args, name) >= 1, f"--{name} must be >= 1, got {getattr(args, name)}")
    for name in ("max_iters", "warmup_iters", "min_lr", "weight_decay", "grad_clip", "seed",
                 "prefix_reparam"):
        check(getattr(args, name) >= 0, f"--{name} must be >= 0, got {getattr(args, name)}")
    for name in ("lr_decay_iters", "threads", "peak_flops"):  # -1 = not set
        value = getattr(args, name)
        check(value == -1 or value > 0, f"--{name} must be -1 or > 0, got {value}")
    check(args.learning_rate > 0, f"--learning_rate must be > 0, got {args.learning_rate}")
    check(args.min_lr <= args.learning_rate,
          f"--min_lr ({args.min_lr}) must not exceed --learning_rate ({args.learning_rate})")
    check(0 <= args.beta1 < 1 and 0 <= args.beta2 < 1,
          f"--beta1 and --beta2 must be in [0, 1), got {args.beta1} and {args.beta2}")
    check(args.bias in (0, 1), f"--bias must be 1 (biases) or 0 (none), got {args.bias}")
    check(not (args.prefix_reparam and args.prefix_init == "kv"),
          "--prefix_init=kv sets plain prefixes, --prefix_reparam makes them from an MLP: use one")
    check(not args.streams or args.init_from not in ("scratch", "resume"),
          "--streams attaches streams to a P=1 backbone: give that backbone's checkpoint as --init_from=PATH")
    check(args.prefix_init == "random" or args.init_from != "scratch",
          "--prefix_init=kv takes the prefixes from a trained P=1 model: give its checkpoint as "
          "--init_from=PATH")
    check(not os.path.exists(args.out_dir) or os.path.isdir(args.out_dir),
          f"--out_dir={args.out_dir} is a file, not a folder")
    world = int(os.environ.get("WORLD_SIZE", 1))
    check(args.gradient_accumulation_steps % world == 0,
          f"--gradient_accumulation_steps ({args.gradient_accumulation_steps}) must be a multiple of the "
          f"{world} DDP ranks")


def check_start(args, typed_flags, ckpt, path, src, meta):
    """Refuse what the checkpoint at path (its config src) cannot start or resume, naming the flags."""
    vocab_size, tokenizer = src.vocab_size, ckpt.get("meta", {}).get("tokenizer")
    check(vocab_size >= meta["vocab_size"] and tokenizer in (None, meta.get("tokenizer")),
          f"vocabulary mismatch: {path} holds a model of {vocab_size} tokens "
          f"({tokenizer or 'tokenizer unknown'}), the data in --data_dir={args.data_dir} has "
          f"{meta['vocab_size']} ({meta.get('tokenizer')}): use the data it was trained on")
    if "block_size" in typed_flags:  # a shorter context than the model's is fine, a longer one is not
        check(args.block_size <= src.block_size, f"--block_size={args.block_size} exceeds the checkpoint's "
              f"block_size {src.block_size}: the model has no positions past it")
    if args.init_from == "resume":
        check(all(k in ckpt for k in ("optimizer", "iter_num", "best_val_loss", "rng", "args")),
              f"{path} is not a train.py checkpoint that can resume (no optimizer state): start from it with "
              f"--init_from={path}")
        return
    converts = src.n_streams == 1 and args.n_streams > 1 and not args.streams
    check(args.prefix_init == "random" or converts, "--prefix_init=kv sets the prefixes of a P=1 checkpoint "
          "converted to P > 1: give --n_streams > 1 and a P=1 --init_from")
    check(args.prefix_init == "random" or args.n_prefix <= src.block_size,
          f"--prefix_init=kv reads --n_prefix={args.n_prefix} tokens, more than the model's block_size "
          f"{src.block_size}")
    check(not args.prefix_reparam or (src.n_streams == 1 and not args.streams),
          "--prefix_reparam starts the prefixes afresh from an MLP: it would throw away the trained prefixes "
          f"of {'--streams=' + args.streams if args.streams else '--init_from=' + path}; use it from scratch "
          "or with a P=1 --init_from")
    same_p = "n_streams" not in typed_flags or args.n_streams == src.n_streams
    check(args.streams or src.n_streams == 1 or same_p,
          f"cannot start P={args.n_streams} from a P={src.n_streams} checkpoint ({path}): convert a P=1 "
          f"checkpoint, or drop --n_streams to go on at P={src.n_streams}")


if __name__ == "__main__":
    entry(main)
