"""
Train a GPT with ParScale streams. One loop, top to bottom, nanoGPT-style.

CPU toy run (the quickstart; a few minutes on a laptop, byte-level Python stdlib corpus):
    python prepare_data.py && python train.py
P = 1 against P = 4 at equal steps:
    python train.py --n_streams=1 --out_dir=out/p1 && python train.py --n_streams=4 --out_dir=out/p4
One GPU (bf16; see README for the preset):
    python train.py --device=cuda --n_layer=6 --n_head=6 --n_embd=384 --block_size=512 --batch_size=64 --n_prefix=8
Several GPUs (DDP; gloo on CPU):
    torchrun --standalone --nproc_per_node=4 train.py --device=cuda ...
Two-stage (train P=1, then continue as P=4 with fresh prefixes and aggregator):
    python train.py --n_streams=1 --out_dir=out/p1
    python train.py --init_from=out/p1/ckpt.pt --n_streams=4 --out_dir=out/p1to4 --max_iters=500
Frozen backbone (train only prefixes and aggregator): add --freeze_backbone.
"""

import argparse
import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from model import (GPT, GPTConfig, attach_streams, convert_to_streams, freeze_backbone, load_checkpoint, model_from_checkpoint,
                   prefixes_from_kv, save_checkpoint, streams_state)

PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16, vendor datasheets


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # I/O
    p.add_argument("--out_dir", default="out", help="where ckpt.pt and log.jsonl go")
    p.add_argument("--data_dir", default="data/stdlib_bytes", help="folder with train.bin, val.bin, meta.json (prepare_data.py)")
    p.add_argument("--init_from", default="scratch", help="scratch | resume (out_dir/ckpt.pt) | PATH to a checkpoint of P=1 or of the same P")
    p.add_argument("--eval_interval", type=int, default=100, help="steps between evaluations and checkpoints")
    p.add_argument("--eval_iters", type=int, default=20, help="batches per split in an evaluation")
    p.add_argument("--log_interval", type=int, default=10, help="steps between log lines")
    p.add_argument("--eval_only", action="store_true", help="evaluate once and exit")
    # model
    p.add_argument("--n_layer", type=int, default=4)
    p.add_argument("--n_head", type=int, default=4)
    p.add_argument("--n_kv_head", type=int, default=-1, help="key/value heads; -1 = n_head (no GQA)")
    p.add_argument("--n_embd", type=int, default=128)
    p.add_argument("--block_size", type=int, default=128)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--bias", type=int, default=1, help="1 = biases in Linears and LayerNorms")
    # ParScale
    p.add_argument("--n_streams", type=int, default=2, help="P, parallel streams; 1 = plain GPT")
    p.add_argument("--n_prefix", type=int, default=4, help="prefix slots per layer per stream (paper: 48 at block 2048; keep ~2-3%% of block_size)")
    p.add_argument("--agg_smoothing", type=float, default=0.01, help="aggregator label smoothing eps")
    p.add_argument("--prefix_init_std", type=float, default=0.02, help="std of the N(0, std) prefix init")
    p.add_argument("--prefix_init", default="random", choices=["random", "kv"],
                   help="when converting P=1 -> P>1: random N(0, prefix_init_std), or kv = the base model's own keys/values on training snippets")
    p.add_argument("--freeze_backbone", action="store_true", help="train only prefixes and aggregator; also writes streams_p{P}.pt")
    p.add_argument("--streams", default="", help="a streams_p{P}.pt file to attach to the P=1 checkpoint given by --init_from=PATH")
    # optimisation
    p.add_argument("--batch_size", type=int, default=32, help="sequences per micro-batch")
    p.add_argument("--gradient_accumulation_steps", type=int, default=1, help="micro-batches per step (summed over DDP ranks)")
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
    p.add_argument("--dtype", default="auto", help="auto (bfloat16 on capable CUDA, else float32) | float32 | bfloat16 | float16")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--threads", type=int, default=-1, help="CPU threads for torch; -1 = torch's default")
    p.add_argument("--peak_flops", type=float, default=-1, help="for MFU; -1 = look up the GPU (H100/H200/A100), else none")
    p.add_argument("--progress", type=int, default=1, help="1 = tqdm progress bar")
    args = p.parse_args(argv)
    if args.lr_decay_iters == -1:
        args.lr_decay_iters = args.max_iters
    for name in ["eval_interval", "eval_iters", "log_interval", "batch_size", "gradient_accumulation_steps"]:
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.max_iters < 0 or args.warmup_iters < 0:
        p.error("--max_iters and --warmup_iters must be >= 0")
    if args.dtype not in ("auto", "float32", "bfloat16", "float16"):
        p.error(f"--dtype must be auto, float32, bfloat16 or float16, got {args.dtype}")
    return args


