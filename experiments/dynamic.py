"""
Dynamic P: one P=1 base, frozen, and a streams file trained on it for each P > 1 (prefixes and aggregator
only), so that one backbone serves any of those P at inference (sample.py --streams=FILE).

    python experiments/dynamic.py --preset=tiny            # seconds
    python experiments/dynamic.py --preset=cpu             # one frozen backbone, streams files for P = 2, 4, 8
    python experiments/dynamic.py --preset=cpu --extra_iters=80 --eval_iters=10 --threads=1   # docs/results.md

Every P is evaluated as train.py --eval_only on the base plus its streams file, on the same val batches.
The prefixes start as the base's own keys and values (--prefix_init=kv, see two_stage.py) unless
--prefix_init=random. Runs land in <out>/base and <out>/dynamic/p<P>; the table in <out>/dynamic.json.
"""
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as a script: `python experiments/dynamic.py` from anywhere
    sys.path.insert(0, ROOT)
from cli import UserError  # noqa: E402
from experiments import runner  # noqa: E402


def dynamic(args):
    """The base, one frozen-backbone run per P > 1 at half the preset's learning rate, each evaluated from its file."""
    pre = runner.preset(args)
    base = runner.train_base(pre, args)
    w, extra, lr = pre["base_width"], pre["extra_iters"], pre["learning_rate"] / 2
    evals_dir = os.path.join(args.out_dir, "dynamic", "eval")
    rows = [dict(P=1, streams_file="(none: the backbone alone)",
                 **runner.pick(runner.eval_only(pre, args.data_dir, evals_dir, base)))]
    for P in [P for P in pre["streams"] if P > 1]:
        d = os.path.join(args.out_dir, "dynamic", f"p{P}")
        argv = runner.train_argv(pre, args.data_dir, d, w, P, extra, learning_rate=lr, warmup_iters=extra // 10)
        runner.run(argv, d, extra, init_from=base, extra=["--freeze_backbone", f"--prefix_init={args.prefix_init}"])
        streams = os.path.join(d, f"streams_p{P}.pt")
        ev = runner.eval_only(pre, args.data_dir, evals_dir, base, streams)
        rows.append(dict(P=P, streams_file=os.path.relpath(streams, args.out_dir), **runner.pick(ev)))
    base = os.path.relpath(base)  # as the user would type it
    print(f"one frozen backbone ({base}), streams trained {extra} steps each, prefix init {args.prefix_init}:")
    print(runner.table(rows, ["P", "train", "val", "streams_file"]))
    with open(os.path.join(args.out_dir, "dynamic.json"), "w") as f:
        json.dump(dict(preset=args.preset, backbone=base, prefix_init=args.prefix_init, rows=rows), f, indent=1)
    return dict(preset=args.preset, val={r["P"]: r["val"] for r in rows})


def get_args(argv=None):
    p = runner.parser("dynamic.py", __doc__)
    runner.add_stream_counts(p, "streams (trains those > 1)")
    p.add_argument("--base_iters", type=int, default=-1, help="steps of the P=1 base; -1 = the preset's")
    p.add_argument("--extra_iters", type=int, default=-1, help="steps of each streams run; -1 = the preset's")
    p.add_argument("--prefix_init", default="kv", choices=["kv", "random"], help="prefix init of the streams")
    args = runner.parse(p, argv)
    if args.stream_counts and max(args.stream_counts) < 2:
        counts = ",".join(map(str, args.stream_counts))
        raise UserError(f"--stream_counts={counts}: dynamic trains streams for each P > 1; "
                        "give at least one")
    return args


def main(argv=None):
    return runner.main(dynamic, get_args, argv)


if __name__ == "__main__":
    runner.entry(main)
