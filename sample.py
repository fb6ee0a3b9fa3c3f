"""
Sample text from a trained checkpoint, decoding through the KV cache.

CPU (after the quickstart's training run):
    python sample.py --out_dir=out
A prompt from the command line or from a file, greedy:
    python sample.py --start="def main(" --temperature=0
    python sample.py --start=FILE:prompt.txt --num_samples=3 --max_new_tokens=200
On a GPU the fused CUDA decoder (kernels/) with CUDA-graph replay is used when it builds:
    python sample.py --device=cuda
(no multi-GPU run: one model on one device)

The tokenizer is prepare_data.py's, so a prompt is encoded as the training data was, except that in a
prompt "<|endoftext|>" is GPT-2's end-of-text token (start a fresh document with it). Sampled ids
outside the tokenizer's vocabulary (the model's vocabulary is padded to a multiple of 64) have no text:
decoding drops them, and the count is printed. A prompt longer than the model's block_size is printed
whole, but the model sees only its last block_size tokens; past block_size tokens in all, every step
recomputes the last block_size tokens without the KV cache, as nanoGPT does. Both are said on stderr.
A mistake the user can fix (a bad flag value, a missing or wrong file) ends as one `error: ...` line
naming the flag, exit status 1.
"""

import argparse
import math
import os
import sys
import time

import torch

from checkpoint import load_checkpoint, load_streams
from cli import ArgumentParser, UserError, entry, load_meta
from machine import resolve_device, resolve_dtype, synchronize
from kernels.fused import fused_decoder_for
from model import GPT, GPTConfig
from prepare_data import load_tokenizer


def get_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # I/O
    p.add_argument("--out_dir", default="out", help="folder holding ckpt.pt")
    p.add_argument("--ckpt", default="", help="checkpoint path; '' = out_dir/ckpt.pt")
    p.add_argument("--streams", default="",
                   help="dynamic P: a streams_p{P}.pt file (train.py --freeze_backbone) to attach to a P=1 "
                   "checkpoint")
    p.add_argument("--data_dir", default="",
                   help="folder with meta.json, for checkpoints that carry none (nanoGPT's)")
    p.add_argument("--gpt2_vocab", default="",
                   help="GPT-2 BPE file; '' = $PARSCALE_GPT2_VOCAB or data/gpt2.tiktoken")
    # sampling
    p.add_argument("--start", default="\n", help="prompt text, or FILE:path to read it from a UTF-8 file")
    p.add_argument("--num_samples", type=int, default=2, help="samples, decoded as one batch")
    p.add_argument("--max_new_tokens", type=int, default=300)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top_k", type=int, default=200, help="keep the k most likely tokens; -1 = all")
    p.add_argument("--seed", type=int, default=1337)
    # system
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu) | cpu | cuda[:N] | mps")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto = bfloat16 on a CUDA GPU that has it, else float32; float16 needs a GPU")
    p.add_argument("--fused", type=int, default=1, choices=[0, 1],
                   help="1 = use the fused CUDA decoder on CUDA when it builds")
    args = p.parse_args(argv)
    # values argparse cannot check: one `error:` line each, naming the flag
    if args.num_samples < 1:
        raise UserError(f"--num_samples must be >= 1, got {args.num_samples}")
    if args.max_new_tokens < 1:
        raise UserError(f"--max_new_tokens must be >= 1, got {args.max_new_tokens}")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise UserError(f"--temperature must be a finite number >= 0 (0 = greedy), got {args.temperature}")
    if args.top_k == 0 or args.top_k < -1:
        raise UserError(f"--top_k must be >= 1, or -1 for all tokens; got {args.top_k}")
    return args


def read_prompt(start):
    """--start's text: itself, or the contents of the file after FILE:."""
    if not start.startswith("FILE:"):
        return start
    path = start[len("FILE:"):]
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise UserError(f"--start=FILE:{path}: cannot read it ({e.strerror}); check the path") from None
    except UnicodeDecodeError as e:
        raise UserError(f"--start=FILE:{path} is not valid UTF-8 (byte offset {e.start}); "
                        "convert it to UTF-8") from None


def tokenizer_meta(ckpt, flag, data_dir):
    """The data meta that names the checkpoint's tokenizer: its own, or --data_dir's (which must agree)."""
    meta = ckpt.get("meta")
    if data_dir:
        data_meta = load_meta(data_dir, files=("meta.json",))
        named = (data_meta["tokenizer"], data_meta["vocab_size"])
        if meta and (meta.get("tokenizer"), meta.get("vocab_size")) != named:
            raise UserError(f"--data_dir: vocabulary mismatch: the checkpoint was trained on "
                            f"{meta.get('tokenizer')} ({meta.get('vocab_size')}), {data_dir} holds "
                            f"{data_meta['tokenizer']} ({data_meta['vocab_size']})")
        meta = data_meta
    if not meta:
        raise UserError(f"{flag}: the checkpoint records no tokenizer; "
                        "pass --data_dir=<the folder prepare_data.py wrote>")
    return meta


