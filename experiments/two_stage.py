"""
Two-stage training: a P=1 base, then four branches from it for a few more steps each: P=1 continued, P=4 with
fresh random prefixes, P=4 with the backbone frozen, and P=4 with kv-initialised prefixes. The curves
start with a step-0 evaluation, so that the loss spike at conversion shows.

    python experiments/two_stage.py --preset=tiny           # seconds
    python experiments/two_stage.py --preset=cpu            # P=1 base, then P=1 / P=4 / P=4 frozen / P=4 kv-init
    python experiments/two_stage.py --preset=cpu --extra_iters=80 --eval_iters=10 --threads=1   # docs/results.md

Prefix init "kv" is train.py's --prefix_init=kv: instead of N(0, 0.02) draws, each stream's prefix is the
base model's own keys and values on a random n_prefix-token training snippet, one snippet per stream (this
repository's idea, not the paper's: it removes the loss spike at conversion, docs/results.md, Two-stage).
Runs land in <out>/base and <out>/two_stage/<branch>; the curves in <out>/two_stage.csv and .json.
"""
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as a script: `python experiments/two_stage.py` from anywhere
    sys.path.insert(0, ROOT)
from experiments import runner  # noqa: E402

BRANCHES = [  # (name, P, extra train.py flags); each starts from the base
    ("p1_continued", 1, []),
    ("p4_full", 4, []),
    ("p4_frozen", 4, ["--freeze_backbone"]),
    ("p4_full_kv_init", 4, ["--prefix_init=kv"]),
]


def two_stage(args):
    """The base, every branch at half the preset's learning rate, and their val curves side by side."""
    pre = runner.preset(args)
    base = runner.train_base(pre, args)
    w, extra, lr = pre["base_width"], pre["extra_iters"], pre["learning_rate"] / 2
    curves, final = {}, {}
    for name, P, flags in BRANCHES:
        d = os.path.join(args.out_dir, "two_stage", name)
        # a curve: its step-0 evaluation shows the spike at conversion
        argv = runner.train_argv(pre, args.data_dir, d, w, P, extra, learning_rate=lr, warmup_iters=extra // 10,
                                 eval_interval=max(1, extra // 5))
        runner.run(argv, d, extra, init_from=base, extra=flags)
        curves[name] = {r["step"]: round(r["val"], 4) for r in runner.evals(d)}
        final[name] = curves[name][extra]
    steps = sorted(curves["p1_continued"])
    rows = [dict(step=s, **{n: curves[n].get(s, "") for n, *_ in BRANCHES}) for s in steps]
    runner.write_csv(os.path.join(args.out_dir, "two_stage.csv"), rows)
    base_val = runner.evals(os.path.join(args.out_dir, "base"))[-1]["val"]
    print(f"base P=1 after {pre['base_iters']} steps: val {base_val:.4f}; then {extra} steps each at lr {lr:g}:")
    print(runner.table(rows, ["step"] + [n for n, *_ in BRANCHES]))
    result = dict(preset=args.preset, base_val=base_val, base_iters=pre["base_iters"], extra_iters=extra,
                  stage2_lr=lr, width=w, curves=curves, final=final)
    with open(os.path.join(args.out_dir, "two_stage.json"), "w") as f:
        json.dump(result, f, indent=1)
    return dict(preset=args.preset, base_val=base_val, final=final)


def get_args(argv=None):
    p = runner.parser("two_stage.py", __doc__)  # the branches are fixed: P=1 continued and three P=4 variants
    p.add_argument("--base_iters", type=int, default=-1, help="steps of the P=1 base; -1 = the preset's")
    p.add_argument("--extra_iters", type=int, default=-1, help="steps after conversion; -1 = the preset's")
    return runner.parse(p, argv)


def main(argv=None):
    return runner.main(two_stage, get_args, argv)


if __name__ == "__main__":
    runner.entry(main)
