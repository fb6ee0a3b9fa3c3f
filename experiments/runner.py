"""
The runner every experiment stands on: train.py runs as subprocesses, resumable; their evaluations read
back; the presets (presets.json); a sweep's cost planned, or a training step timed, before it runs; and the
command line that every experiment shares (--preset, --out_dir, --data_dir, --device, --eval_iters, --batch_size,
--threads).

Every run is train.py in a process of its own, with its own out_dir; its output goes to out_dir/train.out.
Runs are resumable: a run whose log.jsonl holds its final evaluation is skipped, one with a ckpt.pt
resumes (--init_from=resume), so re-running an interrupted command (Ctrl-C: the run saves first) finishes
the work. Results land in --out_dir (default out/scaling/<preset>) as CSV and JSON; the last line printed is
one JSON object. A mistake the user can fix (a bad flag, a missing or damaged file, a run that train.py
refused) ends as one `error: ...` line on stderr and exit status 1 (cli); a traceback means a bug.
"""
import argparse
import concurrent.futures
import csv
import json
import math
import os
import subprocess
import sys
import time

import torch

from checkpoint import load_checkpoint
from cli import ArgumentParser, RenamedFlag, UserError, entry, int_list  # noqa: F401 (entry: the experiments')
from counts import flops_per_token, param_report
from machine import peak_flops
from model import GPT, GPTConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESETS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "presets.json")
SEED = 1337  # train.py's default --seed: every run not given another uses it
NOISE_SEED = 2  # the sweep's noise cell trains again at this seed


# -----------------------------------------------------------------------------
# presets: fixed depth and token budget per run (presets.json says what each field is for)

def load_presets():
    """presets.json's presets by name, without their "about" text; cells as (P, n_prefix) tuples."""
    with open(PRESETS_FILE) as f:
        presets = json.load(f)["presets"]
    for pre in presets.values():
        del pre["about"]
        pre["matched_cells"] = [tuple(c) for c in pre["matched_cells"]]
        pre["noise_cell"] = tuple(pre["noise_cell"]) if pre["noise_cell"] else None
    return presets


def preset(args, own=None):
    """
    The preset's settings, with what the command line overrides (flags checked in parse). own: an
    experiment's own grid, {setting: the preset field it is read from}, e.g. diversity's
    {"streams": "diversity_streams"}; its flags still override it.
    """
    pre = dict(load_presets()[args.preset])
    for key, field in (own or {}).items():
        pre[key] = pre[field]
    for key in ("max_iters", "base_iters", "extra_iters", "frozen_iters", "eval_iters", "batch_size"):
        if getattr(args, key, -1) > 0:
            pre[key] = getattr(args, key)
    for key, flag in (("widths", "widths"), ("streams", "stream_counts"), ("seeds", "seeds"),
                      ("matched_cells", "cells")):
        if getattr(args, flag, None):
            pre[key] = getattr(args, flag)
    if getattr(args, "prefix_reparam", -1) > 0:
        pre["reparam_hidden"] = args.prefix_reparam
    if args.device:
        pre["device"] = args.device
    pre["threads"] = args.threads
    return pre


def phased_preset(args, name, counts, lists):
    """preset() for an experiment of exploration and confirmation phases (repeated, depth), --jobs train.py
    processes at a time: one thread each unless --threads says; its flags override the preset's `name`_* fields:
    `counts` (flags named as their field; 0 or -1 = the preset's), `lists` (flag X sets `name`_X; unset = the
    preset's) and --eval_iters (`name`_eval_iters)."""
    pre = preset(args)
    if args.threads == -1 and args.jobs > 1:
        pre["threads"] = 1  # several processes: one thread each, or their OpenMP threads stall each other
    for key in counts:
        if getattr(args, key) > 0:
            pre[key] = getattr(args, key)
    if args.eval_iters > 0:
        pre[f"{name}_eval_iters"] = args.eval_iters
    for key in lists:
        if getattr(args, key):
            pre[f"{name}_{key}"] = getattr(args, key)
    return pre


# -----------------------------------------------------------------------------
# runs: train.py's command line, its evaluations, a run that is done or resumes