def main(argv=None):
    args = get_args(argv)
    device = resolve_device(args.device, who="sample.py")
    # auto: float32 on a CPU, the dtype a CPU-trained checkpoint was trained in, so that a seeded
    # sample is the same everywhere; a toy's decode step is Python overhead there whatever the dtype
    ptdtype, _ = resolve_dtype(args.dtype, device)
    prompt = read_prompt(args.start)
    torch.manual_seed(args.seed)

    # model: a checkpoint's GPTConfig and weights (ours or nanoGPT's); for dynamic P, a streams file on it
    flag, path = ("--ckpt", args.ckpt) if args.ckpt else ("--out_dir", os.path.join(args.out_dir, "ckpt.pt"))
    ckpt = load_checkpoint(path, flag)  # checked: its model_args make a GPTConfig, its weights fit it
    if ckpt.get("kind") == "streams":
        raise UserError(f"{flag}: {path} is a streams file (train.py --freeze_backbone); "
                        "pass it as --streams, with the P=1 checkpoint it was trained on as --ckpt")
    meta = tokenizer_meta(ckpt, flag, args.data_dir)
    model = GPT(GPTConfig(**{**ckpt["model_args"], "dropout": 0.0}))
    model.load_state_dict(ckpt["model"])
    if args.streams:
        model = load_streams(model, args.streams, f"{flag}={path}")
    if model.config.vocab_size < meta["vocab_size"]:
        raise UserError(f"vocabulary mismatch: the model has {model.config.vocab_size} tokens, "
                        f"its tokenizer ({meta['tokenizer']}) {meta['vocab_size']}; check --data_dir")
    model.eval()
    model.to(device=device, dtype=ptdtype)
    tok = load_tokenizer(meta, args.gpt2_vocab or None)

    ids = tok.encode_prompt(prompt)
    if not ids:
        raise UserError("--start is empty: give the prompt at least one character (the default is a newline)")
    block_size = model.config.block_size
    if len(ids) > block_size:
        print(f"note: the prompt is {len(ids)} tokens, more than block_size {block_size}: the model sees "
              f"only its last {block_size} (the whole prompt is printed)", file=sys.stderr)
    elif len(ids) + args.max_new_tokens > block_size:
        print(f"note: prompt + --max_new_tokens = {len(ids) + args.max_new_tokens} tokens > block_size "
              f"{block_size}: past that the model sees the last {block_size}, recomputed every step without "
              "the KV cache", file=sys.stderr)
    x = torch.tensor(ids, dtype=torch.long, device=device)[None].repeat(args.num_samples, 1)

    decoder, why = None, "not on CUDA"
    if device.startswith("cuda") and args.fused:
        decoder, why = fused_decoder_for(model, args.num_samples, ptdtype, x.size(1) + args.max_new_tokens)
    elif device.startswith("cuda"):
        why = "--fused=0"
    decoding = "fused CUDA kernels + CUDA graph" if decoder else "reference PyTorch with KV cache"
    print(f"device {device}, dtype {str(ptdtype).removeprefix('torch.')}, P={model.config.n_streams}, "
          f"decoding: {decoding} ({why})", file=sys.stderr)

    # greedy (--temperature=0) samples from the top token alone: generate, as nanoGPT's, divides by
    # the temperature
    temperature, top_k = args.temperature, None if args.top_k == -1 else args.top_k
    if temperature == 0:
        temperature, top_k = 1.0, 1
    t0 = time.time()
    with torch.no_grad():
        y = (decoder or model).generate(x, args.max_new_tokens, temperature=temperature, top_k=top_k)
    synchronize(device)
    dt = time.time() - t0
    rows = y.tolist()
    for row in rows:
        print(tok.decode(row))
        print("---------------")
    n = args.num_samples * args.max_new_tokens
    print(f"{n} tokens in {dt:.2f} s: {n / dt:.1f} tokens/s (batch {args.num_samples})", file=sys.stderr)
    dropped = sum(1 for row in rows for i in row if i >= tok.vocab_size)
    if dropped:
        print(f"note: {dropped} sampled ids were past the tokenizer's vocabulary ({tok.vocab_size}, the "
              f"model's {model.config.vocab_size}): they have no text and were left out", file=sys.stderr)


if __name__ == "__main__":
    entry(main)
