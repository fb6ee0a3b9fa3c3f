"""
The parallel scaling law at toy scale: fit it, sweep P x width, two-stage training, dynamic P, and two
experiments on why P > 1 does not pay here.

    python scripts/scaling.py fit --paper                      # the paper's Stack-V2-Python grid -> k 0.3935
    python scripts/scaling.py fit --paper --per_size           # ... and k at each model size, extrapolated to toy sizes
    python scripts/scaling.py fit --runs=out/scaling/cpu/sweep # fit your own runs (or a sweep.csv)
    python scripts/scaling.py sweep --preset=tiny              # 3 steps per run: P in {1,2,4,8} x 3 widths, fitted
    python scripts/scaling.py sweep --preset=cpu               # hours on a 2-core CPU (add --threads=1 on a shared CPU)
    python scripts/scaling.py sweep --preset=gpu               # one H200 (run prepare_data.py first); prints its estimated cost
    python scripts/scaling.py sweep --preset=gpu --dry_run     # every run's train.py command and the estimate; needs no GPU
    python scripts/scaling.py two_stage --preset=cpu           # P=1 base, then P=1 / P=4 / P=4 frozen / P=4 kv-init prefixes
    python scripts/scaling.py dynamic --preset=cpu             # one frozen backbone, streams files for P = 2, 4, 8
    python scripts/scaling.py prefix_matched --preset=cpu --threads=1 --results=results  # ~14 min on 2 cores
    python scripts/scaling.py diversity --preset=cpu --threads=1 --results=results       # ~15 min on 2 cores
    python scripts/scaling.py plot_pays --preset=cpu           # results/pays_cpu.png from those two JSON files

The law (Chen et al. 2025, eq. 5): L = E + (A / (N (k ln P + 1)))^alpha, N the non-embedding
parameters, ParScale's prefixes and aggregator included. It is fitted as the official script does:
Huber loss (delta 1e-3) on log L, several starting points, A in units of 1e9. Positivity comes from
fitting log E, log A, log alpha, log k with torch.optim.LBFGS (no SciPy): k -> 0 means P buys nothing.

Every run is train.py in a process of its own, with its own out_dir; its output goes to out_dir/train.out.
Runs are resumable: a run whose log.jsonl holds its final evaluation is skipped, one with a ckpt.pt
resumes (--init_from=resume), so re-running an interrupted command (Ctrl-C: the run saves first) finishes
the work. Results land in --out (default out/scaling/<preset>) as CSV and JSON; the last line printed is
one JSON object. A mistake the user can fix (a bad flag, a missing or damaged file, a run that train.py
refused) ends as one `error: ...` line on stderr and exit status 1; a traceback means a bug.

Prefix init "kv" (two_stage's p4_full_kv_init branch, and dynamic by default) is train.py's
--prefix_init=kv: instead of N(0, 0.02) draws, each stream's prefix is the base model's own keys and
values on a random n_prefix-token training snippet, one snippet per stream (this repository's idea, not the
paper's: it removes the loss spike at conversion, results/RESULTS.md section 3).

Why P > 1 does not pay. The paper's Proposition 1 needs each stream alone about as good as one model and
streams whose errors differ; train.py logs both at every evaluation of a P > 1 model (stream_loss: each
stream through ln_f and the LM head alone; rho: the correlation of the streams' per-token losses; gain,
kl). prefix_matched: on the frozen P=1 base, only kv-initialised prefixes and the aggregator train, in
cells that hold P x n_prefix (the prefix parameters) equal, (2, 4), (4, 2), (8, 1), plus (2, 1) for the
cost of fewer slots, each with the learned aggregator and with a fixed uniform mix: does loss fall with P
at equal prefix parameters? diversity: from scratch, plain prefixes against train.py's --prefix_reparam
(an MLP, Li & Liang): does the reparameterisation lower rho or the per-stream losses? Both run every cell
at several seeds and compare each run with P=1 on its own seed's val batches; a mean difference under
NOISE (0.01 nats) is reported as noise.
"""
import argparse
import csv
import itertools
import json
import math
import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from checkpoint import load_checkpoint  # noqa: E402
from common import UserError, peak_flops  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402

# -----------------------------------------------------------------------------
# the paper's grid (arXiv 2505.10475, the Stack-V2-Python loss grid): 42B tokens, depth 36, final training loss

PAPER_STREAMS = [1, 2, 4, 8]
PAPER_N = [  # one row per P; N counts ParScale's prefixes and aggregator
    [535813376, 693753856, 1088376320, 1571472384, 2774773760, 4353203200],
    [538195842, 696738818, 1092762882, 1577522690, 2784937986, 4368529922],
    [540577412, 699722756, 1097148164, 1583571460, 2795100164, 4383854084],
    [545340552, 705690632, 1105918728, 1595669000, 2815424520, 4414502408],
]
PAPER_LOSS = [
    [1.1722, 1.1496, 1.1131, 1.0817, 1.0451, 1.0213],
    [1.1507, 1.1262, 1.0940, 1.0623, 1.0244, 1.0025],
    [1.1354, 1.1124, 1.0808, 1.0490, 1.0126, 0.9906],
    [1.1231, 1.0997, 1.0688, 1.0383, 1.0016, 0.9794],
]
PAPER_FIT = dict(E=0.6912, A=1.131e7, alpha=0.1894, k=0.3935, r2=0.9978)


def paper_points():
    """The paper's grid as parallel lists (N, P, L)."""
    rows = [(n, P, l) for P, ns, ls in zip(PAPER_STREAMS, PAPER_N, PAPER_LOSS) for n, l in zip(ns, ls)]
    return [list(c) for c in zip(*rows)]


# -----------------------------------------------------------------------------
# the law and its fit

def law(N, P, E, A, alpha, k):
    """Predicted loss; N, P numbers or float64 tensors, natural log."""
    N, P = torch.as_tensor(N, dtype=torch.float64), torch.as_tensor(P, dtype=torch.float64)
    return E + (A / (N * (k * torch.log(P) + 1))) ** alpha


