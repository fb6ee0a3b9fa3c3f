"""
Where ParScale pays, part 2: repeated data. A small training set seen for many epochs, a validation set that
does not shrink with it, and the arms that tell "P > 1 only regularises" and "P > 1 only adds parameters"
apart from ParScale. The paper reports this regime as one where ParScale does well (arXiv 2505.10475,
Appendix D, Figure 7: it overfits less than parameter scaling at a matched loss).

    python experiments/repeated.py --preset=tiny                              # seconds (the tests)
    python experiments/repeated.py --preset=cpu --dry_run                     # the arms, the runs, a measured estimate
    python experiments/repeated.py --preset=cpu --results=results             # ~1 hour on 2 cores

Data: prepare_data.py --max_train_tokens (the preset's repeated_train_tokens) into <out>/repeated/data_<N>:
the first N tokens of the standard library's train split, and its whole validation split. Model: the
preset's repeated shape; one evaluation about every epoch; each run records its best and its final val loss.
Arms (ARMS): P = 1; P = 2 and 4 with plain prefixes and with --prefix_reparam; P = 1 with dropout 0.1; for each
P the P = 1 model whose non-embedding N is closest to that P's N (prefixes and aggregator included, whole
heads); for each P the P = 1 model at N_base (1 + 0.39 ln P), the paper's own comparison. Arms that are the
same run (a matched model as wide as the base, say) share it.

Seeds, chosen honestly: every arm runs on the exploration seeds; the P > 1 arm with the lowest mean best val
loss relative to P = 1 is chosen; then it runs with P = 1 and its controls on confirmation seeds that played
no part in the choice, reported apart. Differences are paired with P = 1 (or a control) at the same seed,
read by noise.py's 0.01-nat rule. verdicts() is arithmetic on the rows alone, tested on fixed numbers.
--dry_run measures a few training steps of every distinct model and prints the estimate; when it exceeds
--budget_min, arms are cut in CUT_ORDER (never seeds), and the cut is said. Runs land in <out>/repeated/;
the result in <out>/repeated.json and, with --results, <results>/repeated_<preset>.json, .csv and .png.
"""
import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as a script: `python experiments/repeated.py` from anywhere
    sys.path.insert(0, ROOT)
from cli import UserError  # noqa: E402
from experiments import noise, plots, runner  # noqa: E402
from measure import match_width, param_counts  # noqa: E402
from model import GPTConfig  # noqa: E402

K = 0.39  # the law's k on code (arXiv 2505.10475, section 3): the law-width arms
# arm: (P, width rule, extra train.py flags); width rule: "base", ("matched", P) or ("law", P)
ARMS = {
    "p1": (1, "base", []),
    "p1_dropout": (1, "base", ["--dropout=0.1"]),
    "p2_plain": (2, "base", []),
    "p2_reparam": (2, "base", ["reparam"]),
    "p4_plain": (4, "base", []),
    "p4_reparam": (4, "base", ["reparam"]),
    "p1_matched_p2": (1, ("matched", 2), []),
    "p1_matched_p4": (1, ("matched", 4), []),
    "p1_law_p2": (1, ("law", 2), []),
    "p1_law_p4": (1, ("law", 4), []),
}
CONTROLS = ("p1_dropout", "p1_matched_p{P}", "p1_law_p{P}")  # the chosen arm's controls on the confirmation seeds
CUT_ORDER = ["p2_plain", "p4_plain", "p1_law_p2", "p1_matched_p2", "p2_reparam"]  # cut first when over budget


# -----------------------------------------------------------------------------
# the models: widths by rule, one run per distinct (P, width, flags)

def base_config(pre, vocab_size, P=1, width=None):
    w = width or pre["repeated_width"]
    return GPTConfig(n_layer=pre["repeated_n_layer"], n_head=w // pre["repeated_head_dim"], n_embd=w,
                     block_size=pre["block_size"], vocab_size=vocab_size, n_streams=P, n_prefix=pre["n_prefix"])


