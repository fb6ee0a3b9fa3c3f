"""
The parallel scaling law fitted: to the paper's grid (it reproduces the paper's fit), or to your own runs.

    python experiments/fit.py --paper                      # the paper's Stack-V2-Python grid -> k 0.3935
    python experiments/fit.py --paper --per_size           # ... and k at each model size, extrapolated to toy sizes
    python experiments/fit.py --runs=out/scaling/cpu/sweep # fit your own runs: a folder of finished runs
    python experiments/fit.py --runs=results/sweep_cpu_1500.csv   # ... or a sweep.csv

The law and its fit are law.py's (arXiv 2505.10475, eq. 5). A folder is searched recursively: every finished
run (a ckpt.pt and an evaluation) is a point, N its non-embedding parameters, L its last val loss.
"""
import argparse
import csv
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as a script: `python experiments/fit.py` from anywhere
    sys.path.insert(0, ROOT)
from checkpoint import load_checkpoint  # noqa: E402
from cli import ArgumentParser, UserError  # noqa: E402
from counts import param_report  # noqa: E402
from experiments import law, runner  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402


def fit(args):
    """The law fitted to the paper's grid or to your runs; with --per_size, k at each size of the paper's grid."""
    if args.paper:
        N, P, L = law.paper_points()
        source = "paper grid (arXiv 2505.10475, the Stack-V2-Python loss grid)"
    else:
        N, P, L = points_from(args.runs)
        source = args.runs
    if len(L) < 5:
        raise UserError(f"--runs={source}: found {len(L)} finished runs; a 4-parameter fit needs at least 5")
    fitted = law.fit_law(N, P, L, n_starts=args.starts)
    print(f"{source}: {len(L)} points\n{law.fit_line(fitted)}")
    if args.paper:
        print("paper:  " + law.fit_line(law.PAPER_FIT))
    result = dict(source=source, points=len(L), **fitted)
    if args.per_size:
        result["per_size"], result["extrapolation"] = print_k_per_size(fitted)
    return result


TOY_SIZES = [10**5, 10**6, 10**7]  # non-embedding parameters of this repository's toy models


def print_k_per_size(fit):
    """--paper --per_size: k at each size of the paper's grid, then k extrapolated to toy sizes."""
    E, alpha = fit["E"], fit["alpha"]
    rows = law.k_per_size(law.PAPER_N, law.PAPER_LOSS, law.PAPER_STREAMS, E, alpha)
    print(f"\nk at each size, E {E:.4f} and alpha {alpha:.4f} held from the fit above. "
          "Anchor: A_N = N_1 (L_1 - E)^(1/alpha),\n"
          "so the law passes through that size's P = 1 loss exactly; L_P = E + (A_N / (N_P (k ln P + 1)))^alpha with\n"
          "N_P that P's own row of N. k: least squares on L_P over P = 2, 4, 8. k_P: the k that P alone implies;\n"
          "mean: their mean (least squares on k rather than on L).")
    cols = ["N (P=1)", "L (P=1)", "A_N", "k_2", "k_4", "k_8", "mean", "k"]
    table_rows = [{"N (P=1)": f"{r['N']:,}", "L (P=1)": f"{r['L1']:.4f}", "A_N": f"{r['A']:.4g}",
                   **{f"k_{P}": f"{v:.3f}" for P, v in r["k_each"].items()},
                   "mean": f"{r['k_mean']:.3f}", "k": f"{r['k']:.3f}"} for r in rows]
    print(runner.table(table_rows, cols))
    one_row = law.k_per_size([law.PAPER_N[0]] * len(law.PAPER_STREAMS), law.PAPER_LOSS, law.PAPER_STREAMS, E, alpha)
    print("k with the P = 1 row of N for every P (ParScale's own parameters left out): "
          + ", ".join(f"{r['k']:.3f}" for r in one_row))
    ext = law.extrapolate_k([r["N"] for r in rows], [r["k"] for r in rows], TOY_SIZES)
    lin, pw = ext["linear"], ext["power"]
    print(f"\nEXTRAPOLATION, far outside the fitted range (0.54B-4.4B), of k above to toy sizes (non-embedding N);\n"
          f"two forms fitted to the six k's, and they disagree:\n"
          f"  linear in ln N: k = {lin['a']:.3f} + {lin['b']:.4f} ln N\n"
          f"  power law:      k = {pw['c']:.4f} N^{pw['b']:.4f}")
    print(runner.table([{"N": f"{n:.0e}", "linear in ln N": f"{lin['at'][n]:.3f}", "power law": f"{pw['at'][n]:.3f}"}
                 for n in TOY_SIZES], ["N", "linear in ln N", "power law"]))
    from_mean = law.extrapolate_k([r["N"] for r in rows], [r["k_mean"] for r in rows], TOY_SIZES)
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
        if "ckpt.pt" in files and runner.evals(dirpath):
            ckpt = load_checkpoint(os.path.join(dirpath, "ckpt.pt"))
            N.append(param_report(GPT(GPTConfig(**ckpt["model_args"])))["non_embedding"])
            P.append(ckpt["model_args"]["n_streams"])
            L.append(runner.evals(dirpath)[-1]["val"])
    return N, P, L


def get_args(argv=None):
    p = ArgumentParser(prog="fit.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--paper", action="store_true", help="the paper's Stack-V2-Python grid")
    p.add_argument("--runs", default="", help="a folder of finished runs (searched recursively) or a sweep.csv")
    p.add_argument("--starts", type=int, default=27, help="starting points of the fit, 1..27")
    p.add_argument("--per_size", action="store_true", help="with --paper: also k at each model size, anchored on its "
                   "P = 1 loss, and k extrapolated to toy sizes")
    args = p.parse_args(argv)
    if args.paper == bool(args.runs):
        raise UserError("fit.py needs one of --paper (the paper's grid) and --runs=DIR|FILE.csv (your runs)")
    if args.per_size and not args.paper:
        raise UserError("--per_size works on the paper's grid only: add --paper")
    if not 1 <= args.starts <= 27:
        raise UserError(f"--starts={args.starts}: must be 1..27")
    if args.runs and not (os.path.isdir(args.runs) or (os.path.isfile(args.runs) and args.runs.endswith(".csv"))):
        raise UserError(f"--runs={args.runs}: neither a folder nor a .csv file; give a sweep's run "
                        "folder or its sweep.csv")
    return args


def main(argv=None):
    return runner.main(fit, get_args, argv)


if __name__ == "__main__":
    runner.entry(main)
