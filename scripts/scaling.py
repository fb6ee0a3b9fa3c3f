"""
The parallel scaling law at toy scale: fit it, sweep P x width, two-stage training, dynamic P.

    python scripts/scaling.py fit --paper                      # the paper's Stack-V2-Python grid -> k 0.3935
    python scripts/scaling.py fit --paper --per_size           # ... and k at each model size, extrapolated to toy sizes
    python scripts/scaling.py fit --runs=out/scaling/cpu/sweep # fit your own runs (or a sweep.csv)
    python scripts/scaling.py sweep --preset=tiny              # 3 steps per run: P in {1,2,4,8} x 3 widths, fitted
    python scripts/scaling.py sweep --preset=cpu               # hours on a 2-core CPU (add --threads=1 on a shared CPU)
    python scripts/scaling.py sweep --preset=gpu               # one H200 (run prepare_data.py first); prints its estimated cost
    python scripts/scaling.py two_stage --preset=cpu           # P=1 base, then P=1 / P=4 / P=4 frozen / P=4 kv-init prefixes
    python scripts/scaling.py dynamic --preset=cpu             # one frozen backbone, streams files for P = 2, 4, 8

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
paper's: it removes the loss spike at conversion, scripts/results/RESULTS.md section 3).
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
from model import GPT, GPTConfig, UserError, load_checkpoint, peak_flops  # noqa: E402

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
                 eval_iters=1, base_iters=3, extra_iters=2, two_stage_width=16, fit_starts=3),
    # hours on a 2-core CPU: 12 runs x 4000 steps of batch 32 x block 128 (scripts/results/RESULTS.md ran it with
    # fewer steps). 2 prefix slots = 1.6% of the block.
    "cpu": dict(device="cpu", n_layer=2, n_head=4, widths=[32, 48, 64], streams=[1, 2, 4, 8], block_size=128,
                n_prefix=2, batch_size=32, max_iters=4000, learning_rate=3e-3, warmup_iters=50, eval_interval=500,
                eval_iters=20, base_iters=1500, extra_iters=500, two_stage_width=48),
    # sized for a few minutes on one H200, bf16 (not run yet: `plan` prints the estimate): 12 runs x 9.8M tokens
    # (~1 epoch of the stdlib bytes). 4 prefix slots = 1.6% of the block.
    "gpu": dict(device="cuda", n_layer=4, n_head=4, widths=[64, 128, 192], streams=[1, 2, 4, 8], block_size=256,
                n_prefix=4, batch_size=64, max_iters=600, learning_rate=3e-3, warmup_iters=50, eval_interval=150,
                eval_iters=20, base_iters=1200, extra_iters=400, two_stage_width=128),
}


def train_argv(pre, data_dir, out_dir, width, P, max_iters, learning_rate=None, warmup_iters=None, eval_interval=None):
    lr = pre["learning_rate"] if learning_rate is None else learning_rate
    eval_interval = pre["eval_interval"] if eval_interval is None else eval_interval
    return [f"--data_dir={data_dir}", f"--out_dir={out_dir}", f"--device={pre['device']}",
            f"--n_layer={pre['n_layer']}", f"--n_head={pre['n_head']}", f"--n_embd={width}",
            f"--block_size={pre['block_size']}", f"--n_prefix={pre['n_prefix']}", f"--n_streams={P}",
            f"--batch_size={pre['batch_size']}", f"--max_iters={max_iters}", f"--learning_rate={lr}",
            f"--min_lr={lr / 10}", f"--warmup_iters={pre['warmup_iters'] if warmup_iters is None else warmup_iters}",
            f"--eval_interval={max(1, min(eval_interval, max_iters))}", f"--eval_iters={pre['eval_iters']}",
            f"--log_interval={max(1, min(50, max_iters // 4))}", f"--threads={pre['threads']}"]


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


def eval_only(pre, data_dir, out_dir, init_from, streams=""):
    """train.py --eval_only, which ends its output with one JSON line {train, val, ...}: parse it."""
    argv = train_argv(pre, data_dir, out_dir, pre["two_stage_width"], 1, 0) + [f"--init_from={init_from}", "--eval_only"]
    if streams:
        argv.append(f"--streams={streams}")
    out = call_train(argv, out_dir)
    return json.loads(next(line for line in reversed(out.splitlines()) if line.startswith("{")))


def non_embedding(out_dir):
    cfg = GPTConfig(**load_checkpoint(os.path.join(out_dir, "ckpt.pt"))["model_args"])
    return GPT(cfg).param_report()["non_embedding"]


ASSUMED_MFU, ASSUMED_STEP_OVERHEAD = 0.08, 0.015  # for plan's GPU time estimate: assumptions, not measurements


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


def plan(pre, data_dir):
    """What a sweep will cost: tokens and FLOPs per run (model.flops_per_token), and for a GPU an estimate of
    the time from two assumptions: ASSUMED_MFU of the H200's datasheet bf16 peak (model.peak_flops; the one
    measurement, scripts/results/h200_train.txt, got 18.8% at 11M parameters, and smaller models get less) and
    ASSUMED_STEP_OVERHEAD seconds per step (kernel launches, optimizer, logging)."""
    vocab = math.ceil(read_meta(data_dir)["vocab_size"] / 64) * 64  # as train.py pads it
    tokens = pre["max_iters"] * pre["batch_size"] * pre["block_size"]
    total, est = 0.0, 0.0
    for width, P in itertools.product(pre["widths"], pre["streams"]):
        cfg = GPTConfig(n_layer=pre["n_layer"], n_head=pre["n_head"], n_embd=width, block_size=pre["block_size"],
                        vocab_size=vocab, n_streams=P, n_prefix=pre["n_prefix"])
        flops = GPT(cfg).flops_per_token(pre["block_size"]) * tokens
        total += flops
        est += flops / (ASSUMED_MFU * peak_flops("H200")) + pre["max_iters"] * ASSUMED_STEP_OVERHEAD
    line = f"plan: {len(pre['widths']) * len(pre['streams'])} runs x {tokens:,} tokens, {total / 1e15:.2f} PFLOP"
    if pre["device"] == "cuda":
        line += (f", estimated ~{est / 60:.1f} min on one H200 (assumed {ASSUMED_MFU:.0%} MFU + "
                 f"{ASSUMED_STEP_OVERHEAD * 1e3:.0f} ms/step) plus evaluation")
    return line


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


def cmd_sweep(args):
    pre = preset(args)
    out = os.path.join(args.out, "sweep")
    print(plan(pre, args.data_dir))
    rows = []
    for width in pre["widths"]:
        for P in pre["streams"]:
            d = os.path.join(out, f"w{width}_p{P}")
            status = run(train_argv(pre, args.data_dir, d, width, P, pre["max_iters"]), d, pre["max_iters"])
            last = evals(d)[-1]
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
    result = dict(preset=args.preset, config=pre, runs=rows, fit=fit)
    with open(os.path.join(args.out, "sweep.json"), "w") as f:
        json.dump(result, f, indent=1)
    return dict(preset=args.preset, fit=fit, val={f"w{r['width']}_p{r['P']}": r["val"] for r in rows})


def train_base(pre, args):
    d = os.path.join(args.out, "base")
    w = pre["two_stage_width"]
    run(train_argv(pre, args.data_dir, d, w, 1, pre["base_iters"]), d, pre["base_iters"])
    return os.path.join(d, "ckpt.pt")


def cmd_two_stage(args):
    pre = preset(args)
    base = train_base(pre, args)
    w, extra, lr = pre["two_stage_width"], pre["extra_iters"], pre["learning_rate"] / 2
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
    w, extra, lr = pre["two_stage_width"], pre["extra_iters"], pre["learning_rate"] / 2
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


def preset(args):
    """The preset's settings, with what the command line overrides (flags checked in get_args)."""
    pre = dict(PRESETS[args.preset])
    for key in ("max_iters", "base_iters", "extra_iters", "eval_iters", "batch_size"):
        if getattr(args, key, -1) > 0:
            pre[key] = getattr(args, key)
    if getattr(args, "widths", None):
        pre["widths"] = args.widths
    if getattr(args, "n_streams", None):
        pre["streams"] = args.n_streams
    if args.device:
        pre["device"] = args.device
    pre["threads"] = args.threads
    return pre