def arm_width(pre, vocab_size, rule):
    """The width an arm's rule gives: the base's, the P = 1 width closest to P streams' N (matched), or to
    N_base (1 + K ln P) (law). Width moves in whole heads of repeated_head_dim."""
    base = base_config(pre, vocab_size)
    if rule == "base":
        return base.n_embd
    kind, P = rule
    n_base = param_counts(base)["non_embedding"]
    if kind == "matched":
        target = param_counts(dataclasses.replace(base, n_streams=P))["non_embedding"]
    else:
        target = n_base * (1 + K * math.log(P))
    return match_width(base, target).n_embd


def run_key(pre, vocab_size, arm):
    """(P, width, flags): arms with the same key are one run."""
    P, rule, extra = ARMS[arm]
    return P, arm_width(pre, vocab_size, rule), tuple(extra)


def run_name(key, seed):
    P, width, extra = key
    flags = "".join("_" + ("reparam" if f == "reparam" else f.lstrip("-").replace("=", "")) for f in extra)
    return f"p{P}_w{width}{flags}_s{seed}"


def run_argv(pre, data_dir, out_dir, key, seed):
    P, width, extra = key
    argv = runner.train_argv(pre, data_dir, out_dir, width, P, pre["repeated_iters"],
                             eval_interval=pre["repeated_eval_interval"], seed=seed)
    argv += [f"--n_layer={pre['repeated_n_layer']}", f"--n_head={width // pre['repeated_head_dim']}",
             f"--eval_iters={pre['repeated_eval_iters']}"]
    return argv + [f"--prefix_reparam={pre['reparam_hidden']}" if f == "reparam" else f for f in extra]


# -----------------------------------------------------------------------------
# one run's row: best and final val, overfitting, the stream diagnostics against the epoch

def run_row(out_dir, arm, seed, phase, tokens_per_epoch, tokens_per_step):
    ev = runner.evals(out_dir)
    counts = runner.params(out_dir)
    best = min(ev, key=lambda e: e["val"])
    curve = [dict(step=e["step"], epoch=round(e["step"] * tokens_per_step / tokens_per_epoch, 3),
                  train=noise.rnd(e["train"]), val=noise.rnd(e["val"]), rho=noise.rnd(e.get("rho")),
                  gain=noise.rnd(e.get("gain")), kl=noise.rnd(e.get("kl"), 5),
                  stream_loss=noise.rnd(noise.mean(e["stream_loss"])) if e.get("stream_loss") else "") for e in ev]
    return dict(arm=arm, seed=seed, phase=phase, P=ARMS[arm][0], N=counts["non_embedding"],
                best_val=noise.rnd(best["val"]), best_epoch=round(best["step"] * tokens_per_step / tokens_per_epoch, 2),
                final_val=noise.rnd(ev[-1]["val"]), final_train=noise.rnd(ev[-1]["train"]),
                overfit=noise.rnd(ev[-1]["val"] - best["val"]),
                gap=noise.rnd(ev[-1]["val"] - ev[-1]["train"]), curve=curve)


# -----------------------------------------------------------------------------
# verdicts, one per hypothesis: arithmetic on rows (tested on fixed numbers)

def paired(rows, arm_a, arm_b, key, phase):
    """a - b of `key`, seed by seed, on the seeds of `phase` where both arms ran."""
    a = {r["seed"]: r[key] for r in rows if r["arm"] == arm_a and r["phase"] == phase}
    b = {r["seed"]: r[key] for r in rows if r["arm"] == arm_b and r["phase"] == phase}
    return [a[s] - b[s] for s in sorted(set(a) & set(b))]


def rho_trend(rows, arm, phase):
    """rho at the last evaluation minus rho at the first after step 0, seed by seed (a fall is negative)."""
    out = []
    for r in rows:
        pts = [c for c in r["curve"] if c["rho"] != "" and c["step"] > 0]
        if r["arm"] == arm and r["phase"] == phase and len(pts) >= 2:
            out.append(pts[-1]["rho"] - pts[0]["rho"])
    return out