def train_argv(pre, data_dir, out_dir, width, P, max_iters, learning_rate=None, warmup_iters=None, eval_interval=None,
               n_prefix=None, seed=None):
    """train.py's flags for one run of the preset's shape at this width and P; None = the preset's value."""
    lr = pre["learning_rate"] if learning_rate is None else learning_rate
    eval_interval = pre["eval_interval"] if eval_interval is None else eval_interval
    return [f"--data_dir={data_dir}", f"--out_dir={out_dir}", f"--device={pre['device']}",
            f"--n_layer={pre['n_layer']}", f"--n_head={pre['n_head']}", f"--n_embd={width}",
            f"--block_size={pre['block_size']}", f"--n_prefix={pre['n_prefix'] if n_prefix is None else n_prefix}",
            f"--n_streams={P}", f"--batch_size={pre['batch_size']}", f"--max_iters={max_iters}",
            f"--learning_rate={lr}",
            f"--min_lr={lr / 10}", f"--warmup_iters={pre['warmup_iters'] if warmup_iters is None else warmup_iters}",
            f"--eval_interval={max(1, min(eval_interval, max_iters))}", f"--eval_iters={pre['eval_iters']}",
            f"--log_interval={max(1, min(50, max_iters // 4))}", f"--threads={pre['threads']}",
            f"--seed={SEED if seed is None else seed}"]


def evals(out_dir):
    """Evaluation records of a run, one per step (a resumed run re-evaluates its resume step: keep the last)."""
    path = os.path.join(out_dir, "log.jsonl")
    if not os.path.isfile(path):
        return []
    by_step = {}
    with open(path) as f:
        for i, line in enumerate(f, 1):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path} line {i} is not JSON ({e.msg}): a damaged run log; delete {out_dir} "
                                "to train that run again") from e
            if rec.get("kind") == "eval":
                by_step[rec["step"]] = rec
    return [by_step[s] for s in sorted(by_step)]


def finished(out_dir, max_iters):
    """Whether the run in out_dir reached max_iters (its last evaluation is that step, and it has a checkpoint)."""
    ev = evals(out_dir)
    if ev and ev[-1]["step"] > max_iters:
        raise UserError(f"{out_dir} holds a run of {ev[-1]['step']} steps, not {max_iters}: use another --out_dir")
    return bool(ev) and ev[-1]["step"] == max_iters and os.path.isfile(os.path.join(out_dir, "ckpt.pt"))


def call_train(argv, out_dir):
    """
    train.py in a process of its own (scripts do not import scripts), stdout and stderr appended to
    out_dir/train.out. Returns what this call wrote there. A run that train.py refused (its own one-line
    `error: ...`: a bad flag, missing data) raises UserError with that line; any other failure is a bug
    and raises RuntimeError with the tail of train.out.
    """
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {out_dir} ({e.strerror}): choose another --out_dir") from e
    path = os.path.join(out_dir, "train.out")
    with open(path, "a") as log:
        log.write(f"$ python train.py {' '.join(argv)}\n")
        log.flush()
        start = log.tell()
        proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *argv], cwd=ROOT,
                                stdout=log, stderr=subprocess.STDOUT)
        try:
            rc = proc.wait()
        except KeyboardInterrupt:  # Ctrl-C reached train.py too: it finishes the step and saves; wait for that
            rc = proc.wait()
    with open(path) as f:
        f.seek(start)
        out = f.read()
    if rc != 0:
        said = [line.split("error: ", 1)[1] for line in out.splitlines()
                if line.startswith("error: ")]
        if said:  # train.py's one error line (argparse's complaints too: cli.ArgumentParser)
            raise UserError(f"train.py in {out_dir}: {said[-1]} (its output: {path})")
        tail = "\n".join(out.splitlines()[-15:])
        raise RuntimeError(f"train.py failed (exit {rc}) in {out_dir}; the end of {path}:\n{tail}")
    return out


def run(argv, out_dir, max_iters, init_from="scratch", extra=()):
    """Train unless already done; resume a run that has a checkpoint. Returns 'done', 'resumed' or 'trained'."""
    if finished(out_dir, max_iters):
        return "done"
    resume = os.path.isfile(os.path.join(out_dir, "ckpt.pt"))
    call_train(argv + [f"--init_from={'resume' if resume else init_from}", *extra], out_dir)
    if not finished(out_dir, max_iters):
        raise UserError(f"run {out_dir} stopped before step {max_iters}; run the same command again to resume")
    return "resumed" if resume else "trained"


