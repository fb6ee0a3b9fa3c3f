"""
The figures, drawn from results alone: does P pay (prefix_matched's and diversity's JSON), repeated data
(called by repeated.py), the gap against depth and prefix slots (called by depth.py), and the cost sweep's cost
increase against P (called by cost_sweep.py --plot).
matplotlib is optional: without it the pays figure is skipped with a note, and cost_sweep.py refuses --plot
before measuring.

    python experiments/plots.py --preset=cpu                     # results/pays_cpu.png from the committed JSON
    python experiments/plots.py --preset=tiny --results=/tmp/r   # another folder of those files
"""
import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as a script: `python experiments/plots.py` from anywhere
    sys.path.insert(0, ROOT)
from cli import ArgumentParser, RenamedFlag, UserError  # noqa: E402
from experiments import noise, runner  # noqa: E402

try:  # optional; the object-oriented API needs no backend choice (no import-time side effects)
    from matplotlib.figure import Figure
except ImportError:
    Figure = None

SERIES = {  # how the pays figure joins an experiment's cells into lines
    "prefix_matched": lambda c: f"{c['mix']} mix, P x n_prefix = {c['P'] * c['n_prefix']}",
    "diversity": lambda c: f"{c['prefix']} prefixes",
}


def plot_pays(args):
    """
    Does P pay? One row per experiment found (<results>/prefix_matched_<preset>.json, diversity_<preset>.json):
    left, val loss minus P = 1's on the same val batches (vs_p1) against P: mean over seeds, bars min-max,
    dotted each stream alone, grey the +-NOISE band; right, rho against P. Lines are nudged apart along P so
    that equal ones stay visible. Written from the JSON alone, so it redraws committed results.
    """
    out = args.figure or os.path.join(args.results, f"pays_{args.preset}.png")
    found = []
    for name in SERIES:
        path = os.path.join(args.results, f"{name}_{args.preset}.json")
        if os.path.isfile(path):
            with open(path) as f:
                found.append((name, json.load(f)))
    if not found:
        raise UserError(f"--results={args.results} has no prefix_matched_{args.preset}.json or "
                        f"diversity_{args.preset}.json: run those commands with --preset={args.preset} "
                        f"--results={args.results} first")
    if Figure is None:
        print("note: matplotlib is not installed, so no figure was drawn (pip install matplotlib); the numbers are in "
              + ", ".join(f"{n}_{args.preset}.json" for n, _ in found))
        return dict(figure=None)
    fig = Figure(figsize=(11, 3.8 * len(found)), layout="tight")
    axes = fig.subplots(len(found), 2, squeeze=False)
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
        ax_loss.axhspan(-noise.NOISE, noise.NOISE, color="k", alpha=0.08, label=f"+-{noise.NOISE} nats: noise")
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
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")
    return dict(figure=out)


def plot_cost(rows, families, args):
    """The paper's cost figure, measured: cost increase over P=1 against P, ParScale vs width, per batch size.
    rows, families: cost_sweep.bench_decode's; args: its flags (paths, contexts, batches, stream_counts, l_out,
    plot)."""
    path, ctx = args.paths[0], args.contexts[0]
    fig = Figure(figsize=(3.2 * len(args.batches), 6), layout="constrained")
    axes = fig.subplots(2, len(args.batches), squeeze=False)
    at = {(r["attn"], r["path"], r["side"], r["P"], r["batch"], r["context"]): r for r in rows}
    for col, B in enumerate(args.batches):
        for row, (name, key, unit) in enumerate((("memory", "mem_mb", "MB"), ("latency", "ms", "ms"))):
            ax = axes[row][col]
            for i, kind in enumerate(families):
                base = at.get((kind, path, "base", 1, B, ctx))
                for side, style in (("parscale", "-o"), ("width", "--s")):
                    Ps = sorted(set(args.stream_counts) - {1})
                    pts = [(P, at[kind, path, side, P, B, ctx][key] - base[key]) for P in Ps
                           if base is not None and (kind, path, side, P, B, ctx) in at]
                    if pts:
                        label = f"{kind} {'ParScale' if side == 'parscale' else 'width'}"
                        ax.plot(*zip(*pts), style, color=f"C{i}", label=label)
            ax.set_xscale("log", base=2)
            ax.set_title(f"{name}, batch {B}", fontsize=9)
            ax.set_xlabel("P (width side: N_base(1 + k ln P))", fontsize=8)
            ax.set_ylabel(f"increase over P=1 ({unit})", fontsize=8)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"measured cost increase, {path} path, context {ctx}, {args.l_out} decode steps, {args.device_name}")
    fig.savefig(args.plot, dpi=120)
    print(f"figure written to {args.plot}")