def choose(rows):
    """The exploration's choice: the P > 1 arm with the lowest mean best val loss minus P = 1's, paired by seed."""
    scores = {}
    for arm in {r["arm"] for r in rows if r["phase"] == "explore" and r["P"] > 1}:
        d = paired(rows, arm, "p1", "best_val", "explore")
        if d:
            scores[arm] = sum(d) / len(d)
    if not scores:
        raise UserError("the exploration ran no P > 1 arm to choose from (all cut?)")
    return min(scores, key=scores.get), scores


def verdicts(rows, chosen, phase="confirm"):
    """One verdict per hypothesis, for the chosen arm on one phase's seeds."""
    P = ARMS[chosen][0]
    judged = noise.judged
    return [
        judged(f"{chosen} beats P = 1 (best val)", paired(rows, chosen, "p1", "best_val", phase)),
        judged(f"{chosen} overfits less than P = 1 (final - best val)", paired(rows, chosen, "p1", "overfit", phase)),
        judged(f"{chosen} generalises better than P = 1 (final val - train)", paired(rows, chosen, "p1", "gap", phase)),
        judged(f"{chosen} beats P = 1 with dropout 0.1", paired(rows, chosen, "p1_dropout", "best_val", phase)),
        judged(f"{chosen} beats the parameter-matched P = 1",
               paired(rows, chosen, f"p1_matched_p{P}", "best_val", phase)),
        judged(f"{chosen} beats or matches the law-width P = 1",
               paired(rows, chosen, f"p1_law_p{P}", "best_val", phase), matches_ok=True),
        judged(f"{chosen}'s rho falls with the epoch (last - first evaluation)", rho_trend(rows, chosen, phase),
               missing="not measured (P = 1, or fewer than two evaluations)"),
    ]


# -----------------------------------------------------------------------------
# the plan: runs by phase, a measured estimate, arms cut to the budget

def step_seconds(cfg, pre, reparam):
    """Seconds per training step of cfg at the preset's batch, on one thread (runner.step_seconds); with
    --prefix_reparam, the MLPs' parameters stand in as one Linear per prefix tensor in the optimizer."""
    extra = [torch.nn.Linear(cfg.n_embd, pre["reparam_hidden"]) for _ in range(2 * cfg.n_layer)] if reparam else []
    return runner.step_seconds(cfg, pre["batch_size"], extra)


def plan(pre, vocab_size, arms, jobs, budget_min):
    """(runs by phase, estimated minutes, the arms cut, lines to print). Exploration: every arm on the exploration
    seeds; confirmation: at most P = 1, the chosen arm and its controls on the confirmation seeds (estimated
    with the costliest P > 1 arm). Arms are cut in CUT_ORDER until the estimate fits budget_min."""
    cost = {}
    for arm in ARMS:
        key = run_key(pre, vocab_size, arm)
        if key not in cost:
            evals = pre["repeated_iters"] // pre["repeated_eval_interval"] + 1
            steps = pre["repeated_iters"] + evals * 2 * pre["repeated_eval_iters"] / 3  # eval batch ~ 1/3 step
            cfg = base_config(pre, vocab_size, key[0], key[1])
            cost[key] = steps * step_seconds(cfg, pre, "reparam" in key[2])

    def minutes(arms):
        explore = {run_key(pre, vocab_size, a) for a in arms}
        worst = max((a for a in arms if ARMS[a][0] > 1), key=lambda a: cost[run_key(pre, vocab_size, a)], default=None)
        confirm = set()
        if worst:
            controls = [c.format(P=ARMS[worst][0]) for c in CONTROLS]
            confirm = {run_key(pre, vocab_size, a) for a in ["p1", worst] + controls}
        total = (sum(cost[k] for k in explore) * len(pre["repeated_explore_seeds"])
                 + sum(cost[k] for k in confirm) * len(pre["repeated_confirm_seeds"]))
        return total / jobs / 60, len(explore), len(confirm)

    arms, cut = list(arms), []
    while budget_min > 0 and minutes(arms)[0] > budget_min and any(a in arms for a in CUT_ORDER):
        cut.append(next(a for a in CUT_ORDER if a in arms))
        arms.remove(cut[-1])
    est, n_explore, n_confirm = minutes(arms)
    lines = []
    for a in arms:
        key = run_key(pre, vocab_size, a)
        n = param_counts(base_config(pre, vocab_size, *key[:2]))["non_embedding"]
        lines.append(f"{a}: P={ARMS[a][0]} width {key[1]}, N {n:,}, ~{cost[key]:.0f} s a run on one thread")
    n_seeds = (len(pre["repeated_explore_seeds"]), len(pre["repeated_confirm_seeds"]))
    lines.append(f"estimate: {n_explore} distinct runs x {n_seeds[0]} exploration seeds + up to {n_confirm} x "
                 f"{n_seeds[1]} confirmation seeds, {jobs} at a time: ~{est:.0f} min"
                 + (f"; over the {budget_min} min budget, arms cut: {', '.join(cut)}" if cut else "")
                 + (" - still over the budget: lower --repeated_iters, or raise --budget_min"
                    if 0 < budget_min < est else ""))
    return arms, est, cut, lines


