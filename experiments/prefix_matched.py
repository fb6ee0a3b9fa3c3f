"""
Parameter-matched prefixes on a frozen backbone: does loss fall with P when the prefix parameters do not grow?

    python experiments/prefix_matched.py --preset=tiny --cells=2x1 --seeds=1        # seconds
    python experiments/prefix_matched.py --preset=cpu --threads=1 --results=results  # ~14 min on 2 cores

On the frozen P=1 base (runner.train_base), only kv-initialised prefixes and the aggregator train, in cells
(P, n_prefix) that hold P x n_prefix (the prefix parameters) equal, (2, 4), (4, 2), (8, 1), plus (2, 1) for
the cost of fewer slots, each with the learned aggregator and with a fixed uniform mix (--agg_smoothing=1.0),
at every seed. Each run is compared with the base evaluated on its own seed's val batches, and the cells
are read by noise.py's rule (a mean difference under 0.01 nats is noise). Runs land in
<out>/prefix_matched/; the cells in <out>/prefix_matched.csv and .json, and with --results also in
<results>/prefix_matched_<preset>.csv and .json (plots.py draws them).
"""
import argparse
import itertools
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as a script: `python experiments/prefix_matched.py` from anywhere
    sys.path.insert(0, ROOT)
from experiments import noise, runner  # noqa: E402

MIXES = {"learned": [], "uniform": ["--agg_smoothing=1.0"]}  # uniform: smoothing 1 makes every weight 1/P


def contrast_pairs(cells):
    """The contrasts between cells (P, n_prefix), as (name, a, b) with a and b the key values of two cells
    (a - b, paired by seed): along the line of equal P x n_prefix (the largest), each P against the smallest;
    each cell on that line against the same P with fewer slots; and learned against uniform in every cell."""
    pairs = []
    budget = max(P * n for P, n in cells)
    line = sorted(c for c in cells if c[0] * c[1] == budget)  # equal prefix parameters, P ascending
    for mix in MIXES:
        pairs += [(f"{P}x{n} - {line[0][0]}x{line[0][1]} ({mix})", dict(P=P, n_prefix=n, mix=mix),
                   dict(P=line[0][0], n_prefix=line[0][1], mix=mix)) for P, n in line[1:]]
        pairs += [(f"{P}x{n} - {P}x{m} ({mix}: fewer slots)", dict(P=P, n_prefix=n, mix=mix),
                   dict(P=P, n_prefix=m, mix=mix)) for P, n in line for q, m in cells if q == P and m < n]
    pairs += [(f"{P}x{n} learned - uniform", dict(P=P, n_prefix=n, mix="learned"), dict(P=P, n_prefix=n, mix="uniform"))
              for P, n in cells]
    return pairs


def prefix_matched(args):
    """
    One P=1 base, frozen; then only prefixes and aggregator train (--prefix_init=kv) for each (P, n_prefix)
    cell, with the learned aggregator and with a fixed uniform mix, at each seed. Every run is compared with
    the base evaluated on its own seed's val batches (vs_p1). The new parameters train at the preset's full
    learning rate (two_stage and dynamic use half): only they move.
    """
    pre = runner.preset(args)
    base = runner.train_base(pre, args)
    out, w, iters = os.path.join(args.out_dir, "prefix_matched"), pre["base_width"], pre["frozen_iters"]
    runs, p1_val = [], {}
    for seed in pre["seeds"]:
        p1_val[seed] = runner.eval_only(pre, args.data_dir, os.path.join(out, "base_eval"), base, seed=seed)["val"]
        runs.append(noise.run_row(runner.params(os.path.dirname(base)), p1_val[seed], [], P=1, n_prefix=0, mix="-",
                                  seed=seed, status="base", val=round(p1_val[seed], 4)))
    for (P, n), mix, seed in itertools.product(pre["matched_cells"], MIXES, pre["seeds"]):
        d = os.path.join(out, f"p{P}_n{n}_{mix}_s{seed}")
        argv = runner.train_argv(pre, args.data_dir, d, w, P, iters, warmup_iters=iters // 10, eval_interval=iters,
                                 n_prefix=n, seed=seed)
        status = runner.run(argv, d, iters, init_from=base,
                            extra=["--freeze_backbone", "--prefix_init=kv", *MIXES[mix]])
        runs.append(noise.run_row(runner.params(d), p1_val[seed], runner.evals(d), P=P, n_prefix=n, mix=mix, seed=seed,
                                  status=status))
        print(f"P={P} n_prefix={n} {mix} seed {seed}: val {runs[-1]['val']:.4f} ({status})", flush=True)
    cells = noise.summarise(runs, ("P", "n_prefix", "mix"))
    contrasts = [noise.contrast(name, runs, a, b) for name, a, b in contrast_pairs(pre["matched_cells"])]
    print(f"P=1 base {os.path.relpath(base)} frozen; prefixes (kv init) and aggregator trained {iters} steps, "
          f"lr {pre['learning_rate']:g}; {len(pre['seeds'])} seeds; "
          "P x n_prefix = prefix parameters / (2 n_layer width)")
    return noise.report(args, pre, "prefix_matched", ["P", "n_prefix", "mix"], cells, runs, contrasts,
                        dict(base=os.path.relpath(base), base_iters=pre["base_iters"], frozen_iters=iters))


def cell_list(text):
    """An argparse type for --cells: comma-separated PxN_PREFIX pairs, P >= 2 (P = 1 has no prefixes) and
    N_PREFIX >= 1."""
    try:
        cells = [tuple(int(v) for v in c.split("x")) for c in text.split(",")]
    except ValueError:
        cells = []
    if not cells or any(len(c) != 2 or c[0] < 2 or c[1] < 1 for c in cells) or len(set(cells)) < len(cells):
        raise argparse.ArgumentTypeError(f"{text}: expected distinct PxN_PREFIX pairs such as 2x4,4x2 with P >= 2 "
                                         "and N_PREFIX >= 1")
    return cells


def get_args(argv=None):
    p = runner.parser("prefix_matched.py", __doc__)
    p.add_argument("--cells", type=cell_list, default=None, help="comma-separated PxN_PREFIX cells, e.g. "
                   "2x4,4x2,8x1,2x1; default: the preset's matched_cells")
    p.add_argument("--base_iters", type=int, default=-1, help="steps of the P=1 base; -1 = the preset's")
    p.add_argument("--frozen_iters", type=int, default=-1, help="steps of each frozen-backbone run; -1 = the preset's")
    runner.add_seed_flags(p, "prefix_matched")
    return runner.parse(p, argv)


def main(argv=None):
    return runner.main(prefix_matched, get_args, argv)


if __name__ == "__main__":
    runner.entry(main)