def plot_repeated(result, path):
    """repeated.py's figure: validation loss against the epoch for every arm (mean over the confirmation seeds,
    the exploration seeds dotted), and beside it rho, the correlation of the streams' errors, for the P > 1 arms.
    Without matplotlib: a note, no figure."""
    if Figure is None:
        print(f"note: matplotlib is not installed, so {path} was not drawn; the numbers are in the JSON beside it")
        return
    fig = Figure(figsize=(11, 4), layout="constrained")
    ax_val, ax_rho = fig.subplots(1, 2)
    arms = list(dict.fromkeys(r["arm"] for r in result["runs"]))
    for i, arm in enumerate(arms):
        for phase, style in (("confirm", "-"), ("explore", ":")):
            curves = [r["curve"] for r in result["runs"] if r["arm"] == arm and r["phase"] == phase]
            if not curves:
                continue
            n = min(len(c) for c in curves)
            epoch = [curves[0][j]["epoch"] for j in range(n)]
            label = f"{arm} ({phase}, {len(curves)} seeds)"
            val = [sum(c[j]["val"] for c in curves) / len(curves) for j in range(n)]
            ax_val.plot(epoch, val, style, color=f"C{i}", label=label)
            rho = [[c[j]["rho"] for c in curves] for j in range(n)]
            if all(v != "" for vs in rho for v in vs):
                ax_rho.plot(epoch, [sum(vs) / len(vs) for vs in rho], style, color=f"C{i}", label=label)
    ax_val.set(xlabel="epoch", ylabel="val loss (nats per byte)",
               title=f"repeated data: {result['train_tokens']:,} train tokens")
    ax_rho.set(xlabel="epoch", ylabel="rho between streams' per-token losses", title="do the streams decorrelate?")
    ax_val.legend(fontsize=6)
    ax_rho.legend(fontsize=6)
    fig.savefig(path, dpi=120)
    print(f"figure written to {path}")


def plot_depth(rows, path):
    """depth.py's figure from its runs: the gap P = 4 - P = 1 against depth, a line per slot count, the mean over
    seeds with their min-max as bars (exploration seeds solid, confirmation seeds dashed and hollow, reported apart),
    the prefix-only control - P = 1 dotted; beside it rho, the correlation of P = 4's streams' errors. Without
    matplotlib: a note, no figure."""
    if Figure is None:
        print(f"note: matplotlib is not installed, so {path} was not drawn; the numbers are in the JSON beside it")
        return
    fig = Figure(figsize=(11, 4), layout="constrained")
    ax_gap, ax_rho = fig.subplots(1, 2)
    p1 = {(r["phase"], r["layers"], r["seed"]): r["val"] for r in rows if r["arm"] == "p1"}
    slots = sorted({r["slots"] for r in rows if r["arm"] != "p1"})
    for i, S in enumerate(slots):
        for phase, style, face, shift in (("explore", "-", f"C{i}", 0.97), ("confirm", "--", "white", 1.03)):
            for arm, key in (("p4", "gap"), ("ctl", "ctl")):
                if arm == "ctl" and phase == "confirm":
                    continue
                by_layer = {}
                for r in rows:
                    if (r["phase"], r["arm"], r["slots"]) == (phase, arm, S) and (phase, r["layers"], r["seed"]) in p1:
                        by_layer.setdefault(r["layers"], []).append(
                            (r["val"] - p1[phase, r["layers"], r["seed"]], r["rho"]))
                if not by_layer:
                    continue
                x = sorted(by_layer)
                d = [[v for v, _ in by_layer[L]] for L in x]
                mean = [sum(v) / len(v) for v in d]
                seeds = max(len(v) for v in d)
                if arm == "ctl":
                    ax_gap.plot(x, mean, ":", marker="x", color=f"C{i}", label=f"control - P=1, {S} slots ({phase})")
                    continue
                bars = [[m - min(v) for m, v in zip(mean, d)], [max(v) - m for m, v in zip(mean, d)]]
                ax_gap.errorbar([L * shift for L in x], mean, yerr=bars, fmt=style, marker="o", color=f"C{i}",
                                mfc=face, capsize=3, label=f"P=4 - P=1, {S} slots ({phase}, {seeds} seeds)")
                rho = [sum(r for _, r in by_layer[L]) / len(by_layer[L]) for L in x]
                ax_rho.plot(x, rho, style, marker="o", color=f"C{i}", mfc=face, label=f"{S} slots ({phase})")
    layers = sorted({r["layers"] for r in rows})
    for ax in (ax_gap, ax_rho):
        ax.set_xscale("log", base=2)
        ax.set_xticks(layers, [str(L) for L in layers])
        ax.minorticks_off()
        ax.legend(fontsize=6)
    ax_gap.axhspan(-noise.NOISE, noise.NOISE, color="0.9", zorder=0)
    ax_gap.axhline(0, color="0.5", lw=0.8)
    ax_gap.set(xlabel="layers", ylabel="val loss difference (nats per byte)",
               title=f"the gap, paired by seed (grey: within {noise.NOISE} nats)")
    ax_rho.set(xlabel="layers", ylabel="rho between P=4's streams' per-token losses", title="do the streams differ?")
    fig.savefig(path, dpi=120)
    print(f"figure written to {path}")


def get_args(argv=None):
    p = ArgumentParser(prog="plots.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="cpu", choices=sorted(runner.load_presets()),
                   help="reads <results>/<experiment>_<preset>.json")
    p.add_argument("--results", default=os.path.join(ROOT, "results"), help="the folder of those files")
    p.add_argument("--figure", default="", help="the figure, a .png; '' = <results>/pays_<preset>.png")
    p.add_argument("--out", action=RenamedFlag, new="--figure", why="--out_dir is a folder in the other scripts")
    args = p.parse_args(argv)
    if not os.path.isdir(args.results):
        raise UserError(f"--results={args.results}: no such folder; give the folder prefix_matched or diversity "
                        "wrote with --results")
    if args.figure and not args.figure.endswith(".png"):
        raise UserError(f"--figure={args.figure}: the figure is written as PNG: give a name ending in .png")
    return args


def main(argv=None):
    return runner.main(plot_pays, get_args, argv)


if __name__ == "__main__":
    runner.entry(main)