def eval_only(pre, data_dir, out_dir, init_from, streams="", seed=None):
    """train.py --eval_only on the P=1 base (plus a streams file), which ends its output with one JSON line
    {train, val, ...}: parse it. seed picks the evaluation batches (they are a function of train.py's --seed)."""
    argv = train_argv(pre, data_dir, out_dir, pre["base_width"], 1, 0, seed=seed)
    argv += [f"--init_from={init_from}", "--eval_only"]
    if streams:
        argv.append(f"--streams={streams}")
    return last_json(call_train(argv, out_dir))


def last_json(out):
    """The last line of train.py's output that is a JSON object (--eval_only ends with one)."""
    return json.loads(next(line for line in reversed(out.splitlines()) if line.startswith("{")))


def params(out_dir):
    """A finished run's parameter counts (model.param_report of its checkpoint's model_args: a reparameterised
    run's checkpoint holds the folded prefixes) and the size of its prefix MLPs, which only training uses."""
    ckpt = load_checkpoint(os.path.join(out_dir, "ckpt.pt"))
    r = param_report(GPT(GPTConfig(**ckpt["model_args"])))
    return dict(r, reparam=sum(v.numel() for v in ckpt.get("prefix_reparam", {}).values()))


def non_embedding(out_dir):
    return params(out_dir)["non_embedding"]


def pick(ev):
    """An evaluation's losses, rounded for a table."""
    return dict(train=round(ev["train"], 4), val=round(ev["val"], 4))


def train_base(pre, args):
    """The P=1 base at the preset's base_width, base_iters steps, in <out>/base (two_stage, dynamic and
    prefix_matched build on it; a finished base is reused). Returns its checkpoint's path."""
    d = os.path.join(args.out_dir, "base")
    run(train_argv(pre, args.data_dir, d, pre["base_width"], 1, pre["base_iters"]), d, pre["base_iters"])
    return os.path.join(d, "ckpt.pt")


# -----------------------------------------------------------------------------
# planning: what a sweep will cost, before it runs

# for plan's GPU time estimate: assumptions, not measurements (see plan)
ASSUMED_MFU, ASSUMED_STEP_OVERHEAD, ASSUMED_RUN_OVERHEAD = 0.08, 0.015, 10.0


def padded_vocab(data_dir):
    """The data's vocabulary size padded up to a multiple of 64, as train.py pads it: the model's vocab_size."""
    return math.ceil(read_meta(data_dir)["vocab_size"] / 64) * 64