# -----------------------------------------------------------------------------
# running

def prepare(pre, args):
    """The capped data folder (prepare_data.py in a process of its own); reused when its meta says the same cap."""
    path = os.path.join(args.out_dir, "repeated", f"data_{pre['repeated_train_tokens']}")
    meta = os.path.join(path, "meta.json")
    if not os.path.isfile(meta) or runner.read_meta(path).get("max_train_tokens") != pre["repeated_train_tokens"]:
        cmd = [sys.executable, os.path.join(ROOT, "prepare_data.py"),
               f"--max_train_tokens={pre['repeated_train_tokens']}", f"--out_dir={path}",
               f"--block_size={pre['block_size']}"]
        if pre.get("repeated_max_files", -1) > 0:
            cmd.append(f"--max_files={pre['repeated_max_files']}")
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise UserError(f"prepare_data.py for the capped data failed: {done.stderr.strip().splitlines()[-1]}")
    with open(meta) as f:
        return path, json.load(f)


def run_phase(pre, args, data_dir, meta, arms, seeds, phase):
    """Every (arm, seed) of a phase, args.jobs train.py processes at a time; rows in arm order."""
    vocab = meta["vocab_size"]
    todo = {}
    for seed in seeds:
        for arm in arms:
            key = run_key(pre, vocab, arm)
            d = os.path.join(args.out_dir, "repeated", run_name(key, seed))
            todo.setdefault(d, (key, seed))

    def train(d, key, seed):
        return runner.run(run_argv(pre, data_dir, d, key, seed), d, pre["repeated_iters"])

    runner.run_each(args.jobs, train, [(os.path.basename(d), (d, *ks)) for d, ks in todo.items()], phase)
    per_step = pre["batch_size"] * pre["block_size"]
    return [run_row(os.path.join(args.out_dir, "repeated", run_name(run_key(pre, vocab, arm), seed)), arm, seed, phase,
                    meta["train_tokens"], per_step) for seed in seeds for arm in arms]