def load_meta(data_dir):
    path = os.path.join(data_dir, "meta.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: run prepare_data.py first (python prepare_data.py)")
    with open(path) as f:
        return json.load(f)


def main(argv=None):
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        run_training(get_args(argv))
    finally:  # callers in the same process (the tests) get their own handlers back
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_training(args):

    # system: DDP, device, dtype, seeds -------------------------------------------------------
    ddp = int(os.environ.get("RANK", -1)) != -1
    rank, local_rank, world = 0, 0, 1
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if ddp:
        rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
        if device.startswith("cuda"):
            device = f"cuda:{local_rank}"
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
        if args.gradient_accumulation_steps % world != 0:
            raise ValueError(f"--gradient_accumulation_steps ({args.gradient_accumulation_steps}) must be a multiple of the {world} ranks")
    master = rank == 0
    device_type = "cuda" if device.startswith("cuda") else device.split(":")[0]
    dtype = args.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device_type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    accum = args.gradient_accumulation_steps // world
    torch.manual_seed(args.seed + rank)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    autocast = nullcontext() if dtype == "float32" else torch.autocast(device_type=device_type, dtype=ptdtype)

    # data -------------------------------------------------------------------------------------
    meta = load_meta(args.data_dir)
    split_tokens = {}
    for split in ("train", "val"):
        path = os.path.join(args.data_dir, f"{split}.bin")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} not found: run prepare_data.py first")
        split_tokens[split] = os.path.getsize(path) // 2
        if split_tokens[split] < args.block_size + 1:
            raise ValueError(f"{path} has {split_tokens[split]} tokens, fewer than block_size + 1 = {args.block_size + 1}")

    def get_batch(split, *key):
        """A batch that is a pure function of (seed, split, key): the data position is the step
        number, so a resumed run reads exactly the batches the uninterrupted run would have."""
        data = np.memmap(os.path.join(args.data_dir, f"{split}.bin"), dtype=np.uint16, mode="r")  # reopened: memmaps leak
        rng = np.random.default_rng([args.seed, split == "val", *key])
        ix = rng.integers(0, len(data) - args.block_size, size=args.batch_size)
        x = torch.from_numpy(np.stack([data[i:i + args.block_size] for i in ix]).astype(np.int64))
        y = torch.from_numpy(np.stack([data[i + 1:i + 1 + args.block_size] for i in ix]).astype(np.int64))
        if device_type == "cuda":
            return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        return x.to(device), y.to(device)

    # model ------------------------------------------------------------------------------------
    vocab_size = math.ceil(meta["vocab_size"] / 64) * 64  # pad to a multiple of 64 for fast matmuls
    parscale = dict(n_prefix=args.n_prefix, agg_smoothing=args.agg_smoothing, prefix_init_std=args.prefix_init_std)
    iter_num, best_val_loss, ckpt = 0, float("inf"), None
    if args.init_from == "scratch":
        model_args = dict(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, block_size=args.block_size,
                          bias=bool(args.bias), vocab_size=vocab_size, dropout=args.dropout, n_streams=args.n_streams,
                          n_kv_head=None if args.n_kv_head == -1 else args.n_kv_head, **parscale)
        model = GPT(GPTConfig(**model_args))
        how = "from scratch"
    else:
        resume = args.init_from == "resume"
        ckpt = load_checkpoint(os.path.join(args.out_dir, "ckpt.pt") if resume else args.init_from)
        model = model_from_checkpoint(ckpt, dropout=args.dropout)  # the architecture comes from the checkpoint
        src = model.config
        ckpt_tok = ckpt.get("meta", {}).get("tokenizer")
        if src.vocab_size < meta["vocab_size"] or ckpt_tok not in (None, meta.get("tokenizer")):
            raise ValueError(f"vocabulary mismatch: the checkpoint's model has {src.vocab_size} tokens ({ckpt_tok or 'tokenizer unknown'}), "
                             f"the data in {args.data_dir} has {meta['vocab_size']} ({meta.get('tokenizer')})")
        if args.block_size > src.block_size:
            raise ValueError(f"--block_size {args.block_size} exceeds the checkpoint's block_size {src.block_size}")
        if args.streams:  # dynamic P: a P=1 backbone plus one small prefix/aggregator set
            if resume or src.n_streams != 1:
                raise ValueError("--streams needs --init_from=PATH to a P=1 (backbone) checkpoint")
            model = attach_streams(model, load_checkpoint(args.streams))
            src = model.config
            args.n_streams = src.n_streams
        if not resume and src.n_streams not in (1, args.n_streams):
            raise ValueError(f"cannot start P={args.n_streams} from a P={src.n_streams} checkpoint: use a P=1 checkpoint or the same P")
        if resume:
            iter_num, best_val_loss = ckpt["iter_num"], ckpt["best_val_loss"]
            how = f"resumed at step {iter_num}"
        elif src.n_streams == 1 and args.n_streams > 1:
            model = convert_to_streams(model, args.n_streams, **parscale)  # two-stage: fresh prefixes + aggregator
            how = f"converted P=1 -> P={args.n_streams} from {args.init_from}, {args.prefix_init} prefixes"
            if args.prefix_init == "kv":  # one training snippet per stream, fixed by the seed
                data = np.memmap(os.path.join(args.data_dir, "train.bin"), dtype=np.uint16, mode="r")
                ix = np.random.default_rng([args.seed, 2]).integers(0, len(data) - args.n_prefix, size=args.n_streams)
                prefixes_from_kv(model, torch.from_numpy(np.stack([data[i:i + args.n_prefix] for i in ix]).astype(np.int64)))
        elif args.streams:
            how = f"backbone {args.init_from} + streams {args.streams}"
        else:
            how = f"initialised from {args.init_from}"
    cfg = model.config
    if args.freeze_backbone or (ckpt is not None and args.init_from == "resume" and ckpt["args"].get("freeze_backbone")):
        args.freeze_backbone = True
        freeze_backbone(model)
    model.to(device)
    optimizer = model.configure_optimizers(args.weight_decay, args.learning_rate, (args.beta1, args.beta2), device_type)
    if ckpt is not None and args.init_from == "resume":
        optimizer.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["rng"]["torch"])  # dropout's RNG continues where it stopped
    ckpt = None  # free memory
    scaler = torch.amp.GradScaler(device_type, enabled=(dtype == "float16"))
    raw_model = model
    if ddp:
        model = DDP(model, device_ids=[local_rank] if device_type == "cuda" else None)

    tokens_per_iter = args.gradient_accumulation_steps * args.batch_size * args.block_size
    peak = args.peak_flops
    if peak < 0 and device_type == "cuda":
        peak = next((v for k, v in PEAK_FLOPS.items() if k in torch.cuda.get_device_name(device)), 0)
    flops_per_iter = raw_model.flops_per_token(args.block_size) * tokens_per_iter
    if master:
        os.makedirs(args.out_dir, exist_ok=True)
        r = raw_model.param_report()
        attn_path = "SDPA causal (flash-eligible)" if cfg.n_streams == 1 else "SDPA with prefix + shared causal mask"
        print(f"device {device} ({device_type}), dtype {dtype}, attention: {attn_path}, DDP world {world}")
        print(f"model {how}: P={cfg.n_streams}, {cfg.n_layer} layers, {cfg.n_head} heads ({cfg.n_kv_head} kv), "
              f"width {cfg.n_embd}, block {cfg.block_size}, prefix {cfg.n_prefix_slots}, vocab {cfg.vocab_size}")
        print("parameters: " + ", ".join(f"{k} {v:,}" for k, v in r.items())
              + (" (backbone frozen)" if args.freeze_backbone else ""))
        print(f"data {args.data_dir}: {meta.get('tokenizer')} tokens, train {split_tokens['train']:,}, val {split_tokens['val']:,}; "
              f"{tokens_per_iter:,} tokens per step")

    @torch.no_grad()
    def evaluate():
        """Mean loss on the same eval_iters batches every time, and how the aggregator mixes the streams.
        Runs on the raw model on rank 0 alone, so it triggers no DDP collective."""
        model.eval()
        out, weights = {}, []
        hook = None
        if cfg.n_streams > 1:
            hook = raw_model.aggregator.register_forward_hook(lambda m, inp, _: weights.append(m.weights(inp[0]).flatten(0, 1)))
        for split in ("train", "val"):
            losses = torch.zeros(args.eval_iters)
            for k in range(args.eval_iters):
                X, Y = get_batch(split, 0, k)  # key (0, k): batches no training step draws
                with autocast:
                    _, loss = raw_model(X, Y)
                losses[k] = loss.item()
            out[split] = losses.mean().item()
        if hook is not None:
            hook.remove()
            w = torch.cat(weights)  # (positions, P)
            out["stream_weight"] = [round(x, 4) for x in w.mean(0).tolist()]
            out["stream_entropy"] = -(w * w.log()).sum(-1).mean().item()  # ln P = uniform mix, 0 = one stream
        model.train()
        return out

    def checkpoint():
        return dict(model=raw_model.state_dict(), optimizer=optimizer.state_dict(), model_args=asdict(cfg),
                    iter_num=iter_num, best_val_loss=best_val_loss, args=vars(args), meta=meta,
                    rng=dict(torch=torch.get_rng_state()))

    def get_lr(it):
        if it < args.warmup_iters:
            return args.learning_rate * (it + 1) / (args.warmup_iters + 1)
        if it >= args.lr_decay_iters:
            return args.min_lr
        ratio = (it - args.warmup_iters) / max(1, args.lr_decay_iters - args.warmup_iters)
        return args.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (args.learning_rate - args.min_lr)

    # SIGINT / SIGTERM: finish the current step, save, exit cleanly
    stop = {"requested": False}

    def request_stop(signum, frame):
        stop["requested"] = True
    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)

    log = open(os.path.join(args.out_dir, "log.jsonl"), "a") if master else None

    def log_json(**rec):
        if log:
            log.write(json.dumps(rec) + "\n")
            log.flush()

    if args.eval_only:
        if master:
            print(json.dumps(evaluate()))
        return

    bar = tqdm(total=args.max_iters, initial=iter_num, disable=not (master and args.progress), dynamic_ncols=True)
    t0, mfu = time.time(), -1.0
    # training loop ------------------------------------------------------------------------------
    while True:
        lr = get_lr(iter_num)
        for group in optimizer.param_groups:
            group["lr"] = lr

        if master and (iter_num % args.eval_interval == 0 or iter_num == args.max_iters):
            ev = evaluate()
            if not all(math.isfinite(ev[s]) for s in ("train", "val")):
                raise FloatingPointError(f"non-finite eval loss at step {iter_num} ({ev}); the last good checkpoint in {args.out_dir} is kept")
            best_val_loss = min(best_val_loss, ev["val"])
            agg = f", stream weights {ev['stream_weight']}, entropy {ev['stream_entropy']:.3f}" if "stream_weight" in ev else ""
            tqdm.write(f"step {iter_num}: train loss {ev['train']:.4f}, val loss {ev['val']:.4f}{agg}")
            log_json(kind="eval", step=iter_num, **ev)
            if iter_num > 0:
                save_checkpoint(checkpoint(), args.out_dir)
                if args.freeze_backbone:  # the small file that dynamic P needs
                    save_checkpoint(streams_state(raw_model), args.out_dir, f"streams_p{cfg.n_streams}.pt")
        if iter_num >= args.max_iters:
            break

        # forward / backward with gradient accumulation
        for micro in range(accum):
            X, Y = get_batch("train", 1, iter_num, micro * world + rank)
            if ddp:  # all-reduce gradients only on the last micro-step
                model.require_backward_grad_sync = micro == accum - 1
            with autocast:
                _, loss = model(X, Y)
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

        if iter_num % args.log_interval == 0 and master:
            lossf = loss.item() * accum  # a sync, so only every log_interval steps
            if not math.isfinite(lossf):
                raise FloatingPointError(f"loss is {lossf} at step {iter_num}; lower --learning_rate? "
                                         f"The last good checkpoint in {args.out_dir} is kept")
            dt = (time.time() - t0) / args.log_interval
            t0 = time.time()
            tok_s = tokens_per_iter / dt
            if peak > 0:
                mfu = flops_per_iter / dt / peak
            mfu_s = f"{100 * mfu:5.1f}%" if mfu >= 0 else "  n/a"
            tqdm.write(f"step {iter_num:6d} | loss {lossf:.4f} | lr {lr:.2e} | {1000 * dt:7.1f} ms | {tok_s:9.0f} tok/s | mfu {mfu_s}")
            bar.set_postfix(loss=f"{lossf:.4f}", lr=f"{lr:.1e}", tok_s=f"{tok_s:.0f}")
            log_json(kind="train", step=iter_num, loss=lossf, lr=lr, ms=1000 * dt, tok_s=tok_s, mfu=mfu if mfu >= 0 else None)

        requested = stop["requested"]
        if ddp:  # every rank must stop at the same step; agreeing on it is a sync, so only every log_interval
            if iter_num % args.log_interval == 0:
                flag = torch.tensor(float(requested), device=device)
                dist.all_reduce(flag)
                requested = flag.item() > 0
            else:
                requested = False
        if requested:
            if master:
                save_checkpoint(checkpoint(), args.out_dir)
                tqdm.write(f"interrupted: saved step {iter_num} to {args.out_dir}/ckpt.pt; continue with --init_from=resume")
            break
    bar.close()
    if log:
        log.close()
    if ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, RuntimeError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
