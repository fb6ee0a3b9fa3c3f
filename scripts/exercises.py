"""
The README's five Exercises, carried out: each applied as a patch to a scratch copy of the repository (the
patches below are the solutions), then what the README says to run, run. Records for each: what the fused
decode path makes of the changed model (through the real kernels, on the CPU: tests/test_kernels_cpu.py's
backend), whether the README's tests pass, and which of the other tests in tests/test_model.py and
tests/test_kernels_cpu.py fail. Writes results/exercises.txt; exits 1 if the README's tests fail after an
Exercise or a patch no longer applies.

    python scripts/exercises.py                  # all five, ~10 minutes on 2 cores
    python scripts/exercises.py --only=2         # one
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import scratch

README_TESTS = ["tests/test_model.py", "tests/test_kernels_cpu.py", "-k",
                "cached_decoding or causality or follows_or_refuses"]
OTHER_TESTS = ["tests/test_model.py", "tests/test_kernels_cpu.py"]

AGG_INIT = "            torch.nn.init.zeros_(self.aggregator.proj_out.weight)\n"
AGG_LINEARS = ("        self.proj_in = nn.Linear(config.n_streams * config.n_embd, config.n_embd)\n"
               "        self.proj_out = nn.Linear(config.n_embd, config.n_streams)\n")
AGG_WEIGHTS = "        w = self.proj_out(F.silu(self.proj_in(streams))).float().softmax(dim=-1)\n"
ROPE = '''
def rope(x, pos0):
    """Rotary position embedding of x (B, heads, T, hs) at positions pos0 .. pos0 + T - 1."""
    T, hs = x.size(2), x.size(3)
    inv = 1.0 / 10000 ** (torch.arange(0, hs, 2, device=x.device, dtype=torch.float32) / hs)
    ang = torch.arange(pos0, pos0 + T, device=x.device, dtype=torch.float32)[:, None] * inv # (T, hs/2)
    x1, x2 = x[..., 0::2].float(), x[..., 1::2].float()
    rotated = torch.stack([x1 * ang.cos() - x2 * ang.sin(), x1 * ang.sin() + x2 * ang.cos()], dim=-1)
    return rotated.flatten(-2).to(x.dtype)

class CausalSelfAttention(nn.Module):
'''
ROTATE = ("        v = v.view(B, T, self.n_kv_head, C // self.n_head).transpose(1, 2) # GQA: (B, nkvh, T, hs)\n",
          "        v = v.view(B, T, self.n_kv_head, C // self.n_head).transpose(1, 2) # GQA: (B, nkvh, T, hs)\n"
          "        pos0 = cache.pos if cache is not None else 0 # RoPE: rotate before the decode branch\n"
          "        q, k = rope(q, pos0), rope(k, pos0)\n")
NO_WPE = [("            wpe = nn.Embedding(config.block_size, config.n_embd),\n", ""),
          ("        pos_emb = self.transformer.wpe(pos) # position embeddings of shape (t, n_embd)\n"
           "        x = self.transformer.drop(tok_emb + pos_emb)\n",
           "        x = self.transformer.drop(tok_emb)\n")]

# name -> (what the README asks, [(file, old, new)], P of the model the fused path is asked about)
EXERCISES = {
    "1. A one-Linear aggregator": ([
        ("model.py", AGG_LINEARS,
         "        self.proj = nn.Linear(config.n_streams * config.n_embd, config.n_streams)\n"),
        ("model.py", AGG_WEIGHTS, "        w = self.proj(streams).float().softmax(dim=-1)\n"),
        ("model.py", AGG_INIT, "            torch.nn.init.zeros_(self.aggregator.proj.weight)\n")], 4),
    "2. RoPE instead of learned positions": ([
        ("model.py", "\nclass CausalSelfAttention(nn.Module):\n", ROPE), ("model.py", *ROTATE),
        *[("model.py", old, new) for old, new in NO_WPE]], 2),
    "2'. RoPE, wpe kept": ([("model.py", "\nclass CausalSelfAttention(nn.Module):\n", ROPE), ("model.py", *ROTATE)], 2),
    "3. A SwiGLU MLP": ([
        ("model.py", "        self.c_fc    = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)\n"
                     "        self.gelu    = nn.GELU()\n"
                     "        self.c_proj  = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)\n",
         "        hidden = 8 * config.n_embd // 3\n"
         "        self.c_fc    = nn.Linear(config.n_embd, 2 * hidden, bias=config.bias)\n"
         "        self.c_proj  = nn.Linear(hidden, config.n_embd, bias=config.bias)\n"),
        ("model.py", "        x = self.c_fc(x)\n        x = self.gelu(x)\n        x = self.c_proj(x)\n",
         "        gate, up = self.c_fc(x).chunk(2, -1)\n        x = self.c_proj(F.silu(gate) * up)\n")], 2),
    "4. A fixed uniform mix": ([
        ("model.py", AGG_LINEARS, ""),
        ("model.py", "        streams = x.view(P, R // P, T, C).permute(1, 2, 0, 3)"
                     ".reshape(R // P, T, P * C) # (B,T,P*C)\n"
                     + AGG_WEIGHTS + "        return w * (1 - self.smoothing) + self.smoothing / P # no weight falls "
                     "below smoothing / P\n",
         "        return torch.full((R // P, T, P), 1 / P, device=x.device)\n"),
        ("model.py", "        if config.n_streams > 1: # ParScale: the aggregator starts as the streams' "
                     "plain average\n"
                     + AGG_INIT, "")], 4),
    "5. A per-stream auxiliary loss": ([
        ("train.py", "import torch\n", "import torch\nimport torch.nn.functional as F\n"),
        ("train.py", '    p.add_argument("--weight_decay", type=float, default=0.1)\n',
         '    p.add_argument("--weight_decay", type=float, default=0.1)\n'
         '    p.add_argument("--aux_loss", type=float, default=0.0, help="weight of the per-stream loss; 0 = none")\n'),
        ("train.py", "                    logits, loss = model(X, Y)\n",
         "                    logits, loss, stream_logits = model(X, Y, streams=True)\n"
         "                    P = raw_model.config.n_streams # Y.repeat(P, 1): the stream-major rows\n"
         "                    loss = loss + args.aux_loss * F.cross_entropy(stream_logits.flatten(0, 2).float(),\n"
         "                                                                  Y.repeat(P, 1).flatten())\n")], None),
}

FUSED = """
import json, sys, torch
sys.path[:0] = ["tests", "."]
from util import make_model
from kernels import fused
from kernels_cpu import CpuKernels
m = make_model(n_embd=64, n_head=2, n_streams={P}, n_prefix=3, block_size=48)
dec, why = fused.fused_decoder_for(m, 2, torch.float32, 20, backend=CpuKernels())
print(json.dumps(dict(follows=dec is not None, why=why)))
"""


def fused_verdict(dest, P):
    """What the fused path makes of the changed model (width 64, as the tests' model), through the real kernels."""
    r = subprocess.run([sys.executable, "-c", FUSED.format(P=P)], cwd=dest, env=scratch.env(), capture_output=True,
                       text=True)
    if r.returncode != 0:
        return f"the model could not be built: {(r.stdout + r.stderr).strip().splitlines()[-1]}"
    v = json.loads(r.stdout.strip().splitlines()[-1])
    return ("follows: " if v["follows"] else "refused: ") + v["why"].split("; ")[-1]


def trains_under_ddp(dest, tmp):
    """Exercise 5's claim: the patched train.py trains P = 2 under DDP (2 gloo processes) with --aux_loss."""
    data = os.path.join(tmp, "data")
    subprocess.run([sys.executable, "prepare_data.py", f"--out_dir={data}", "--max_files=20"], cwd=dest,
                   env=scratch.env(), capture_output=True, check=True)
    losses = {}
    for aux in (0.0, 0.5):
        out = os.path.join(tmp, f"aux{aux}")
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                            "train.py", f"--data_dir={data}", f"--out_dir={out}", "--device=cpu", "--n_layer=2",
                            "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=8", "--n_streams=2",
                            "--max_iters=4", "--eval_interval=4", "--eval_iters=2", "--gradient_accumulation_steps=2",
                            "--log_interval=1", f"--aux_loss={aux}"], cwd=dest, env=scratch.env(), capture_output=True,
                           text=True)
        if r.returncode != 0 or "DDP world 2" not in r.stdout:
            return f"DDP run with --aux_loss={aux} failed (exit {r.returncode}): {(r.stdout + r.stderr)[-300:]}"
        with open(os.path.join(out, "log.jsonl")) as fh:  # the first step's training loss, which holds the aux term
            losses[aux] = next(rec["loss"] for rec in map(json.loads, fh) if rec["kind"] == "train")
    return (f"trains under DDP (2 gloo processes, P = 2, 4 steps); the first step's training objective: "
            f"{losses[0.5]:.4f} with --aux_loss=0.5, {losses[0.0]:.4f} with 0 (the aux term is the streams' own loss, "
            f"about as large: x1.5 expected)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(scratch.ROOT, "results", "exercises.txt"), help="the log")
    ap.add_argument("--only", default="", help="one Exercise by its number, e.g. 2 or 2'")
    args = ap.parse_args()
    lines = [f"# python scripts/exercises.py: each of the README's Exercises applied to a scratch copy of "
             f"{scratch.commit()} (the solutions are the patches in the script)", f"# {scratch.machine()}",
             f"# README's tests: python -m pytest -q {' '.join(README_TESTS[:2])} -k \"{README_TESTS[3]}\"", ""]
    broken = []
    for name, (patches, P) in EXERCISES.items():
        if args.only and name.split(".")[0] != args.only:
            continue
        print(f"[exercises] {name} ...", flush=True)
        with tempfile.TemporaryDirectory() as dest:
            scratch.copy_repo(dest)
            for path, old, new in patches:
                scratch.patch(dest, path, old, new)
            block = [name]
            if P is not None:
                block.append(f"  fused path (P = {P}, width 64, through the real kernels on the CPU): "
                             f"{fused_verdict(dest, P)}")
                summary, failed, _, _ = scratch.pytest(dest, README_TESTS)
                block.append(f"  the README's tests: {summary}" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
                if failed:
                    broken.append(name)
                summary, failed, _, _ = scratch.pytest(dest, OTHER_TESTS)
                block.append(f"  {' and '.join(OTHER_TESTS)}: {summary}; failed:" + ("" if failed else " none"))
                block += [f"    {test.split('::')[1]}: {why[:150]}" for test, why in failed.items()]
            else:
                summary, failed, _, _ = scratch.pytest(dest, ["tests/test_model.py", "-k", "streams_logits"])
                block.append(f"  fused path: unaffected (training only); tests/test_model.py -k streams_logits: "
                             f"{summary}")
                if failed:
                    broken.append(name)
                with tempfile.TemporaryDirectory() as tmp:
                    block.append(f"  {trains_under_ddp(dest, tmp)}")
        print("\n".join(block), flush=True)
        lines += block + [""]
    lines.append(f"the README's tests pass after every Exercise: {'yes' if not broken else 'NO: ' + ', '.join(broken)}")
    scratch.finish(args.out, lines, "exercises", broken)


if __name__ == "__main__":
    main()