def repeated(args):
    pre = runner.phased_preset(args, "repeated", ("repeated_iters", "repeated_train_tokens"),
                               ("explore_seeds", "confirm_seeds"))
    data_dir, meta = prepare(pre, args)
    vocab, epoch_steps = meta["vocab_size"], meta["train_tokens"] / (pre["batch_size"] * pre["block_size"])
    print(f"data: {data_dir}: {meta['train_tokens']:,} train tokens (capped from "
          f"{meta.get('uncapped_train_tokens', '?'):,}), {meta['val_tokens']:,} val tokens; "
          f"{pre['repeated_iters']} steps = {pre['repeated_iters'] / epoch_steps:.1f} epochs, an evaluation every "
          f"{pre['repeated_eval_interval']} steps ({pre['repeated_eval_interval'] / epoch_steps:.2f} epochs)")
    arms, est, cut, lines = plan(pre, vocab, args.arms, args.jobs, args.budget_min)
    print("\n".join(lines), flush=True)
    if args.dry_run:
        return dict(preset=args.preset, experiment="repeated", dry_run=True, arms=arms, cut=cut,
                    estimate_min=round(est, 1))
    rows = run_phase(pre, args, data_dir, meta, arms, pre["repeated_explore_seeds"], "explore")
    chosen, scores = choose(rows)
    P = ARMS[chosen][0]
    print(f"chosen on the exploration seeds: {chosen} (mean best val - P=1: "
          + ", ".join(f"{a} {s:+.4f}" for a, s in sorted(scores.items(), key=lambda kv: kv[1])) + ")", flush=True)
    confirm_arms = [a for a in ["p1", chosen] + [c.format(P=P) for c in CONTROLS] if a in arms]
    rows += run_phase(pre, args, data_dir, meta, confirm_arms, pre["repeated_confirm_seeds"], "confirm")
    result = dict(preset=args.preset, experiment="repeated", noise_nats=noise.NOISE, config=pre, data=data_dir,
                  train_tokens=meta["train_tokens"], epochs=round(pre["repeated_iters"] / epoch_steps, 2), arms=arms,
                  cut=cut, chosen=chosen, choice_scores={a: noise.rnd(s) for a, s in scores.items()},
                  verdicts=dict(explore=verdicts(rows, chosen, "explore"), confirm=verdicts(rows, chosen, "confirm")),
                  runs=rows)
    report(args, result)
    return result


def report(args, result):
    """Print the runs and the verdicts, confirmation seeds apart; write the JSON, a CSV of the runs and the figure."""
    cols = ["phase", "arm", "seed", "P", "N", "best_val", "best_epoch", "final_val", "final_train", "overfit", "gap"]
    print(runner.table(result["runs"], cols))
    for phase in ("explore", "confirm"):
        print(f"verdicts, {phase} seeds (paired at the same seed; a mean under {noise.NOISE} nats is noise):")
        print(runner.table(result["verdicts"][phase], ["hypothesis", "seeds", "mean", "min", "max", "verdict"]))
    folders = [(args.out_dir, "repeated")] + ([(args.results, f"repeated_{args.preset}")] if args.results else [])
    for folder, stem in folders:
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"{stem}.json"), "w") as f:
            json.dump(result, f, indent=1)
        runner.write_csv(os.path.join(folder, f"{stem}.csv"), [{k: r[k] for k in cols} for r in result["runs"]])
        plots.plot_repeated(result, os.path.join(folder, f"{stem}.png"))


def get_args(argv=None):
    p = runner.parser("repeated.py", __doc__)
    p.add_argument("--repeated_iters", type=int, default=-1, help="steps per run; -1 = the preset's")
    p.add_argument("--repeated_train_tokens", type=int, default=-1,
                   help="the capped training set, tokens; -1 = the preset's")
    p.add_argument("--arms", type=arm_list, default="", help=f"comma-separated arms to run, of {', '.join(ARMS)}; "
                   "'' = all (p1 is always run)")
    runner.add_phase_flags(p, 60, "arm", "arms are cut (CUT_ORDER)")
    p.add_argument("--results", default="", help="a folder that also gets repeated_<preset>.json, .csv and .png")
    args = runner.parse(p, argv, need_data=False)
    runner.check_phases(args)
    return args


def arm_list(text):
    """An argparse type for --arms: the arms named (all when '') in ARMS's order, p1 always first."""
    unknown = [a for a in text.split(",") if a and a not in ARMS]
    if unknown:
        raise argparse.ArgumentTypeError(f"{', '.join(unknown)} is not an arm; the arms are {', '.join(ARMS)}")
    return ["p1"] + [a for a in ARMS if a != "p1" and (not text or a in text.split(","))]


def main(argv=None):
    return runner.main(repeated, get_args, argv,
                       shown=lambda result: {k: v for k, v in result.items() if k not in ("runs", "config")})


if __name__ == "__main__":
    runner.entry(main)
