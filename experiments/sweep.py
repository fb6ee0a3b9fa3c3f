"""
The sweep: P x width at a fixed depth and token budget, each run a train.py process, then the parallel
scaling law (law.py) fitted to the grid's val losses.

    python experiments/sweep.py --preset=tiny              # 3 steps per run: P in {1,2,4,8} x 3 widths, fitted
    python experiments/sweep.py --preset=cpu               # hours on a 2-core CPU (add --threads=1 on a shared CPU)
    python experiments/sweep.py --preset=gpu               # one H200 (after prepare_data.py); prints the estimated cost
    python experiments/sweep.py --preset=gpu --dry_run     # every run's train.py command and the estimate; needs no GPU
    python experiments/fit.py --runs=out/scaling/cpu/sweep # the law fitted again to those runs

Runs land in <out>/sweep/w<width>_p<P> (resumable: runner.py), the table in <out>/sweep.csv and .json.
A preset's noise_cell is trained again at a second seed (in <out>/sweep_noise, so that a fit of
<out>/sweep leaves it out) and evaluated on the first seed's val batches: the difference is the seed's alone.
"""
import itertools
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as a script: `python experiments/sweep.py` from anywhere
    sys.path.insert(0, ROOT)
from cli import UserError, int_list  # noqa: E402
from experiments import law, runner  # noqa: E402


def sweep_runs(pre, args):
    """The sweep's runs as (name, out_dir, train.py argv, width, P, seed): widths x streams at SEED, then the noise
    cell again at NOISE_SEED (in sweep_noise/, so that `fit.py --runs=<out>/sweep` leaves it out)."""
    runs = []
    for width, P in itertools.product(pre["widths"], pre["streams"]):
        d = os.path.join(args.out_dir, "sweep", f"w{width}_p{P}")
        argv = runner.train_argv(pre, args.data_dir, d, width, P, pre["max_iters"])
        runs.append((f"w{width}_p{P}", d, argv, width, P, runner.SEED))
    if pre["noise_cell"] and pre["noise_cell"][0] in pre["widths"] and pre["noise_cell"][1] in pre["streams"]:
        width, P = pre["noise_cell"]
        name = f"w{width}_p{P}_s{runner.NOISE_SEED}"
        d = os.path.join(args.out_dir, "sweep_noise", name)
        argv = runner.train_argv(pre, args.data_dir, d, width, P, pre["max_iters"], seed=runner.NOISE_SEED)
        runs.append((name, d, argv, width, P, runner.NOISE_SEED))
    return runs


def sweep(args):
    """Every run (or, with --dry_run, only the plan), the table with each P's gain over P=1, and the law's fit."""
    pre = runner.preset(args)
    lines, est = runner.plan(pre, args.data_dir, sweep_runs(pre, args))
    if args.dry_run:
        print("\n".join(lines))
        print("then: fit the law to the grid's val losses (the noise run left out); --dry_run: nothing ran")
        return dict(preset=args.preset, runs=len(lines) - 1, estimated_s=est)
    print(lines[0])
    rows, noise = [], None
    for _, d, argv, width, P, seed in sweep_runs(pre, args):
        status = runner.run(argv, d, pre["max_iters"])
        last = runner.evals(d)[-1]
        if seed != runner.SEED:
            noise = noise_row(pre, args, rows, d, width, P)
            continue
        rows.append(dict(width=width, P=P, N=runner.non_embedding(d), train=round(last["train"], 4),
                         val=round(last["val"], 4), status=status))
        print(f"w{width} P={P}: val {last['val']:.4f} ({status})", flush=True)
    for r in rows:  # what each P gained over P=1 at the same width ('' without a P=1 run)
        base = next((b for b in rows if b["width"] == r["width"] and b["P"] == 1), None)
        r["gain_vs_p1"] = round(base["val"] - r["val"], 4) if base else ""
    runner.write_csv(os.path.join(args.out_dir, "sweep.csv"), rows)
    print(runner.table(rows, ["width", "P", "N", "train", "val", "gain_vs_p1", "status"]))
    fit = None
    if len(rows) >= 5:
        fit = law.fit_law([r["N"] for r in rows], [r["P"] for r in rows], [r["val"] for r in rows],
                          pre.get("fit_starts", 27))
        print(f"fit on val loss: {law.fit_line(fit)}")
    else:
        print(f"no fit: {len(rows)} runs, a 4-parameter fit needs at least 5")
    result = dict(preset=args.preset, config=pre, runs=rows, noise=noise, fit=fit)
    with open(os.path.join(args.out_dir, "sweep.json"), "w") as f:
        json.dump(result, f, indent=1)
    return dict(preset=args.preset, fit=fit, noise=noise, val={f"w{r['width']}_p{r['P']}": r["val"] for r in rows})


def noise_row(pre, args, rows, d, width, P):
    """The noise cell at a second seed, evaluated again on SEED's val batches (the batches are a function of
    --seed), so that its difference to the grid's run of that cell is the training seed's alone."""
    first = next(r for r in rows if r["width"] == width and r["P"] == P)
    same = runner.last_json(runner.call_train(runner.train_argv(pre, args.data_dir, d, width, P, pre["max_iters"]) +
                                              ["--init_from=resume", "--eval_only"], d))["val"]
    row = dict(width=width, P=P, seeds=[runner.SEED, runner.NOISE_SEED], val=[first["val"], round(same, 4)],
               own_batches_val=round(runner.evals(d)[-1]["val"], 4), diff=round(abs(same - first["val"]), 4))
    print(f"noise: w{width} P={P} at seed {runner.NOISE_SEED}: val {same:.4f} on the same batches, against "
          f"{first['val']:.4f} at seed {runner.SEED}: |difference| {row['diff']:.4f}", flush=True)
    return row


def get_args(argv=None):
    p = runner.parser("sweep.py", __doc__)
    p.add_argument("--widths", type=int_list, default=None,
                   help="comma-separated n_embd, multiples of the preset's n_head, e.g. 32,48,64; "
                   "default: the preset's")
    runner.add_stream_counts(p, "streams")
    p.add_argument("--max_iters", type=int, default=-1, help="steps per run; -1 = the preset's")
    p.add_argument("--dry_run", action="store_true", help="print every run's train.py command and the estimated cost, "
                   "run nothing (needs no GPU)")
    args = runner.parse(p, argv)
    n_head = runner.load_presets()[args.preset]["n_head"]
    if args.widths and any(w % n_head for w in args.widths):
        raise UserError(f"--widths={','.join(map(str, args.widths))}: every width must be a multiple of the preset's "
                        f"n_head, {n_head}")
    return args


def main(argv=None):
    return runner.main(sweep, get_args, argv)


if __name__ == "__main__":
    runner.entry(main)
