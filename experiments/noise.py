"""
Paired differences against P = 1 and the noise rule, shared by the experiments that run every cell at
several seeds (prefix_matched, diversity, and any later one): a run's row (its parameters, val loss, the
difference to P = 1 on its own seed's val batches, the stream diagnostics), cells summarised over seeds,
contrasts between two cells paired seed by seed, a hypothesis judged on its paired differences, and the report
that prints and writes them.

The rule: a mean difference in val loss under NOISE (0.01 nats) is noise; the seeds and the val batches move
a toy model's loss that much. The paper's Proposition 1 needs each stream alone about as good as one model
and streams whose errors differ; train.py logs both at every evaluation of a P > 1 model (stream_loss: each
stream through ln_f and the LM head alone; rho: the correlation of the streams' per-token losses; gain, kl),
and the rows carry them. Everything but report is arithmetic on plain numbers.
"""
import json
import os

from experiments import runner

NOISE = 0.01  # nats: a difference in val loss smaller than this is noise (seeds and val batches move it that much)
# a cell's columns in the tables and CSV files, after the experiment's own keys
CELL_COLS = ["N", "N_no_agg", "seeds", "val", "val_min", "val_max", "vs_p1", "vs_p1_min", "vs_p1_max", "verdict",
             "stream_loss", "stream_vs_p1", "gain", "rho", "kl"]


def rnd(x, digits=4):
    """A number rounded for a table, '' for none."""
    return "" if x is None or x == "" else round(x, digits) + 0.0  # + 0.0: no -0.0


def mean(xs):
    """The mean of xs; '' when there are none or one is missing ('')."""
    return "" if not xs or "" in xs else sum(xs) / len(xs)


def verdict(d, low, high):
    """A mean difference in val loss (seeds from low to high) read against NOISE."""
    if d == "":
        return ""
    if abs(d) < NOISE:
        return "noise"
    return ("lower" if d < 0 else "higher") + (", seeds disagree" if low < 0 < high else "")


def judged(hypothesis, diffs, better_if_lower=True, matches_ok=False, missing="not measured (an arm was cut)",
           holds="holds", refuted="refuted"):
    """One verdict on a hypothesis from its paired differences, one a seed: the mean [min, max] read by the noise
    rule. `holds` needs every seed on the hypothesis's side of zero and the mean beyond NOISE, `refuted` every
    seed on the other side and the mean beyond NOISE; anything else is a null. matches_ok: a difference within
    NOISE holds too. holds, refuted: the words for the two (an experiment may say "confirmed")."""
    if not diffs:
        return dict(hypothesis=hypothesis, seeds=0, mean="", min="", max="", verdict=missing)
    m, lo, hi = sum(diffs) / len(diffs), min(diffs), max(diffs)
    good = (hi < 0) if better_if_lower else (lo > 0)
    bad = (lo > 0) if better_if_lower else (hi < 0)
    if abs(m) < NOISE:
        verdict = f"{holds} (a match, within noise)" if matches_ok else "null: within noise"
    elif (m < 0) == better_if_lower:
        verdict = holds if good else "null: seeds disagree"
    else:
        verdict = refuted if bad else "null: seeds disagree (the mean goes the other way)"
    return dict(hypothesis=hypothesis, seeds=len(diffs), mean=rnd(m), min=rnd(lo), max=rnd(hi), verdict=verdict)


def run_row(counts, p1_val, ev, status, **keys):
    """One run: keys, N with and without the aggregator, val and its difference to P=1 (p1_val: None = no P=1
    run; '' for P=1 itself), and the stream diagnostics of its last evaluation; 'curve' is every evaluation (for
    the JSON).
    counts: runner.params of the run; ev: the run's evaluations ([] for the base, whose val comes in keys)."""
    row = dict(keys, N=counts["non_embedding"], N_no_agg=counts["non_embedding"] - counts["aggregator"],
               prefix_params=counts["prefixes"], reparam_params=counts["reparam"], status=status)
    if ev:
        last = ev[-1]
        row["val"] = round(last["val"], 4)
        row["val_step0"] = round(ev[0]["val"], 4)
        row["curve"] = [dict(step=e["step"], val=rnd(e["val"]), rho=rnd(e.get("rho")), gain=rnd(e.get("gain")),
                             stream_loss=e.get("stream_loss", "")) for e in ev]
    diag = ev[-1] if ev and "stream_loss" in ev[-1] else None
    stream = sum(diag["stream_loss"]) / len(diag["stream_loss"]) if diag else None
    row.update(vs_p1=rnd(row["val"] - p1_val if p1_val is not None and keys["P"] > 1 else None),
               stream_loss=rnd(stream),
               stream_vs_p1=rnd(stream - p1_val if diag and p1_val is not None else None),
               gain=rnd(diag and diag["gain"]), rho=rnd(diag and diag["rho"]), kl=rnd(diag and diag["kl"], 5),
               entropy=rnd(diag and diag["stream_entropy"]))
    return row


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


def report(args, pre, name, keys, cells, runs, contrasts, extra):
    """Print the cells and contrasts; write <out>/<name>.csv (one row per cell) and .json (cells, contrasts,
    runs with their curves, the preset), and the same as <results>/<name>_<preset>.csv/.json with --results."""
    contrasts = [c for c in contrasts if c]
    print(runner.table(cells, keys + CELL_COLS))
    if contrasts:
        cols = ["contrast", "seeds", "val", "val_min", "val_max", "verdict", "rho", "stream_loss", "gain"]
        print(runner.table(contrasts, cols))
    print("val: mean over seeds (min, max); vs_p1: val - P=1 on the same seed's val batches; verdict: a mean "
          f"difference\nunder {NOISE} nats is noise ('seeds disagree': their differences have both signs). "
          "stream_loss: each stream\nalone (its hidden state through ln_f and the LM head), averaged over streams; "
          "gain = stream_loss - val; rho: the\n"
          "mean pairwise correlation over tokens of the streams' per-token losses; kl: the mean KL between streams.\n"
          "N: non-embedding parameters; N_no_agg: without the aggregator.")
    result = dict(preset=args.preset, experiment=name, noise_nats=NOISE, config=pre, **extra, cells=cells,
                  contrasts=contrasts, runs=runs)
    folders = [(args.out_dir, name)] + ([(args.results, f"{name}_{args.preset}")] if args.results else [])
    for folder, stem in folders:
        os.makedirs(folder, exist_ok=True)
        runner.write_csv(os.path.join(folder, f"{stem}.csv"), [{k: c[k] for k in keys + CELL_COLS} for c in cells])
        with open(os.path.join(folder, f"{stem}.json"), "w") as f:
            json.dump(result, f, indent=1)
    return dict(preset=args.preset, experiment=name,
                val={"_".join(str(c[k]) for k in keys): c["val"] for c in cells},
                files=[os.path.join(folder, f"{stem}.{ext}") for folder, stem in folders for ext in ("csv", "json")])


