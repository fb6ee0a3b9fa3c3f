"""
Sample text from a trained checkpoint, decoding through the KV cache.

CPU (after the quickstart's training run):
    python sample.py --out_dir=out
A prompt from the command line or from a file, greedy:
    python sample.py --start="def main(" --temperature=0
    python sample.py --start=FILE:prompt.txt --num_samples=3 --max_new_tokens=200
On a GPU the fused CUDA decoder (kernels/) with CUDA-graph replay is used when it builds:
    python sample.py --device=cuda
"""

import argparse
import json
import os
import sys
import time

import tiktoken
import torch
from tiktoken.load import load_tiktoken_bpe
from tiktoken_ext.openai_public import r50k_pat_str

from kernels.fused import fused_decoder_for
from model import attach_streams, load_checkpoint, model_from_checkpoint


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # I/O
    p.add_argument("--out_dir", default="out", help="folder holding ckpt.pt")
    p.add_argument("--ckpt", default="", help="checkpoint path; '' = out_dir/ckpt.pt")
    p.add_argument("--streams", default="", help="dynamic P: a streams_p{P}.pt file (train.py --freeze_backbone) to attach to a P=1 checkpoint")
    p.add_argument("--data_dir", default="", help="folder with meta.json, for checkpoints that carry none (nanoGPT's)")
    p.add_argument("--gpt2_vocab", default="", help="GPT-2 BPE file; '' = $PARSCALE_GPT2_VOCAB or data/gpt2.tiktoken")
    # sampling
    p.add_argument("--start", default="\n", help="prompt text, or FILE:path to read it from a file")
    p.add_argument("--num_samples", type=int, default=2)
    p.add_argument("--max_new_tokens", type=int, default=300)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top_k", type=int, default=200, help="keep the k most likely tokens; -1 = all")
    p.add_argument("--seed", type=int, default=1337)
    # system
    p.add_argument("--device", default="auto", help="auto (cuda > mps > cpu) | cpu | cuda | mps")
    p.add_argument("--dtype", default="auto", help="auto (bfloat16 on CUDA, else float32) | float32 | bfloat16 | float16")
    p.add_argument("--fused", type=int, default=1, help="1 = use the fused CUDA decoder on CUDA when it builds")
    args = p.parse_args(argv)
    if args.num_samples < 1 or args.max_new_tokens < 1:
        p.error("--num_samples and --max_new_tokens must be >= 1")
    if args.temperature < 0:
        p.error(f"--temperature must be >= 0, got {args.temperature}")
    return args


def load_tokenizer(meta, gpt2_vocab=""):
    """(encode, decode) for the tokenizer prepare_data.py recorded in meta.json."""
    if meta["tokenizer"] == "bytes":
        return (lambda s: list(s.encode("utf-8"))), (lambda ids: bytes(i for i in ids if i < 256).decode("utf-8", errors="replace"))
    if meta["tokenizer"] == "gpt2":
        here = os.path.dirname(os.path.abspath(__file__))
        path = gpt2_vocab or os.environ.get("PARSCALE_GPT2_VOCAB") or os.path.join(here, "data", "gpt2.tiktoken")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"GPT-2 vocabulary not found at {path}: run `bash scripts/get_gpt2_vocab.sh`")
        enc = tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str, explicit_n_vocab=50257,
                                mergeable_ranks=load_tiktoken_bpe(path, expected_hash=meta["gpt2_vocab_sha256"]),
                                special_tokens={"<|endoftext|>": 50256})
        return (lambda s: enc.encode(s, allowed_special={"<|endoftext|>"})), (lambda ids: enc.decode([i for i in ids if i < enc.n_vocab]))
    raise ValueError(f"unknown tokenizer {meta['tokenizer']!r} in meta")


def main(argv=None):
    args = get_args(argv)
    torch.manual_seed(args.seed)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    dtype = args.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") and torch.cuda.is_bf16_supported() else "float32"
    ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]

    ckpt = load_checkpoint(args.ckpt or os.path.join(args.out_dir, "ckpt.pt"))
    meta = ckpt.get("meta")
    if args.data_dir:
        with open(os.path.join(args.data_dir, "meta.json")) as f:
            data_meta = json.load(f)
        if meta and (meta["tokenizer"], meta["vocab_size"]) != (data_meta["tokenizer"], data_meta["vocab_size"]):
            raise ValueError(f"vocabulary mismatch: the checkpoint was trained on {meta['tokenizer']} ({meta['vocab_size']}), "
                             f"{args.data_dir} holds {data_meta['tokenizer']} ({data_meta['vocab_size']})")
        meta = data_meta
    if meta is None:
        raise ValueError("the checkpoint records no tokenizer: pass --data_dir=<the folder prepare_data.py wrote>")
    model = model_from_checkpoint(ckpt, dropout=0.0)
    if args.streams:
        if model.config.n_streams != 1:
            raise ValueError(f"--streams needs a P=1 backbone checkpoint, this one has P={model.config.n_streams}")
        model = attach_streams(model, load_checkpoint(args.streams))
    if model.config.vocab_size < meta["vocab_size"]:
        raise ValueError(f"vocabulary mismatch: model has {model.config.vocab_size} tokens, tokenizer {meta['vocab_size']}")
    model.eval().to(device=device, dtype=ptdtype)
    encode, decode = load_tokenizer(meta, args.gpt2_vocab)

    start = args.start
    if start.startswith("FILE:"):
        with open(start[5:], encoding="utf-8") as f:
            start = f.read()
    ids = encode(start)
    if not ids:
        raise ValueError("the prompt is empty after tokenisation")
    x = torch.tensor(ids, dtype=torch.long, device=device)[None].repeat(args.num_samples, 1)

    decoder, why = None, "not on CUDA"
    if device.startswith("cuda") and args.fused:
        decoder, why = fused_decoder_for(model, args.num_samples, ptdtype, x.size(1) + args.max_new_tokens)
    elif device.startswith("cuda"):
        why = "--fused=0"
    path = "fused CUDA kernels + CUDA graph" if decoder else f"reference PyTorch with KV cache ({why})"
    print(f"device {device}, dtype {dtype}, P={model.config.n_streams}, decoding: {path}", file=sys.stderr)

    top_k = None if args.top_k == -1 else args.top_k
    t0 = time.time()
    with torch.no_grad():
        gen = decoder or model
        y = gen.generate(x, args.max_new_tokens, temperature=args.temperature, top_k=top_k)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    dt = time.time() - t0
    for row in y.tolist():
        print(decode(row))
        print("---------------")
    n = args.num_samples * args.max_new_tokens
    print(f"{n} tokens in {dt:.2f} s: {n / dt:.1f} tokens/s (batch {args.num_samples})", file=sys.stderr)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