def fit_law(N, P, L, n_starts=27, delta=1e-3):
    """
    Fit L = E + (A / (N (k ln P + 1)))^alpha to points (N, P, L) as the paper does: minimise the
    Huber loss (delta) of log L_pred - log L, from a grid of starting points, keep the best.
    Parameters are optimised as logs (positive by construction); N is taken in billions so that
    log A sits near 0 for every scale (the official script's "A scaled by 1e9").
    n_starts: 27 = 3 E x 3 alpha x 3 k; fewer takes the first ones (1 is enough for clean data).
    Returns E, A (in raw parameter units), alpha, k, r2 (on L) and the Huber objective.
    """
    n = torch.tensor(N, dtype=torch.float64) / 1e9
    p = torch.tensor(P, dtype=torch.float64)
    y = torch.tensor(L, dtype=torch.float64)
    n_med, l_min, l_mean = n.median(), y.min(), y.mean()
    # bounds, as the official bounded L-BFGS-B has: outside them the gradient is zero and the search stops
    # (degenerate toy data otherwise drives k or alpha towards 0 for thousands of iterations)
    lo = torch.tensor([1e-3, 1e-12, 1e-3, 1e-4], dtype=torch.float64).log()
    hi = torch.tensor([1e2, 1e12, 3.0, 1e3], dtype=torch.float64).log()

    def objective(theta):
        E, A, alpha, k = torch.minimum(torch.maximum(theta, lo), hi).exp()
        r = (E + (A / (n * (k * p.log() + 1))) ** alpha).log() - y.log()
        a = r.abs()
        return torch.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta)).sum()

    best = None
    starts = itertools.product([0.5, 0.8, 0.2], [0.3, 0.15, 0.6], [0.4, 0.1, 1.0])  # (E / min L, alpha, k)
    for e_frac, alpha0, k0 in itertools.islice(starts, n_starts):
        E0 = e_frac * l_min
        A0 = n_med * (l_mean - E0) ** (1 / alpha0)  # the start passes through the mean loss at the median N
        theta = torch.tensor([E0, A0, alpha0, k0], dtype=torch.float64).log().requires_grad_()
        opt = torch.optim.LBFGS([theta], lr=1, max_iter=300, tolerance_grad=1e-12, tolerance_change=1e-15,
                                history_size=50, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            o = objective(theta)
            o.backward()
            return o
        opt.step(closure)
        with torch.no_grad():
            o = objective(theta).item()
        if math.isfinite(o) and (best is None or o < best[0]):
            best = (o, theta.detach().clone())
    if best is None:
        raise RuntimeError("the law fit diverged from every starting point")
    obj, theta = best
    E, A, alpha, k = torch.minimum(torch.maximum(theta, lo), hi).exp().tolist()
    pred = law(n, p, E, A, alpha, k)
    r2 = 1 - ((pred - y) ** 2).sum().item() / ((y - l_mean) ** 2).sum().item()
    return dict(E=E, A=A * 1e9, alpha=alpha, k=k, r2=r2, huber=obj)


def fit_line(fit):
    mult = " / ".join(f"{1 + fit['k'] * math.log(P):.2f}" for P in (2, 4, 8))
    return (f"k {fit['k']:.4f}  E {fit['E']:.4f}  A {fit['A']:.4g}  alpha {fit['alpha']:.4f}  R^2 {fit['r2']:.4f}"
            f"  (P = 2/4/8 worth {mult} x parameters)")


# -----------------------------------------------------------------------------
# k at each model size: the paper's grid implies k grows with N

def anchored_law(N1, L1, E, alpha):
    """
    The law through one size's measured P = 1 point: A_N = N1 (L1 - E)^(1/alpha), so that
    E + (A_N / N1)^alpha = L1 exactly, and L_P = E + (A_N / (N_P (k ln P + 1)))^alpha.
    Returns (A_N, f) with f(N_P, P, k) the predicted loss.
    """
    A = N1 * (L1 - E) ** (1 / alpha)
    return A, lambda N, P, k: law(N, P, E, A, alpha, k)


def implied_k(N1, L1, N, P, L, E, alpha):
    """The k at which the anchored law passes exactly through (N, P, L): solve
    k ln P + 1 = (N1 / N) ((L1 - E) / (L - E))^(1/alpha) for k (P > 1, L > E)."""
    return ((N1 / N) * ((L1 - E) / (L - E)) ** (1 / alpha) - 1) / math.log(P)


def fit_k_anchored(N1, L1, N, P, L, E, alpha):
    """One k for one size: least squares on the loss over that size's P > 1 points (N, P, L: lists),
    the law anchored on (N1, L1) and E, alpha held fixed. Starts from the mean of the implied k's."""
    _, f = anchored_law(N1, L1, E, alpha)
    n, p, y = (torch.tensor(v, dtype=torch.float64) for v in (N, P, L))
    start = sum(implied_k(N1, L1, *pt, E, alpha) for pt in zip(N, P, L)) / len(L)
    k = torch.tensor(start, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([k], lr=1, max_iter=100, tolerance_grad=1e-14, tolerance_change=1e-16,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        o = ((f(n, p, k) - y) ** 2).sum()
        o.backward()
        return o
    opt.step(closure)
    return k.item()


def k_per_size(N_rows, L_rows, streams, E, alpha):
    """
    k fitted at each model size of a grid (rows: one per P in streams, streams[0] = 1; columns: sizes),
    anchored on that size's P = 1 loss, E and alpha from a global fit. Per size: k (least squares on
    the loss over P > 1), k_each (the k each P implies alone) and k_mean (their mean).
    """
    if streams[0] != 1:
        raise ValueError("k_per_size needs the P = 1 row first")
    out = []
    for j in range(len(N_rows[0])):
        N1, L1 = N_rows[0][j], L_rows[0][j]
        pts = [(N_rows[i][j], P, L_rows[i][j]) for i, P in enumerate(streams) if P > 1]
        each = {P: implied_k(N1, L1, n, P, l, E, alpha) for n, P, l in pts}
        out.append(dict(N=N1, L1=L1, A=anchored_law(N1, L1, E, alpha)[0],
                        k=fit_k_anchored(N1, L1, *zip(*pts), E, alpha),
                        k_each=each, k_mean=sum(each.values()) / len(each)))
    return out


def line_fit(x, y):
    """Least-squares slope and intercept of y against x."""
    mx, my = sum(x) / len(x), sum(y) / len(y)
    slope = sum((a - mx) * (b - my) for a, b in zip(x, y)) / sum((a - mx) ** 2 for a in x)
    return slope, my - slope * mx


def extrapolate_k(N, k, at):
    """k at the sizes `at` under two forms fitted to (N, k): k linear in ln N, and a power law c N^b
    (a line in ln k against ln N). Beyond the fitted range both are guesses, and they disagree."""
    b_lin, a_lin = line_fit([math.log(n) for n in N], k)
    b_pow, a_pow = line_fit([math.log(n) for n in N], [math.log(v) for v in k])
    return dict(linear=dict(form="k = a + b ln N", a=a_lin, b=b_lin,
                            at={n: a_lin + b_lin * math.log(n) for n in at}),
                power=dict(form="k = c N^b", c=math.exp(a_pow), b=b_pow,
                           at={n: math.exp(a_pow) * n ** b_pow for n in at}))


# -----------------------------------------------------------------------------
# presets: fixed depth and token budget per run, widths x streams

PRESETS = {
    # for tests: seconds on a CPU
    "tiny": dict(device="cpu", n_layer=1, n_head=2, widths=[8, 16, 24], streams=[1, 2, 4, 8], block_size=16,
                 n_prefix=1, batch_size=4, max_iters=3, learning_rate=3e-3, warmup_iters=1, eval_interval=3,
                 eval_iters=1, noise_cell=None, base_iters=3, extra_iters=2, base_width=16, fit_starts=3,
                 seeds=[1, 2], matched_cells=[(2, 4), (4, 2), (8, 1), (2, 1)], frozen_iters=2,
                 diversity_streams=[1, 2, 4], diversity_iters=3, reparam_hidden=8),
    # hours on a 2-core CPU: 12 runs x 4000 steps of batch 32 x block 128 (results/RESULTS.md ran it with
    # fewer steps). 2 prefix slots = 1.6% of the block. prefix_matched and diversity: ~14 and ~15 minutes with
    # --threads=1 (extrapolated from 10-12 steps of every run, evaluations included, on a busy 2-core machine).
    "cpu": dict(device="cpu", n_layer=2, n_head=4, widths=[32, 48, 64], streams=[1, 2, 4, 8], block_size=128,
                n_prefix=2, batch_size=32, max_iters=4000, learning_rate=3e-3, warmup_iters=50, eval_interval=500,
                eval_iters=20, noise_cell=None, base_iters=1500, extra_iters=500, base_width=48,
                seeds=[1, 2], matched_cells=[(2, 4), (4, 2), (8, 1), (2, 1)], frozen_iters=200,
                diversity_streams=[1, 2, 4], diversity_iters=600, reparam_hidden=128),
    # one H200, bf16, near 10M parameters (6 layers, width 384: 10.6M non-embedding), sized to ~4 minutes in all
    # (not run yet: `sweep --preset=gpu --dry_run` prints every run and the estimate): 9 runs x 5.9M tokens plus
    # a second seed of w256 P=2, the noise of the fit. 4 prefix slots = 1.6% of the block.
    "gpu": dict(device="cuda", n_layer=6, n_head=4, widths=[128, 256, 384], streams=[1, 2, 4], block_size=256,
                n_prefix=4, batch_size=64, max_iters=360, learning_rate=2e-3, warmup_iters=40, eval_interval=180,
                eval_iters=10, noise_cell=(256, 2), base_iters=1200, extra_iters=300, base_width=256,
                seeds=[1, 2], matched_cells=[(2, 8), (4, 4), (8, 2), (2, 2)], frozen_iters=300,
                diversity_streams=[1, 2, 4], diversity_iters=800, reparam_hidden=512),
}
# base_width: the P=1 base of train_base (two_stage, dynamic, prefix_matched build on it) and diversity's runs.
# noise_cell: (width, P) that sweep trains again with NOISE_SEED; None = none.
# seeds, matched_cells ((P, n_prefix) pairs), frozen_iters: prefix_matched; diversity_*, reparam_hidden: diversity.

SEED = 1337  # train.py's default --seed: every run not given another uses it
NOISE_SEED = 2
NOISE = 0.01  # nats: a difference in val loss smaller than this is noise (seeds and val batches move it that much)


def train_argv(pre, data_dir, out_dir, width, P, max_iters, learning_rate=None, warmup_iters=None, eval_interval=None,
               n_prefix=None, seed=None):
    lr = pre["learning_rate"] if learning_rate is None else learning_rate
    eval_interval = pre["eval_interval"] if eval_interval is None else eval_interval
    return [f"--data_dir={data_dir}", f"--out_dir={out_dir}", f"--device={pre['device']}",
            f"--n_layer={pre['n_layer']}", f"--n_head={pre['n_head']}", f"--n_embd={width}",
            f"--block_size={pre['block_size']}", f"--n_prefix={pre['n_prefix'] if n_prefix is None else n_prefix}",
            f"--n_streams={P}", f"--batch_size={pre['batch_size']}", f"--max_iters={max_iters}", f"--learning_rate={lr}",
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
    ev = evals(out_dir)
    if ev and ev[-1]["step"] > max_iters:
        raise UserError(f"{out_dir} holds a run of {ev[-1]['step']} steps, not {max_iters}: use another --out")
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
        raise UserError(f"cannot create {out_dir} ({e.strerror}): choose another --out") from e
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
                if line.startswith("error: ") or line.startswith("train.py: error: ")]
        if said:  # train.py's own message, or argparse's
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
    argv = train_argv(pre, data_dir, out_dir, pre["base_width"], 1, 0, seed=seed) + [f"--init_from={init_from}", "--eval_only"]
    if streams:
        argv.append(f"--streams={streams}")
    return last_json(call_train(argv, out_dir))


def last_json(out):
    return json.loads(next(line for line in reversed(out.splitlines()) if line.startswith("{")))


def params(out_dir):
    """A finished run's parameter counts (model.param_report of its checkpoint's model_args: a reparameterised
    run's checkpoint holds the folded prefixes) and the size of its prefix MLPs, which only training uses."""
    ckpt = load_checkpoint(os.path.join(out_dir, "ckpt.pt"))
    r = GPT(GPTConfig(**ckpt["model_args"])).param_report()
    return dict(r, reparam=sum(v.numel() for v in ckpt.get("prefix_reparam", {}).values()))


def non_embedding(out_dir):
    return params(out_dir)["non_embedding"]


# for plan's GPU time estimate: assumptions, not measurements (see plan)
ASSUMED_MFU, ASSUMED_STEP_OVERHEAD, ASSUMED_RUN_OVERHEAD = 0.08, 0.015, 10.0


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
    What a sweep will cost, run by run: tokens and FLOPs (model.flops_per_token, evaluations counted as
    forward passes, a third of a training step's FLOPs per token), and for a GPU an estimate of the time from
    three assumptions: ASSUMED_MFU of the H200's datasheet bf16 peak (common.peak_flops; the one measurement,
    results/h200_train.txt, got 18.8% at 11M parameters, and smaller models get less),
    ASSUMED_STEP_OVERHEAD seconds per step (kernel launches, optimizer, logging) and ASSUMED_RUN_OVERHEAD
    seconds per run (starting Python, torch and CUDA; the first steps). runs: sweep_runs' list.
    Returns (lines to print, estimated seconds or None off the GPU).
    """
    vocab = math.ceil(read_meta(data_dir)["vocab_size"] / 64) * 64  # as train.py pads it
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
        flops = model.flops_per_token(pre["block_size"]) * (tokens + eval_tokens / 3)
        sec = flops / (ASSUMED_MFU * peak_flops("H200")) + pre["max_iters"] * ASSUMED_STEP_OVERHEAD + ASSUMED_RUN_OVERHEAD
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
# subcommands

def table(rows, cols):
    widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in cols]
    lines = ["  ".join(c.rjust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(str(r[c]).rjust(w) for c, w in zip(cols, widths)) for r in rows]
    return "\n".join(lines)


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def cmd_fit(args):
    if args.paper:
        N, P, L = paper_points()
        source = "paper grid (arXiv 2505.10475, the Stack-V2-Python loss grid)"
    else:
        N, P, L = points_from(args.runs)
        source = args.runs
    if len(L) < 5:
        raise UserError(f"--runs={source}: found {len(L)} finished runs; a 4-parameter fit needs at least 5")
    fit = fit_law(N, P, L, n_starts=args.starts)
    print(f"{source}: {len(L)} points\n{fit_line(fit)}")
    if args.paper:
        print("paper:  " + fit_line(PAPER_FIT))
    result = dict(source=source, points=len(L), **fit)
    if args.per_size:
        result["per_size"], result["extrapolation"] = print_k_per_size(fit)
    return result


TOY_SIZES = [10**5, 10**6, 10**7]  # non-embedding parameters of this repository's toy models


def print_k_per_size(fit):
    """fit --paper --per_size: k at each size of the paper's grid, then k extrapolated to toy sizes."""
    E, alpha = fit["E"], fit["alpha"]
    rows = k_per_size(PAPER_N, PAPER_LOSS, PAPER_STREAMS, E, alpha)
    print(f"\nk at each size, E {E:.4f} and alpha {alpha:.4f} held from the fit above. Anchor: A_N = N_1 (L_1 - E)^(1/alpha),\n"
          "so the law passes through that size's P = 1 loss exactly; L_P = E + (A_N / (N_P (k ln P + 1)))^alpha with\n"
          "N_P that P's own row of N. k: least squares on L_P over P = 2, 4, 8. k_P: the k that P alone implies;\n"
          "mean: their mean (least squares on k rather than on L).")
    cols = ["N (P=1)", "L (P=1)", "A_N", "k_2", "k_4", "k_8", "mean", "k"]
    table_rows = [{"N (P=1)": f"{r['N']:,}", "L (P=1)": f"{r['L1']:.4f}", "A_N": f"{r['A']:.4g}",
                   **{f"k_{P}": f"{v:.3f}" for P, v in r["k_each"].items()},
                   "mean": f"{r['k_mean']:.3f}", "k": f"{r['k']:.3f}"} for r in rows]
    print(table(table_rows, cols))
    one_row = k_per_size([PAPER_N[0]] * len(PAPER_STREAMS), PAPER_LOSS, PAPER_STREAMS, E, alpha)
    print("k with the P = 1 row of N for every P (ParScale's own parameters left out): "
          + ", ".join(f"{r['k']:.3f}" for r in one_row))
    ext = extrapolate_k([r["N"] for r in rows], [r["k"] for r in rows], TOY_SIZES)
    lin, pw = ext["linear"], ext["power"]
    print(f"\nEXTRAPOLATION, far outside the fitted range (0.54B-4.4B), of k above to toy sizes (non-embedding N);\n"
          f"two forms fitted to the six k's, and they disagree:\n"
          f"  linear in ln N: k = {lin['a']:.3f} + {lin['b']:.4f} ln N\n"
          f"  power law:      k = {pw['c']:.4f} N^{pw['b']:.4f}")
    print(table([{"N": f"{n:.0e}", "linear in ln N": f"{lin['at'][n]:.3f}", "power law": f"{pw['at'][n]:.3f}"}
                 for n in TOY_SIZES], ["N", "linear in ln N", "power law"]))
    from_mean = extrapolate_k([r["N"] for r in rows], [r["k_mean"] for r in rows], TOY_SIZES)
    print("from the mean column instead: linear " + " / ".join(f"{v:.3f}" for v in from_mean["linear"]["at"].values())
          + ", power law " + " / ".join(f"{v:.3f}" for v in from_mean["power"]["at"].values()))
    print("(a negative k is outside the law: it says P streams are worth less than one)")
    return rows, ext


def points_from(path):
    """(N, P, L) from a sweep.csv (columns N, P, val) or from every finished run under a folder
    (N from its checkpoint's model_args, L = its last evaluation's val loss)."""
    if path.endswith(".csv"):
        try:
            with open(path, newline="") as f:
                rows = list(csv.DictReader(f))
            return [float(r["N"]) for r in rows], [int(r["P"]) for r in rows], [float(r["val"]) for r in rows]
        except (csv.Error, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
            raise UserError(f"--runs={path}: not a sweep.csv (it needs numeric columns N, P, val; "
                            f"{type(e).__name__}: {e})") from e
    N, P, L = [], [], []
    for dirpath, _, files in sorted(os.walk(path)):
        if "ckpt.pt" in files and evals(dirpath):
            ckpt = load_checkpoint(os.path.join(dirpath, "ckpt.pt"))
            N.append(GPT(GPTConfig(**ckpt["model_args"])).param_report()["non_embedding"])
            P.append(ckpt["model_args"]["n_streams"])
            L.append(evals(dirpath)[-1]["val"])
    return N, P, L


def sweep_runs(pre, args):
    """The sweep's runs as (name, out_dir, train.py argv, width, P, seed): widths x streams at SEED, then the noise
    cell again at NOISE_SEED (in sweep_noise/, so that `fit --runs=<out>/sweep` leaves it out)."""
    runs = []
    for width, P in itertools.product(pre["widths"], pre["streams"]):
        d = os.path.join(args.out, "sweep", f"w{width}_p{P}")
        runs.append((f"w{width}_p{P}", d, train_argv(pre, args.data_dir, d, width, P, pre["max_iters"]), width, P, SEED))
    if pre["noise_cell"] and pre["noise_cell"][0] in pre["widths"] and pre["noise_cell"][1] in pre["streams"]:
        width, P = pre["noise_cell"]
        name = f"w{width}_p{P}_s{NOISE_SEED}"
        d = os.path.join(args.out, "sweep_noise", name)
        runs.append((name, d, train_argv(pre, args.data_dir, d, width, P, pre["max_iters"], seed=NOISE_SEED), width, P,
                     NOISE_SEED))
    return runs


def cmd_sweep(args):
    pre = preset(args)
    lines, est = plan(pre, args.data_dir, sweep_runs(pre, args))
    if args.dry_run:
        print("\n".join(lines))
        print("then: fit the law to the grid's val losses (the noise run left out); --dry_run: nothing ran")
        return dict(preset=args.preset, runs=len(lines) - 1, estimated_s=est)
    print(lines[0])
    rows, noise = [], None
    for _, d, argv, width, P, seed in sweep_runs(pre, args):
        status = run(argv, d, pre["max_iters"])
        last = evals(d)[-1]
        if seed != SEED:
            noise = noise_row(pre, args, rows, d, width, P)
            continue
        rows.append(dict(width=width, P=P, N=non_embedding(d), train=round(last["train"], 4),
                         val=round(last["val"], 4), status=status))
        print(f"w{width} P={P}: val {last['val']:.4f} ({status})", flush=True)
    for r in rows:  # what each P gained over P=1 at the same width ('' without a P=1 run)
        base = next((b for b in rows if b["width"] == r["width"] and b["P"] == 1), None)
        r["gain_vs_p1"] = round(base["val"] - r["val"], 4) if base else ""
    write_csv(os.path.join(args.out, "sweep.csv"), rows)
    print(table(rows, ["width", "P", "N", "train", "val", "gain_vs_p1", "status"]))
    fit = None
    if len(rows) >= 5:
        fit = fit_law([r["N"] for r in rows], [r["P"] for r in rows], [r["val"] for r in rows], pre.get("fit_starts", 27))
        print(f"fit on val loss: {fit_line(fit)}")
    else:
        print(f"no fit: {len(rows)} runs, a 4-parameter fit needs at least 5")
    result = dict(preset=args.preset, config=pre, runs=rows, noise=noise, fit=fit)
    with open(os.path.join(args.out, "sweep.json"), "w") as f:
        json.dump(result, f, indent=1)
    return dict(preset=args.preset, fit=fit, noise=noise, val={f"w{r['width']}_p{r['P']}": r["val"] for r in rows})


def noise_row(pre, args, rows, d, width, P):
    """The noise cell at a second seed, evaluated again on SEED's val batches (the batches are a function of
    --seed), so that its difference to the grid's run of that cell is the training seed's alone."""
    first = next(r for r in rows if r["width"] == width and r["P"] == P)
    same = last_json(call_train(train_argv(pre, args.data_dir, d, width, P, pre["max_iters"]) +
                                ["--init_from=resume", "--eval_only"], d))["val"]
    row = dict(width=width, P=P, seeds=[SEED, NOISE_SEED], val=[first["val"], round(same, 4)],
               own_batches_val=round(evals(d)[-1]["val"], 4), diff=round(abs(same - first["val"]), 4))
    print(f"noise: w{width} P={P} at seed {NOISE_SEED}: val {same:.4f} on the same batches, against "
          f"{first['val']:.4f} at seed {SEED}: |difference| {row['diff']:.4f}", flush=True)
    return row


def train_base(pre, args):
    d = os.path.join(args.out, "base")
    w = pre["base_width"]
    run(train_argv(pre, args.data_dir, d, w, 1, pre["base_iters"]), d, pre["base_iters"])
    return os.path.join(d, "ckpt.pt")


def cmd_two_stage(args):
    pre = preset(args)
    base = train_base(pre, args)
    w, extra, lr = pre["base_width"], pre["extra_iters"], pre["learning_rate"] / 2
    branches = [  # (name, P, extra train.py flags); each starts from the base
        ("p1_continued", 1, []),
        ("p4_full", 4, []),
        ("p4_frozen", 4, ["--freeze_backbone"]),
        ("p4_full_kv_init", 4, ["--prefix_init=kv"]),
    ]
    curves, final = {}, {}
    for name, P, flags in branches:
        d = os.path.join(args.out, "two_stage", name)
        argv = train_argv(pre, args.data_dir, d, w, P, extra, learning_rate=lr, warmup_iters=extra // 10,
                          eval_interval=max(1, extra // 5))  # a curve: the step-0 evaluation shows the conversion spike
        run(argv, d, extra, init_from=base, extra=flags)
        curves[name] = {r["step"]: round(r["val"], 4) for r in evals(d)}
        final[name] = curves[name][extra]
    steps = sorted(curves["p1_continued"])
    rows = [dict(step=s, **{n: curves[n].get(s, "") for n, *_ in branches}) for s in steps]
    write_csv(os.path.join(args.out, "two_stage.csv"), rows)
    base_val = evals(os.path.join(args.out, "base"))[-1]["val"]
    print(f"base P=1 after {pre['base_iters']} steps: val {base_val:.4f}; then {extra} steps each at lr {lr:g}:")
    print(table(rows, ["step"] + [n for n, *_ in branches]))
    result = dict(preset=args.preset, base_val=base_val, base_iters=pre["base_iters"], extra_iters=extra,
                  stage2_lr=lr, width=w, curves=curves, final=final)
    with open(os.path.join(args.out, "two_stage.json"), "w") as f:
        json.dump(result, f, indent=1)
    return dict(preset=args.preset, base_val=base_val, final=final)


def cmd_dynamic(args):
    pre = preset(args)
    base = train_base(pre, args)
    w, extra, lr = pre["base_width"], pre["extra_iters"], pre["learning_rate"] / 2
    rows = [dict(P=1, streams_file="(none: the backbone alone)", **pick(eval_only(pre, args.data_dir,
                 os.path.join(args.out, "dynamic", "eval"), base)))]
    for P in [P for P in pre["streams"] if P > 1]:
        d = os.path.join(args.out, "dynamic", f"p{P}")
        argv = train_argv(pre, args.data_dir, d, w, P, extra, learning_rate=lr, warmup_iters=extra // 10)
        run(argv, d, extra, init_from=base, extra=["--freeze_backbone", f"--prefix_init={args.prefix_init}"])
        streams = os.path.join(d, f"streams_p{P}.pt")
        ev = eval_only(pre, args.data_dir, os.path.join(args.out, "dynamic", "eval"), base, streams)
        rows.append(dict(P=P, streams_file=os.path.relpath(streams, args.out), **pick(ev)))
    base = os.path.relpath(base)  # as the user would type it
    print(f"one frozen backbone ({base}), streams trained {extra} steps each, prefix init {args.prefix_init}:")
    print(table(rows, ["P", "train", "val", "streams_file"]))
    with open(os.path.join(args.out, "dynamic.json"), "w") as f:
        json.dump(dict(preset=args.preset, backbone=base, prefix_init=args.prefix_init, rows=rows), f, indent=1)
    return dict(preset=args.preset, val={r["P"]: r["val"] for r in rows})


def pick(ev):
    return dict(train=round(ev["train"], 4), val=round(ev["val"], 4))


# -----------------------------------------------------------------------------
# why P > 1 does not pay at toy scale: prefix_matched and diversity. Proposition 1 of the paper needs each
# stream alone about as good as P = 1 (stream_loss) and streams whose errors differ (rho below 1): train.py's
# stream diagnostics measure both at every evaluation.

MIXES = {"learned": [], "uniform": ["--agg_smoothing=1.0"]}  # uniform: smoothing 1 makes every weight 1/P


def cmd_prefix_matched(args):
    """
    One P=1 base (train_base), frozen; then only prefixes and aggregator train (--prefix_init=kv) for each
    (P, n_prefix) cell, with the learned aggregator and with a fixed uniform mix, at each seed. The cells
    hold P x n_prefix (the prefix parameters) equal, plus a control of the same P with fewer slots.
    Every run is compared with the base evaluated on its own seed's val batches (vs_p1). The new parameters
    train at the preset's full learning rate (two_stage and dynamic use half): only they move.
    """
    pre = preset(args)
    base = train_base(pre, args)
    out, w, iters = os.path.join(args.out, "prefix_matched"), pre["base_width"], pre["frozen_iters"]
    runs, p1_val = [], {}
    for seed in pre["seeds"]:
        p1_val[seed] = eval_only(pre, args.data_dir, os.path.join(out, "base_eval"), base, seed=seed)["val"]
        runs.append(run_row(os.path.dirname(base), p1_val[seed], [], P=1, n_prefix=0, mix="-", seed=seed, status="base",
                            val=round(p1_val[seed], 4)))
    for (P, n), mix, seed in itertools.product(pre["matched_cells"], MIXES, pre["seeds"]):
        d = os.path.join(out, f"p{P}_n{n}_{mix}_s{seed}")
        argv = train_argv(pre, args.data_dir, d, w, P, iters, warmup_iters=iters // 10, eval_interval=iters,
                          n_prefix=n, seed=seed)
        status = run(argv, d, iters, init_from=base, extra=["--freeze_backbone", "--prefix_init=kv", *MIXES[mix]])
        runs.append(run_row(d, p1_val[seed], evals(d), P=P, n_prefix=n, mix=mix, seed=seed, status=status))
        print(f"P={P} n_prefix={n} {mix} seed {seed}: val {runs[-1]['val']:.4f} ({status})", flush=True)
    cells = summarise(runs, ("P", "n_prefix", "mix"))
    pairs = []  # (name, the runs of a, the runs of b): a - b per seed
    budget = max(P * n for P, n in pre["matched_cells"])
    line = sorted(c for c in pre["matched_cells"] if c[0] * c[1] == budget)  # equal prefix parameters, P ascending
    for mix in MIXES:
        pairs += [(f"{P}x{n} - {line[0][0]}x{line[0][1]} ({mix})", dict(P=P, n_prefix=n, mix=mix),
                   dict(P=line[0][0], n_prefix=line[0][1], mix=mix)) for P, n in line[1:]]
        pairs += [(f"{P}x{n} - {P}x{m} ({mix}: fewer slots)", dict(P=P, n_prefix=n, mix=mix), dict(P=P, n_prefix=m, mix=mix))
                  for P, n in line for q, m in pre["matched_cells"] if q == P and m < n]
    pairs += [(f"{P}x{n} learned - uniform", dict(P=P, n_prefix=n, mix="learned"), dict(P=P, n_prefix=n, mix="uniform"))
              for P, n in pre["matched_cells"]]
    contrasts = [contrast(name, runs, a, b) for name, a, b in pairs]
    print(f"P=1 base {os.path.relpath(base)} frozen; prefixes (kv init) and aggregator trained {iters} steps, "
          f"lr {pre['learning_rate']:g}; {len(pre['seeds'])} seeds; P x n_prefix = prefix parameters / (2 n_layer width)")
    return report(args, pre, "prefix_matched", ["P", "n_prefix", "mix"], cells, runs, contrasts,
                  dict(base=os.path.relpath(base), base_iters=pre["base_iters"], frozen_iters=iters))


def cmd_diversity(args):
    """
    From scratch at each P: plain prefixes (N(0, 0.02) draws) and prefixes trained through train.py's
    --prefix_reparam MLP; P = 1 once per seed (no prefixes). Does the reparameterisation decorrelate the
    streams (lower rho) or make each stream alone better (lower stream_loss)?
    """
    pre = preset(args)
    out, w, iters, hidden = os.path.join(args.out, "diversity"), pre["base_width"], pre["max_iters"], pre["reparam_hidden"]
    variants = [(P, kind) for P in sorted(pre["streams"]) for kind in (["none"] if P == 1 else ["plain", "reparam"])]
    runs = []
    for seed in pre["seeds"]:
        p1 = None
        for P, kind in variants:
            d = os.path.join(out, f"p{P}_{kind}_s{seed}")
            argv = train_argv(pre, args.data_dir, d, w, P, iters, eval_interval=max(1, iters // 3), seed=seed)
            status = run(argv, d, iters, extra=[f"--prefix_reparam={hidden}"] if kind == "reparam" else [])
            ev = evals(d)
            p1 = ev[-1]["val"] if P == 1 else p1
            runs.append(run_row(d, p1, ev, P=P, prefix=kind, seed=seed, status=status))
            print(f"P={P} {kind} seed {seed}: val {runs[-1]['val']:.4f} ({status})", flush=True)
    cells = summarise(runs, ("P", "prefix"))
    contrasts = [contrast(f"P={P} reparam - plain", runs, dict(P=P, prefix="reparam"), dict(P=P, prefix="plain"))
                 for P in sorted(pre["streams"]) if P > 1]
    print(f"from scratch, {iters} steps, width {w}; reparam = train.py --prefix_reparam={hidden}; {len(pre['seeds'])} seeds")
    return report(args, pre, "diversity", ["P", "prefix"], cells, runs, contrasts, dict(iters=iters, reparam_hidden=hidden))


def run_row(out_dir, p1_val, ev, status, **keys):
    """One run: keys, N with and without the aggregator, val and its difference to P=1 (p1_val: None = no P=1
    run; '' for P=1 itself), and the stream diagnostics of its last evaluation; 'curve' is every evaluation (for the JSON).
    ev: the run's evaluations ([] for the base, whose val comes in keys)."""
    r = params(out_dir)
    row = dict(keys, N=r["non_embedding"], N_no_agg=r["non_embedding"] - r["aggregator"], prefix_params=r["prefixes"],
               reparam_params=r["reparam"], status=status)
    if ev:
        last = ev[-1]
        row["val"] = round(last["val"], 4)
        row["val_step0"] = round(ev[0]["val"], 4)
        row["curve"] = [dict(step=e["step"], val=rnd(e["val"]), rho=rnd(e.get("rho")), gain=rnd(e.get("gain")),
                             stream_loss=e.get("stream_loss", "")) for e in ev]
    diag = ev[-1] if ev and "stream_loss" in ev[-1] else None
    stream = sum(diag["stream_loss"]) / len(diag["stream_loss"]) if diag else None
    row.update(vs_p1=rnd(row["val"] - p1_val if p1_val is not None and keys["P"] > 1 else None), stream_loss=rnd(stream),
               stream_vs_p1=rnd(stream - p1_val if diag and p1_val is not None else None),
               gain=rnd(diag and diag["gain"]), rho=rnd(diag and diag["rho"]), kl=rnd(diag and diag["kl"], 5),
               entropy=rnd(diag and diag["stream_entropy"]))
    return row


def rnd(x, digits=4):
    """A number rounded for a table, '' for none."""
    return "" if x is None or x == "" else round(x, digits) + 0.0  # + 0.0: no -0.0


def mean(xs):
    return "" if not xs or "" in xs else sum(xs) / len(xs)


def verdict(d, low, high):
    """A mean difference in val loss (seeds from low to high) read against NOISE."""
    if d == "":
        return ""
    if abs(d) < NOISE:
        return "noise"
    return ("lower" if d < 0 else "higher") + (", seeds disagree" if low < 0 < high else "")


def summarise(runs, keys):
    """Runs grouped by keys (in order of first appearance): mean and min-max over seeds of val and vs_p1, the
    mean of each diagnostic, N and N without the aggregator (equal across seeds)."""
    groups = {}
    for r in runs:
        groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    cells = []
    for key, g in groups.items():
        val, d = [r["val"] for r in g], [r["vs_p1"] for r in g]
        cells.append(dict(zip(keys, key), N=g[0]["N"], N_no_agg=g[0]["N_no_agg"], seeds=len(g),
                          val=rnd(mean(val)), val_min=min(val), val_max=max(val), vs_p1=rnd(mean(d)),
                          vs_p1_min=min(d) if "" not in d else "", vs_p1_max=max(d) if "" not in d else "",
                          verdict=verdict(mean(d), *((min(d), max(d)) if "" not in d else (0, 0))),
                          **{k: rnd(mean([r[k] for r in g]), 5 if k == "kl" else 4)
                             for k in ("stream_loss", "stream_vs_p1", "gain", "rho", "kl")}))
    return cells


def contrast(name, runs, a, b):
    """a - b, paired by seed (the same val batches), for val (with its verdict), rho, stream_loss and gain.
    a, b: the key values that pick the two cells' runs. None when a cell has no runs."""
    def by_seed(want):
        return {r["seed"]: r for r in runs if all(r[k] == v for k, v in want.items())}
    ra, rb = by_seed(a), by_seed(b)
    seeds = sorted(set(ra) & set(rb))
    if not seeds:
        return None
    diff = {k: [ra[s][k] - rb[s][k] if "" not in (ra[s][k], rb[s][k]) else "" for s in seeds]
            for k in ("val", "rho", "stream_loss", "gain")}
    return dict(contrast=name, seeds=len(seeds), val=rnd(mean(diff["val"])), val_min=rnd(min(diff["val"])),
                val_max=rnd(max(diff["val"])), verdict=verdict(mean(diff["val"]), min(diff["val"]), max(diff["val"])),
                **{k: rnd(mean(diff[k])) for k in ("rho", "stream_loss", "gain")})


CELL_COLS = ["N", "N_no_agg", "seeds", "val", "val_min", "val_max", "vs_p1", "vs_p1_min", "vs_p1_max", "verdict",
             "stream_loss", "stream_vs_p1", "gain", "rho", "kl"]


def report(args, pre, name, keys, cells, runs, contrasts, extra):
    """Print the cells and contrasts; write <out>/<name>.csv (one row per cell) and .json (cells, contrasts,
    runs with their curves, the preset), and the same as <results>/<name>_<preset>.csv/.json with --results."""
    contrasts = [c for c in contrasts if c]
    print(table(cells, keys + CELL_COLS))
    if contrasts:
        print(table(contrasts, ["contrast", "seeds", "val", "val_min", "val_max", "verdict", "rho", "stream_loss", "gain"]))
    print(f"val: mean over seeds (min, max); vs_p1: val - P=1 on the same seed's val batches; verdict: a mean difference\n"
          f"under {NOISE} nats is noise ('seeds disagree': their differences have both signs). stream_loss: each stream\n"
          "alone (its hidden state through ln_f and the LM head), averaged over streams; gain = stream_loss - val; rho: the\n"
          "mean pairwise correlation over tokens of the streams' per-token losses; kl: the mean KL between streams.\n"
          "N: non-embedding parameters; N_no_agg: without the aggregator.")
    result = dict(preset=args.preset, experiment=name, noise_nats=NOISE, config=pre, **extra, cells=cells,
                  contrasts=contrasts, runs=runs)
    folders = [(args.out, name)] + ([(args.results, f"{name}_{args.preset}")] if args.results else [])
    for folder, stem in folders:
        os.makedirs(folder, exist_ok=True)
        write_csv(os.path.join(folder, f"{stem}.csv"), [{k: c[k] for k in keys + CELL_COLS} for c in cells])
        with open(os.path.join(folder, f"{stem}.json"), "w") as f:
            json.dump(result, f, indent=1)
    return dict(preset=args.preset, experiment=name,
                val={"_".join(str(c[k]) for k in keys): c["val"] for c in cells},
                files=[os.path.join(folder, f"{stem}.{ext}") for folder, stem in folders for ext in ("csv", "json")])


SERIES = {  # how plot_pays joins an experiment's cells into lines
    "prefix_matched": lambda c: f"{c['mix']} mix, P x n_prefix = {c['P'] * c['n_prefix']}",
    "diversity": lambda c: f"{c['prefix']} prefixes",
}


def cmd_plot_pays(args):
    """
    Does P pay? One row per experiment found (<results>/prefix_matched_<preset>.json, diversity_<preset>.json):
    left, val loss minus P = 1's on the same val batches (vs_p1) against P: mean over seeds, bars min-max,
    dotted each stream alone, grey the +-NOISE band; right, rho against P. Lines are nudged apart along P so
    that equal ones stay visible. Written from the JSON alone, so it redraws committed results.
    """
    found = []
    for name in SERIES:
        path = os.path.join(args.results, f"{name}_{args.preset}.json")
        if os.path.isfile(path):
            with open(path) as f:
                found.append((name, json.load(f)))
    if not found:
        raise UserError(f"--results={args.results} has no prefix_matched_{args.preset}.json or diversity_{args.preset}.json: "
                        f"run those commands with --preset={args.preset} --results={args.results} first")
    try:  # optional: only this command draws, and the repository does not require matplotlib
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed, so no figure was drawn (pip install matplotlib); the numbers are in "
              + ", ".join(f"{n}_{args.preset}.json" for n, _ in found))
        return dict(figure=None)
    fig, axes = plt.subplots(len(found), 2, figsize=(11, 3.8 * len(found)), squeeze=False)
    for (name, res), (ax_loss, ax_rho) in zip(found, axes):
        lines = {}
        for c in res["cells"]:
            if c["P"] > 1:
                lines.setdefault(SERIES[name](c), []).append(c)
        for i, (label, cells) in enumerate(lines.items()):
            cells.sort(key=lambda c: c["P"])
            P = [c["P"] * 2 ** (0.04 * (i - (len(lines) - 1) / 2)) for c in cells]  # nudged apart
            d = [c["vs_p1"] for c in cells]
            bars = [[c["vs_p1"] - c["vs_p1_min"] for c in cells], [c["vs_p1_max"] - c["vs_p1"] for c in cells]]
            drawn = ax_loss.errorbar(P, d, yerr=bars, marker="o", capsize=3, label=label)
            if "" not in [c["stream_vs_p1"] for c in cells]:
                ax_loss.plot(P, [c["stream_vs_p1"] for c in cells], ":", marker=".", color=drawn[0].get_color())
            if "" not in [c["rho"] for c in cells]:
                ax_rho.plot(P, [c["rho"] for c in cells], marker="o", label=label)
        ax_loss.axhline(0, color="k", linestyle="--", linewidth=1, label="P = 1")
        ax_loss.axhspan(-NOISE, NOISE, color="k", alpha=0.08, label=f"+-{NOISE} nats: noise")
        ticks = sorted({c["P"] for c in res["cells"]})
        for ax in (ax_loss, ax_rho):
            ax.set_xscale("log", base=2)
            ax.set_xticks(ticks, [str(t) for t in ticks])
            ax.set_xlabel("P (streams)")
            ax.grid(alpha=0.3)
        ax_loss.set_ylabel("val loss - P=1's (nats/token)")
        ax_loss.set_title(f"{name} ({args.preset}): below 0 = P pays; dotted = each stream alone", fontsize=10)
        ax_rho.set_ylabel("rho (streams' error correlation)")
        ax_rho.set_title(f"{name}: rho, 1 = the streams err alike", fontsize=10)
        ax_loss.legend(fontsize=7)
        ax_rho.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")
    return dict(figure=args.out)


def preset(args):
    """The preset's settings, with what the command line overrides (flags checked in get_args)."""
    pre = dict(PRESETS[args.preset])
    if args.cmd == "diversity":  # its own grid: fewer P and steps than the sweep's
        pre["streams"], pre["max_iters"] = pre["diversity_streams"], pre["diversity_iters"]
    for key in ("max_iters", "base_iters", "extra_iters", "frozen_iters", "eval_iters", "batch_size"):
        if getattr(args, key, -1) > 0:
            pre[key] = getattr(args, key)
    for key, flag in (("widths", "widths"), ("streams", "n_streams"), ("seeds", "seeds"), ("matched_cells", "cells")):
        if getattr(args, flag, None):
            pre[key] = getattr(args, flag)
    if getattr(args, "reparam", -1) > 0:
        pre["reparam_hidden"] = args.reparam
    if args.device:
        pre["device"] = args.device
    pre["threads"] = args.threads
    return pre


class Parser(argparse.ArgumentParser):
    """argparse whose complaints are UserErrors: one `error:` line and exit 1, like every other user mistake."""

    def error(self, message):
        raise UserError(f"{self.prog}: {message}; see {self.prog} --help")


def int_list(flag, text, multiple_of=1, unique=False):
    """A comma-separated flag of positive integers (multiples of `multiple_of`; no repeats if unique),
    or a UserError naming it."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or any(v < 1 or v % multiple_of for v in values):
        what = f"positive multiples of {multiple_of} (the preset's n_head)" if multiple_of > 1 else "positive integers"
        raise UserError(f"{flag}={text}: expected comma-separated {what}")
    if unique and len(set(values)) < len(values):
        raise UserError(f"{flag}={text}: a value is repeated (each is a run folder of its own)")
    return values


def cell_list(text):
    """--cells: comma-separated PxN_PREFIX pairs, P >= 2 (P = 1 has no prefixes) and N_PREFIX >= 1."""
    try:
        cells = [tuple(int(v) for v in c.split("x")) for c in text.split(",")]
    except ValueError:
        cells = []
    if not cells or any(len(c) != 2 or c[0] < 2 or c[1] < 1 for c in cells) or len(set(cells)) < len(cells):
        raise UserError(f"--cells={text}: expected distinct PxN_PREFIX pairs such as 2x4,4x2 with P >= 2 and N_PREFIX >= 1")
    return cells


def get_args(argv=None):
    p = Parser(prog="scaling.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fit", help="fit the law to the paper's grid or to your runs")
    f.add_argument("--paper", action="store_true", help="the paper's Stack-V2-Python grid")
    f.add_argument("--runs", default="", help="a folder of finished runs (searched recursively) or a sweep.csv")
    f.add_argument("--starts", type=int, default=27, help="starting points of the fit, 1..27")
    f.add_argument("--per_size", action="store_true", help="with --paper: also k at each model size, anchored on its "
                   "P = 1 loss, and k extrapolated to toy sizes")
    for name in ("sweep", "two_stage", "dynamic", "prefix_matched", "diversity"):
        s = sub.add_parser(name)
        s.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
        s.add_argument("--out", default="", help="results and run folders; '' = out/scaling/<preset>")
        s.add_argument("--data_dir", default=os.path.join(ROOT, "data", "stdlib_bytes"), help="prepare_data.py's output")
        s.add_argument("--device", default="", help="'' = the preset's")
        # reduced runs: override the preset (each subcommand takes only the flags it uses)
        if name in ("sweep", "diversity"):
            s.add_argument("--max_iters", type=int, default=-1, help="steps per run; -1 = the preset's"
                           + (" diversity_iters" if name == "diversity" else ""))
        if name == "sweep":
            s.add_argument("--widths", default="", help="comma-separated, e.g. 32,48,64; '' = the preset's")
            s.add_argument("--dry_run", action="store_true", help="print every run's train.py command and the "
                           "estimated cost, run nothing (needs no GPU)")
        if name in ("two_stage", "dynamic", "prefix_matched"):
            s.add_argument("--base_iters", type=int, default=-1, help="steps of the P=1 base; -1 = the preset's")
        if name in ("two_stage", "dynamic"):
            s.add_argument("--extra_iters", type=int, default=-1, help="steps after conversion; -1 = the preset's")
        if name in ("sweep", "dynamic", "diversity"):  # two_stage's branches are fixed: P=1 continued and three P=4 variants
            s.add_argument("--n_streams", default="", help="comma-separated P, e.g. 1,2,4,8; '' = the preset's"
                           + {"dynamic": " (trains those > 1)", "diversity": " diversity_streams"}.get(name, ""))
        if name == "prefix_matched":
            s.add_argument("--frozen_iters", type=int, default=-1, help="steps of each frozen-backbone run; -1 = the preset's")
            s.add_argument("--cells", default="", help="comma-separated PxN_PREFIX cells, e.g. 2x4,4x2,8x1,2x1; "
                           "'' = the preset's matched_cells")
        if name in ("prefix_matched", "diversity"):
            s.add_argument("--seeds", default="", help="comma-separated train.py seeds, e.g. 1,2; '' = the preset's")
            s.add_argument("--results", default="", help="a folder that also gets <command>_<preset>.csv and .json, "
                           "e.g. results; '' = --out only")
        if name == "diversity":
            s.add_argument("--reparam", type=int, default=-1, help="hidden size of train.py's --prefix_reparam MLP; "
                           "-1 = the preset's reparam_hidden")
        s.add_argument("--eval_iters", type=int, default=-1, help="batches per evaluation; -1 = the preset's")
        s.add_argument("--batch_size", type=int, default=-1, help="-1 = the preset's")
        s.add_argument("--threads", type=int, default=-1, help="train.py's torch CPU threads; -1 = torch's default. On a "
                       "CPU shared with other jobs 1 thread can be much faster")
        if name == "dynamic":
            s.add_argument("--prefix_init", default="kv", choices=["kv", "random"], help="prefix init of the streams")
    f = sub.add_parser("plot_pays", help="val loss and rho against P, from prefix_matched's and diversity's JSON")
    f.add_argument("--preset", default="cpu", choices=sorted(PRESETS), help="reads <results>/<experiment>_<preset>.json")
    f.add_argument("--results", default=os.path.join(ROOT, "results"), help="the folder of those files")
    f.add_argument("--out", default="", help="the figure, a .png; '' = <results>/pays_<preset>.png")
    args, unknown = p.parse_known_args(argv)
    if unknown:  # said here, where the subcommand is known (argparse would name only scaling.py)
        raise UserError(f"scaling.py {args.cmd}: unrecognized arguments: {' '.join(unknown)}; "
                        f"see scaling.py {args.cmd} --help")
    if args.cmd == "fit":
        if args.paper == bool(args.runs):
            raise UserError("fit needs one of --paper (the paper's grid) and --runs=DIR|FILE.csv (your runs)")
        if args.per_size and not args.paper:
            raise UserError("--per_size works on the paper's grid only: add --paper")
        if not 1 <= args.starts <= 27:
            raise UserError(f"--starts={args.starts}: must be 1..27")
        if args.runs and not (os.path.isdir(args.runs) or (os.path.isfile(args.runs) and args.runs.endswith(".csv"))):
            raise UserError(f"--runs={args.runs}: neither a folder nor a .csv file; give a sweep's run folder or its sweep.csv")
        return args
    if args.cmd == "plot_pays":
        if not os.path.isdir(args.results):
            raise UserError(f"--results={args.results}: no such folder; give the folder prefix_matched or diversity "
                            "wrote with --results")
        args.out = args.out or os.path.join(args.results, f"pays_{args.preset}.png")
        if not args.out.endswith(".png"):
            raise UserError(f"--out={args.out}: the figure is written as PNG: give a name ending in .png")
        return args
    for key in ("max_iters", "base_iters", "extra_iters", "frozen_iters", "eval_iters", "batch_size", "threads", "reparam"):
        v = getattr(args, key, -1)
        if v == 0 or v < -1:
            raise UserError(f"--{key}={v}: must be a positive integer, or -1 for the "
                            + ("torch default" if key == "threads" else "preset's"))
    if getattr(args, "widths", ""):
        args.widths = int_list("--widths", args.widths, PRESETS[args.preset]["n_head"])
    if getattr(args, "n_streams", ""):
        args.n_streams = int_list("--n_streams", args.n_streams, unique=True)
        if args.cmd == "dynamic" and max(args.n_streams) < 2:
            raise UserError(f"--n_streams={','.join(map(str, args.n_streams))}: dynamic trains streams for each P > 1; "
                            "give at least one")
    if getattr(args, "seeds", ""):
        args.seeds = int_list("--seeds", args.seeds, unique=True)
    if getattr(args, "cells", ""):
        args.cells = cell_list(args.cells)
    if getattr(args, "results", ""):
        args.results = os.path.abspath(args.results)
    device = args.device or PRESETS[args.preset]["device"]
    flag = f"--device={args.device}" if args.device else f"--preset={args.preset} (device {device})"
    if device.split(":")[0] not in ("cpu", "cuda", "mps"):
        raise UserError(f"{flag}: expected cpu, cuda, cuda:N or mps")
    if device.startswith("cuda") and not torch.cuda.is_available() and not getattr(args, "dry_run", False):
        raise UserError(f"{flag}: no CUDA device here (torch {torch.__version__}); use --device=cpu or --preset=cpu")
    # absolute: train.py runs in the repository root
    args.out = os.path.abspath(args.out or os.path.join("out", "scaling", args.preset))
    args.data_dir = os.path.abspath(args.data_dir)
    read_meta(args.data_dir)  # now, not after the first run
    return args


def main(argv=None):
    args = get_args(argv)
    result = {"fit": cmd_fit, "sweep": cmd_sweep, "two_stage": cmd_two_stage, "dynamic": cmd_dynamic,
              "prefix_matched": cmd_prefix_matched, "diversity": cmd_diversity, "plot_pays": cmd_plot_pays}[args.cmd](args)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    try:
        main()
    except UserError as e:  # a mistake the user can fix: one line, no traceback; anything else is a bug
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