class Parser(argparse.ArgumentParser):
    """argparse whose complaints are UserErrors: one `error:` line and exit 1, like every other user mistake."""

    def error(self, message):
        raise UserError(f"{self.prog}: {message}; see {self.prog} --help")


def int_list(flag, text, multiple_of=1):
    """A comma-separated flag of positive integers (multiples of `multiple_of`), or a UserError naming it."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or any(v < 1 or v % multiple_of for v in values):
        what = f"positive multiples of {multiple_of} (the preset's n_head)" if multiple_of > 1 else "positive integers"
        raise UserError(f"{flag}={text}: expected comma-separated {what}")
    return values


def get_args(argv=None):
    p = Parser(prog="scaling.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fit", help="fit the law to the paper's grid or to your runs")
    f.add_argument("--paper", action="store_true", help="the paper's Stack-V2-Python grid")
    f.add_argument("--runs", default="", help="a folder of finished runs (searched recursively) or a sweep.csv")
    f.add_argument("--starts", type=int, default=27, help="starting points of the fit, 1..27")
    f.add_argument("--per_size", action="store_true", help="with --paper: also k at each model size, anchored on its "
                   "P = 1 loss, and k extrapolated to toy sizes")
    for name in ("sweep", "two_stage", "dynamic"):
        s = sub.add_parser(name)
        s.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
        s.add_argument("--out", default="", help="results and run folders; '' = out/scaling/<preset>")
        s.add_argument("--data_dir", default=os.path.join(ROOT, "data", "stdlib_bytes"), help="prepare_data.py's output")
        s.add_argument("--device", default="", help="'' = the preset's")
        # reduced runs: override the preset (each subcommand takes only the flags it uses)
        if name == "sweep":
            s.add_argument("--max_iters", type=int, default=-1, help="steps per run; -1 = the preset's")
            s.add_argument("--widths", default="", help="comma-separated, e.g. 32,48,64; '' = the preset's")
        else:
            s.add_argument("--base_iters", type=int, default=-1, help="steps of the P=1 base; -1 = the preset's")
            s.add_argument("--extra_iters", type=int, default=-1, help="steps after conversion; -1 = the preset's")
        if name != "two_stage":  # two_stage's branches are fixed: P=1 continued and three P=4 variants
            s.add_argument("--n_streams", default="", help="comma-separated P, e.g. 1,2,4,8; '' = the preset's"
                           + (" (trains those > 1)" if name == "dynamic" else ""))
        s.add_argument("--eval_iters", type=int, default=-1, help="batches per evaluation; -1 = the preset's")
        s.add_argument("--batch_size", type=int, default=-1, help="-1 = the preset's")
        s.add_argument("--threads", type=int, default=-1, help="train.py's torch CPU threads; -1 = torch's default. On a "
                       "CPU shared with other jobs 1 thread can be much faster")
        if name == "dynamic":
            s.add_argument("--prefix_init", default="kv", choices=["kv", "random"], help="prefix init of the streams")
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
    for key in ("max_iters", "base_iters", "extra_iters", "eval_iters", "batch_size", "threads"):
        v = getattr(args, key, -1)
        if v == 0 or v < -1:
            raise UserError(f"--{key}={v}: must be a positive integer, or -1 for the "
                            + ("torch default" if key == "threads" else "preset's"))
    if getattr(args, "widths", ""):
        args.widths = int_list("--widths", args.widths, PRESETS[args.preset]["n_head"])
    if getattr(args, "n_streams", ""):
        args.n_streams = int_list("--n_streams", args.n_streams)
        if args.cmd == "dynamic" and max(args.n_streams) < 2:
            raise UserError(f"--n_streams={','.join(map(str, args.n_streams))}: dynamic trains streams for each P > 1; "
                            "give at least one")
    device = args.device or PRESETS[args.preset]["device"]
    flag = f"--device={args.device}" if args.device else f"--preset={args.preset} (device {device})"
    if device.split(":")[0] not in ("cpu", "cuda", "mps"):
        raise UserError(f"{flag}: expected cpu, cuda, cuda:N or mps")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"{flag}: no CUDA device here (torch {torch.__version__}); use --device=cpu or --preset=cpu")
    # absolute: train.py runs in the repository root
    args.out = os.path.abspath(args.out or os.path.join("out", "scaling", args.preset))
    args.data_dir = os.path.abspath(args.data_dir)
    read_meta(args.data_dir)  # now, not after the first run
    return args


def main(argv=None):
    args = get_args(argv)
    result = {"fit": cmd_fit, "sweep": cmd_sweep, "two_stage": cmd_two_stage, "dynamic": cmd_dynamic}[args.cmd](args)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    try:
        main()
    except UserError as e:  # a mistake the user can fix: one line, no traceback; anything else is a bug
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