def step_seconds(cfg, batch_size, extra=()):
    """Seconds per training step (forward, backward, AdamW) of GPT(cfg) at this batch on one CPU thread,
    the way an experiment's jobs each run: the median of 3 after a warm-up. extra: modules whose parameters the
    optimizer steps too (a reparameterisation's). A measurement, so it moves with whatever else the CPU runs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = GPT(cfg)
        opt = torch.optim.AdamW(list(model.parameters()) + [p for m in extra for p in m.parameters()], lr=1e-3)
        x = torch.randint(cfg.vocab_size, (batch_size, cfg.block_size))
        times = []
        for _ in range(4):
            t0 = time.perf_counter()
            _, loss = model(x, x)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t0)
        return sorted(times[1:])[1]
    finally:
        torch.set_num_threads(before)


def read_meta(data_dir):
    """data_dir/meta.json (written by prepare_data.py), or a UserError that says what to do."""
    path = os.path.join(data_dir, "meta.json")
    if not os.path.isfile(path):
        raise UserError(f"--data_dir: {path} not found: run prepare_data.py first (python prepare_data.py), "
                        "or point --data_dir at its --out_dir")
    try:
        with open(path) as f:
            meta = json.load(f)
        int(meta["vocab_size"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise UserError(f"--data_dir: {path} is not prepare_data.py's meta.json ({type(e).__name__}): "
                        "run prepare_data.py again") from e
    return meta


def plan(pre, data_dir, runs):
    """
    What a sweep will cost, run by run: tokens and FLOPs (counts.flops_per_token, evaluations counted as
    forward passes, a third of a training step's FLOPs per token), and for a GPU an estimate of the time from
    three assumptions: ASSUMED_MFU of the H200's datasheet bf16 peak (machine.peak_flops; the one measurement,
    results/h200_train.txt, got 18.8% at 11M parameters, and smaller models get less),
    ASSUMED_STEP_OVERHEAD seconds per step (kernel launches, optimizer, logging) and ASSUMED_RUN_OVERHEAD
    seconds per run (starting Python, torch and CUDA; the first steps). runs: sweep_runs' list.
    Returns (lines to print, estimated seconds or None off the GPU).
    """
    vocab = padded_vocab(data_dir)
    tokens = pre["max_iters"] * pre["batch_size"] * pre["block_size"]
    n_evals = pre["max_iters"] // pre["eval_interval"] + 1 + (pre["max_iters"] % pre["eval_interval"] > 0)
    eval_tokens = n_evals * 2 * pre["eval_iters"] * pre["batch_size"] * pre["block_size"]  # train and val
    gpu = pre["device"] == "cuda"
    lines, total, est = [], 0.0, 0.0
    for name, _, argv, width, P, seed in runs:
        cfg = GPTConfig(n_layer=pre["n_layer"], n_head=pre["n_head"], n_embd=width, block_size=pre["block_size"],
                        vocab_size=vocab, n_streams=P, n_prefix=pre["n_prefix"])
        with torch.device("meta"):  # shapes only: counting needs no weights
            model = GPT(cfg)
        flops = flops_per_token(model, pre["block_size"]) * (tokens + eval_tokens / 3)
        sec = (flops / (ASSUMED_MFU * peak_flops("H200")) + pre["max_iters"] * ASSUMED_STEP_OVERHEAD
               + ASSUMED_RUN_OVERHEAD)
        sec += ASSUMED_RUN_OVERHEAD if seed != SEED else 0  # the noise run's re-evaluation, a process of its own
        total, est = total + flops, est + sec
        lines.append(f"  {name}: {flops / 1e15:.3f} PFLOP" + (f", ~{sec:.0f} s" if gpu else "")
                     + f"\n    python train.py {' '.join(argv)}")
    head = f"plan: {len(runs)} runs x {tokens:,} tokens, {total / 1e15:.2f} PFLOP"
    if gpu:
        head += (f", estimated ~{est / 60:.1f} min on one H200 (assumed {ASSUMED_MFU:.0%} MFU, "
                 f"{ASSUMED_STEP_OVERHEAD * 1e3:.0f} ms/step, {ASSUMED_RUN_OVERHEAD:.0f} s/run; evaluation included)")
    return [head] + lines, est if gpu else None


# -----------------------------------------------------------------------------
# tables and files

def table(rows, cols):
    """rows (dicts) as right-aligned text columns, a header first."""
    widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in cols]
    lines = ["  ".join(c.rjust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(str(r[c]).rjust(w) for c, w in zip(cols, widths)) for r in rows]
    return "\n".join(lines)


def write_csv(path, rows):
    """rows (dicts with the same keys) as a CSV file with a header."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def run_each(jobs, train, todo, phase):
    """train(*args) for every (name, args) of todo, `jobs` at a time (jobs=1: in turn, in this thread, as
    train.py wants when the tests run it in-process); one line per run, in todo's order; {name: its status}."""
    status = {}
    if jobs == 1:
        for name, a in todo:
            status[name] = train(*a)
            print(f"{phase}: {name} {status[name]}", flush=True)
        return status
    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        futures = [(name, pool.submit(train, *a)) for name, a in todo]
        for name, f in futures:
            status[name] = f.result()
            print(f"{phase}: {name} {status[name]}", flush=True)
    return status


# -----------------------------------------------------------------------------
# the command line every experiment shares

def absolute(path):
    """An argparse type: the path made absolute (train.py runs in the repository root); '' stays ''."""
    return os.path.abspath(path) if path else ""


def parser(prog, doc):
    """An experiment's parser with the flags they all take; the experiment adds its own, then calls parse.
    Integer flags whose default is -1 mean "the preset's" (or torch's); parse refuses 0 and below -1."""
    p = ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cpu", choices=sorted(load_presets()))
    p.add_argument("--out_dir", type=absolute, default="", help="results and run folders; '' = out/scaling/<preset>")
    p.add_argument("--out", action=RenamedFlag, new="--out_dir", why="an output folder is --out_dir in every script")
    p.add_argument("--data_dir", type=absolute, default=os.path.join(ROOT, "data", "stdlib_bytes"),
                   help="prepare_data.py's output")
    # every run: override the preset
    p.add_argument("--eval_iters", type=int, default=-1, help="batches per evaluation; -1 = the preset's")
    p.add_argument("--batch_size", type=int, default=-1, help="-1 = the preset's")
    # system
    p.add_argument("--device", default="", help="'' = the preset's")
    p.add_argument("--threads", type=int, default=-1, help="train.py's torch CPU threads; -1 = torch's default. On a "
                   "CPU shared with other jobs 1 thread can be much faster")
    return p


