"""
Diversity: from scratch, plain prefixes against prefixes trained through an MLP (train.py's
--prefix_reparam, Li & Liang's reparameterisation): does it lower rho, the correlation of the streams'
errors, or the loss of each stream alone?

    python experiments/diversity.py --preset=tiny --stream_counts=1,2 --seeds=1     # seconds
    python experiments/diversity.py --preset=cpu --threads=1 --results=results  # ~15 min on 2 cores

Its own grid (the preset's diversity_streams, diversity_iters, reparam_hidden), at the base width; P = 1
once per seed (no prefixes). Each run is compared with that seed's P = 1, and the cells are read by
noise.py's rule. Runs land in <out>/diversity/; the cells in <out>/diversity.csv and .json, and with
--results also in <results>/diversity_<preset>.csv and .json (plots.py draws them).
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as a script: `python experiments/diversity.py` from anywhere
    sys.path.insert(0, ROOT)
from cli import RenamedFlag  # noqa: E402
from experiments import noise, runner  # noqa: E402

# its own grid: fewer P and steps than the sweep's
GRID = {"streams": "diversity_streams", "max_iters": "diversity_iters"}


def diversity(args):
    """
    From scratch at each P: plain prefixes (N(0, 0.02) draws) and prefixes trained through train.py's
    --prefix_reparam MLP; P = 1 once per seed (no prefixes). Does the reparameterisation decorrelate the
    streams (lower rho) or make each stream alone better (lower stream_loss)?
    """
    pre = runner.preset(args, GRID)
    out, w = os.path.join(args.out_dir, "diversity"), pre["base_width"]
    iters, hidden = pre["max_iters"], pre["reparam_hidden"]
    variants = [(P, kind) for P in sorted(pre["streams"]) for kind in (["none"] if P == 1 else ["plain", "reparam"])]
    runs = []
    for seed in pre["seeds"]:
        p1 = None
        for P, kind in variants:
            d = os.path.join(out, f"p{P}_{kind}_s{seed}")
            argv = runner.train_argv(pre, args.data_dir, d, w, P, iters, eval_interval=max(1, iters // 3), seed=seed)
            status = runner.run(argv, d, iters, extra=[f"--prefix_reparam={hidden}"] if kind == "reparam" else [])
            ev = runner.evals(d)
            p1 = ev[-1]["val"] if P == 1 else p1
            runs.append(noise.run_row(runner.params(d), p1, ev, P=P, prefix=kind, seed=seed, status=status))
            print(f"P={P} {kind} seed {seed}: val {runs[-1]['val']:.4f} ({status})", flush=True)
    cells = noise.summarise(runs, ("P", "prefix"))
    contrasts = [noise.contrast(f"P={P} reparam - plain", runs, dict(P=P, prefix="reparam"), dict(P=P, prefix="plain"))
                 for P in sorted(pre["streams"]) if P > 1]
    print(f"from scratch, {iters} steps, width {w}; reparam = train.py --prefix_reparam={hidden}; "
          f"{len(pre['seeds'])} seeds")
    return noise.report(args, pre, "diversity", ["P", "prefix"], cells, runs, contrasts,
                        dict(iters=iters, reparam_hidden=hidden))


def get_args(argv=None):
    p = runner.parser("diversity.py", __doc__)
    runner.add_stream_counts(p, "diversity_streams")
    p.add_argument("--max_iters", type=int, default=-1, help="steps per run; -1 = the preset's diversity_iters")
    p.add_argument("--prefix_reparam", type=int, default=-1, help="hidden size of train.py's --prefix_reparam "
                   "MLP, for the reparam runs; -1 = the preset's reparam_hidden")
    p.add_argument("--reparam", action=RenamedFlag, new="--prefix_reparam", why="train.py's name for the same MLP")
    runner.add_seed_flags(p, "diversity")
    return runner.parse(p, argv)


def main(argv=None):
    return runner.main(diversity, get_args, argv)


if __name__ == "__main__":
    runner.entry(main)