def add_stream_counts(p, preset_field):
    """--stream_counts, the P values an experiment runs (train.py's --n_streams is one P); the old name, a
    list under train.py's name for one P, is refused with one line naming the new one."""
    p.add_argument("--stream_counts", type=int_list, default=None,
                   help=f"comma-separated P, e.g. 1,2,4; default: the preset's {preset_field}")
    p.add_argument("--n_streams", action=RenamedFlag, new="--stream_counts",
                   why="a list of P values here; train.py's --n_streams is one P")


def add_seed_flags(p, name):
    """--seeds and --results: the flags of an experiment that compares runs seed by seed (noise.py)."""
    p.add_argument("--seeds", type=int_list, default=None, help="comma-separated train.py seeds, e.g. 1,2; "
                   "default: the preset's")
    p.add_argument("--results", type=absolute, default="", help=f"a folder that also gets {name}_<preset>.csv and "
                   ".json, e.g. results; '' = --out_dir only")


def parse(p, argv, need_data=True):
    """Parse and check the shared flags; lists and paths are made by the flags' types (absolute paths: train.py
    runs in the repository root); the data folder's meta.json read now, not after the first run
    (need_data=False: an experiment that prepares its own). The experiment checks its own flags after."""
    preset_name = p.parse_known_args(argv)[0].preset  # first: --out_dir's default depends on it
    p.set_defaults(out_dir=os.path.join("out", "scaling", preset_name))
    args = p.parse_args(argv)
    for key, v in vars(args).items():
        if p.get_default(key) == -1 and (v == 0 or v < -1):
            raise UserError(f"--{key}={v}: must be a positive integer, or -1 for the "
                            + ("torch default" if key == "threads" else "preset's"))
    device = args.device or load_presets()[args.preset]["device"]
    flag = f"--device={args.device}" if args.device else f"--preset={args.preset} (device {device})"
    if device.split(":")[0] not in ("cpu", "cuda", "mps"):
        raise UserError(f"{flag}: expected cpu, cuda, cuda:N or mps")
    if device.startswith("cuda") and not torch.cuda.is_available() and not getattr(args, "dry_run", False):
        raise UserError(f"{flag}: no CUDA device here (torch {torch.__version__}); use --device=cpu or --preset=cpu")
    if need_data:
        read_meta(args.data_dir)
    return args


def add_phase_flags(p, budget_min, chosen, cut):
    """The flags of an experiment of exploration and confirmation phases (repeated, depth); check_phases checks
    them. chosen: what the exploration seeds choose; cut: what is cut when the estimate exceeds --budget_min."""
    p.add_argument("--explore_seeds", type=int_list, default=None,
                   help=f"comma-separated train.py seeds that choose the {chosen}; default: the preset's")
    p.add_argument("--confirm_seeds", type=int_list, default=None,
                   help="comma-separated new seeds for the confirmation; default: the preset's")
    p.add_argument("--jobs", type=int, default=2,
                   help="train.py processes at a time (each gets --threads=1 unless --threads says otherwise)")
    p.add_argument("--budget_min", type=float, default=budget_min,
                   help=f"minutes; {cut} when the estimate exceeds it; -1 = no budget")
    p.add_argument("--dry_run", action="store_true", help="print the runs and the estimate; train nothing")


def check_phases(args):
    """The flags of an experiment of exploration and confirmation phases (repeated, depth), checked."""
    if args.jobs < 1:
        raise UserError(f"--jobs={args.jobs}: must be >= 1")
    if set(args.explore_seeds or []) & set(args.confirm_seeds or []):
        raise UserError("--explore_seeds and --confirm_seeds share a seed: the confirmation must "
                        "use seeds the choice never saw")
    if not (args.budget_min > 0 or args.budget_min == -1):
        raise UserError(f"--budget_min={args.budget_min}: must be a number of minutes > 0, or -1 for none")


def main(experiment, get_args, argv=None, shown=None):
    """What every experiment script's main does: experiment(get_args(argv)), printed as one JSON line (shown:
    a function of the result that picks what is printed) and returned, for the tests."""
    result = experiment(get_args(argv))
    print(json.dumps(shown(result) if shown else result))
    return result


