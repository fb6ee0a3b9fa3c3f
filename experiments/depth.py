"""
Why the toy's streams do not diverge: the gap between P = 4 and P = 1 against depth and prefix slots, with a
prefix-only control. The paper runs 36 layers with 48 prefix slots (arXiv 2505.10475); this toy's sweeps run 2
layers with 2 slots. In the first layer every stream reads the same tokens, so the streams differ only through
their prefixes, and those differences reach the output through the layers above: depth and slots are the levers.

    python experiments/depth.py --preset=tiny                              # seconds
    python experiments/depth.py --preset=cpu --dry_run                     # the runs and a measured estimate
    python experiments/depth.py --preset=cpu --results=results             # ~1.5 hours on 2 cores

The grid: --layers x --slots (the preset's depth_layers, depth_slots) at one width (depth_width), on the whole
corpus, which no run reads twice. At each depth P = 1 (no prefix: one run serves every slot count); at each point
P = depth_streams with aggregator smoothing depth_smoothing, and the prefix-only control: P = 1 with one learned
prefix, trained as 2 streams whose prefixes start equal (zero: --prefix_init_std=0) under a fixed uniform mix
(--agg_smoothing=1.0: every weight is exactly 1/2). The two streams then get the same gradients and stay the same,
so the mix is either stream: the backbone plus one prefix (tests/test_depth.py trains one and checks it; every
control run's own stream diagnostics say it again, kl 0 and rho 1). It costs twice a P = 1 run.

Seeds, chosen honestly: the exploration seeds run the whole grid and choose at most --claims of the four CLAIMS,
each at the point(s) where the exploration reads it most clearly; only those points run on confirmation seeds that
played no part in the choice, reported apart. Every claim is a contrast paired seed by seed, read by noise.py's
rule: confirmed = the confirmation seeds' mean beyond NOISE and every one of them on the claim's side, refuted =
the same on the other side, null otherwise. verdicts() is arithmetic on rows alone, tested on fixed numbers.
--dry_run times a training step of every distinct model (one thread, as each of --jobs runs) and prints the
estimate; over --budget_min, grid points are cut (costliest first, never the last point a contrast needs), never
seeds, and the cut is said. Runs land in <out>/depth/; the result in <out>/depth.json and .csv and, with
--results, <results>/depth_<preset>.json, .csv and .png.
"""
import itertools
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as a script: `python experiments/depth.py` from anywhere
    sys.path.insert(0, ROOT)
from cli import UserError  # noqa: E402
from experiments import noise, plots, runner  # noqa: E402
from model import GPTConfig  # noqa: E402

CONTROL_STREAMS = 2  # the prefix-only control: the fewest streams that give a model a prefix
# claim: (the hypothesis, whether it says the paired difference is below zero)
CLAIMS = {
    "depth": ("the gap (P = 4 - P = 1) shrinks with depth: gap(deepest) - gap(shallowest) < 0", True),
    "slots": ("the gap shrinks with prefix slots: gap(most) - gap(fewest) < 0", True),
    "control": ("the prefix alone explains part of the gap: control - P = 1 > 0", False),
    "beats": ("somewhere on the grid P = 4 beats P = 1: gap < 0", True),
}


# -----------------------------------------------------------------------------
# the runs: a key (arm, layers, slots) each; P = 1 has no prefix, slots 0

def streams(pre, arm):
    return {"p1": 1, "p4": pre["depth_streams"], "ctl": CONTROL_STREAMS}[arm]


def runs_at(points):
    """The run keys a set of (layers, slots) points needs: P = 1 at each depth, P = 4 and the control at each point."""
    return ({("p1", L, 0) for L, _ in points} | {("p4", L, S) for L, S in points}
            | {("ctl", L, S) for L, S in points})


def key_name(key):
    arm, L, S = key
    return f"{arm}_L{L}" if arm == "p1" else f"{arm}_L{L}_S{S}"


def run_name(key, seed):
    return f"{key_name(key)}_s{seed}"


def evals_every(pre):
    """Steps between evaluations: a fifth of the run, so that the evaluation at 80% of the steps exists."""
    return max(1, pre["depth_iters"] // 5)


def run_argv(pre, data_dir, out_dir, key, seed):
    arm, L, S = key
    shape = dict(pre, n_layer=L, eval_iters=pre["depth_eval_iters"])
    argv = runner.train_argv(shape, data_dir, out_dir, pre["depth_width"], streams(pre, arm), pre["depth_iters"],
                             eval_interval=evals_every(pre), n_prefix=max(S, 1), seed=seed)
    if arm == "p4":
        argv.append(f"--agg_smoothing={pre['depth_smoothing']}")
    if arm == "ctl":  # equal (zero) prefixes, an exactly uniform mix: two copies of one stream
        argv += ["--agg_smoothing=1.0", "--prefix_init_std=0"]
    return argv


def config(pre, vocab_size, key):
    arm, L, S = key
    return GPTConfig(n_layer=L, n_head=pre["n_head"], n_embd=pre["depth_width"], block_size=pre["block_size"],
                     vocab_size=vocab_size, n_streams=streams(pre, arm), n_prefix=max(S, 1))


def run_row(pre, out_dir, key, seed, phase, p1_val, status):
    """noise.run_row of one run, with where it sits on the grid and how much its val loss still moved over the
    last fifth of its steps (the evaluation at or before 80% of the steps minus the last)."""
    arm, L, S = key
    ev = runner.evals(out_dir)
    before = [e for e in ev if e["step"] <= 0.8 * pre["depth_iters"]][-1]
    row = noise.run_row(runner.params(out_dir), p1_val, ev, status, phase=phase, arm=arm, layers=L, slots=S,
                        P=streams(pre, arm), seed=seed)
    row["slots_pct"] = noise.rnd(100 * S / pre["block_size"], 1)
    row["last20"] = noise.rnd(before["val"] - ev[-1]["val"])
    return row


# -----------------------------------------------------------------------------
# the claims, read on rows: arithmetic only (tested on fixed numbers)

def vals(rows, phase, arm, L, S):
    """{seed: val} of one run key on one phase's seeds (P = 1: any S)."""
    return {r["seed"]: r["val"] for r in rows
            if r["phase"] == phase and r["arm"] == arm and r["layers"] == L and (arm == "p1" or r["slots"] == S)}


def minus(a, b):
    """{seed: a - b} on the seeds both have."""
    return {s: a[s] - b[s] for s in sorted(set(a) & set(b))}


def gap(rows, phase, L, S):
    """{seed: P = 4 - P = 1} at a point."""
    return minus(vals(rows, phase, "p4", L, S), vals(rows, phase, "p1", L, S))


def instances(points):
    """Every place a claim can be read on these (layers, slots) points, as dicts: claim, at (words), points.
    depth: the shallowest and deepest layers at each slot count; slots: the fewest and most slots at each depth;
    control and beats: each point."""
    points, out = sorted(points), []
    for S in sorted({s for _, s in points}):
        depths = [L for L, s in points if s == S]
        if len(depths) > 1:
            out.append(dict(claim="depth", at=f"{depths[0]} -> {depths[-1]} layers, {S} slots",
                            points=((depths[0], S), (depths[-1], S))))
    for L in sorted({layers for layers, _ in points}):
        slots = [s for layers, s in points if layers == L]
        if len(slots) > 1:
            out.append(dict(claim="slots", at=f"{L} layers, {slots[0]} -> {slots[-1]} slots",
                            points=((L, slots[0]), (L, slots[-1]))))
    for claim in ("control", "beats"):
        out += [dict(claim=claim, at=f"{L} layers, {S} slots", points=((L, S),)) for L, S in points]
    return out


def needs(inst):
    """The run keys an instance's contrast needs (control: P = 4 too, so that the gap it splits is measured)."""
    keys = set()
    for L, S in inst["points"]:
        keys |= {("p1", L, 0), ("p4", L, S)} | ({("ctl", L, S)} if inst["claim"] == "control" else set())
    return keys


def diffs(rows, phase, inst):
    """An instance's paired differences, one a seed of the phase: the contrast its claim names."""
    if inst["claim"] in ("depth", "slots"):
        (La, Sa), (Lb, Sb) = inst["points"]
        d = minus(gap(rows, phase, Lb, Sb), gap(rows, phase, La, Sa))
    elif inst["claim"] == "control":
        (L, S), = inst["points"]
        d = minus(vals(rows, phase, "ctl", L, S), vals(rows, phase, "p1", L, S))
    else:
        d = gap(rows, phase, *inst["points"][0])
    return list(d.values())


def choose(rows, points, n_claims):
    """
    The exploration's choice, on its seeds alone: for each claim, the instance that reads it most clearly (beats:
    the point where P = 4 does best, as the claim says "somewhere"; the others: the largest mean difference either
    way), then the n_claims claims read most clearly: every seed on one side and the mean beyond NOISE first,
    then the larger mean difference. Returns (chosen instances, each claim's best instance with its mean).
    """
    best = {}
    for inst in instances(points):
        d = diffs(rows, "explore", inst)
        if not d:
            continue
        m = sum(d) / len(d)
        clear = (min(d) > 0 or max(d) < 0) and abs(m) >= noise.NOISE
        rank = -m if inst["claim"] == "beats" else abs(m)
        if inst["claim"] not in best or rank > best[inst["claim"]][1]:
            best[inst["claim"]] = (clear, rank, abs(m), dict(inst, explore_mean=noise.rnd(m)))
    ordered = sorted((best[c] for c in CLAIMS if c in best), key=lambda b: (b[0], b[2]), reverse=True)
    return [b[3] for b in ordered[:n_claims]], {c: b[3] for c, b in best.items()}


def verdicts(rows, chosen, best):
    """One verdict per claim. A chosen claim: its exploration reading and its confirmation seeds' verdict at the
    chosen instance (confirmed / refuted / null). One not chosen: its exploration reading at its best instance,
    and the verdict null, as no fresh seed tested it. best: choose's second value."""
    out = []
    for claim, (hypothesis, lower) in CLAIMS.items():
        inst = best.get(claim)  # a chosen claim: its chosen instance, which is its best
        if inst is None:
            out.append(dict(claim=claim, hypothesis=hypothesis, at="", explore="not measured (the grid lacks it)",
                            verdict="not measured (the grid lacks it)", seeds=0, mean="", min="", max=""))
            continue
        explore = noise.judged(hypothesis, diffs(rows, "explore", inst), lower, holds="leans yes",
                               refuted="leans no")
        row = dict(claim=claim, hypothesis=hypothesis, at=inst["at"],
                   explore=f"{explore['verdict']}: {explore['mean']:+.4f} [{explore['min']:+.4f}, "
                   f"{explore['max']:+.4f}], {explore['seeds']} seeds")
        if inst in chosen:
            confirm = noise.judged(hypothesis, diffs(rows, "confirm", inst), lower, holds="confirmed",
                                   missing="not measured (no confirmation run)")
            row.update({k: confirm[k] for k in ("seeds", "mean", "min", "max", "verdict")})
        else:
            row.update(seeds=0, mean="", min="", max="", verdict="null: not taken to fresh seeds (the exploration "
                       "chose others)")
        out.append(row)
    return out


def readings(rows, points, phase):
    """Every instance's contrast on one phase's seeds (a table: what the exploration saw everywhere)."""
    out = []
    for inst in instances(points):
        d = diffs(rows, phase, inst)
        if d:
            r = noise.judged(CLAIMS[inst["claim"]][0], d, CLAIMS[inst["claim"]][1], holds="leans yes",
                             refuted="leans no")
            out.append(dict(claim=inst["claim"], at=inst["at"], **{k: r[k] for k in ("seeds", "mean", "min", "max")},
                            reading=r["verdict"]))
    return out


def point_table(rows, phase):
    """Per point on one phase's seeds: slots as a share of the block, the gap P = 4 - P = 1 (mean, min, max), the
    control - P = 1, P = 4 - control, and P = 4's stream diagnostics (rho, kl, the mixing gain, each stream alone
    - P = 1), all means over the seeds; ctl_kl: the control's kl, 0 while its two streams are one."""
    out = []
    for L, S in sorted({(r["layers"], r["slots"]) for r in rows if r["phase"] == phase and r["arm"] != "p1"}):
        g = list(gap(rows, phase, L, S).values())
        ctl = vals(rows, phase, "ctl", L, S)
        here = [r for r in rows if r["phase"] == phase and (r["layers"], r["slots"]) == (L, S)]
        p4, ctl_rows = [r for r in here if r["arm"] == "p4"], [r for r in here if r["arm"] == "ctl"]

        def mean(key, among=p4):
            return noise.rnd(noise.mean([r[key] for r in among]), 5 if key == "kl" else 4)

        out.append(dict(phase=phase, layers=L, slots=S, slots_pct=p4[0]["slots_pct"], seeds=len(g),
                        gap=noise.rnd(noise.mean(g)), gap_min=noise.rnd(min(g, default="")),
                        gap_max=noise.rnd(max(g, default="")),
                        ctl_minus_p1=noise.rnd(noise.mean(list(minus(ctl, vals(rows, phase, "p1", L, S)).values()))),
                        p4_minus_ctl=noise.rnd(noise.mean(list(minus(vals(rows, phase, "p4", L, S), ctl).values()))),
                        rho=mean("rho"), kl=mean("kl"), gain=mean("gain"), stream_vs_p1=mean("stream_vs_p1"),
                        ctl_kl=mean("kl", ctl_rows)))
    return out


# -----------------------------------------------------------------------------
# the plan: a measured estimate, grid points cut to the budget

def makespan(seconds, jobs):
    """Wall seconds of runs taken longest first by `jobs` workers, each starting the next as it frees: the order
    run_phase submits them in."""
    loads = [0.0] * jobs
    for s in sorted(seconds, reverse=True):
        loads[loads.index(min(loads))] += s
    return max(loads)


def plan(pre, vocab_size, points, jobs, budget_min, n_claims):
    """
    (the points kept, estimated minutes, the points cut, seconds per run key, lines to print). Each run: its
    measured step time (runner.step_seconds, one thread) x (steps + evaluations, an evaluation batch ~1/3 of a
    step). Exploration: every run of the grid on each exploration seed; confirmation: the costliest n_claims claims
    at their costliest instances, on each confirmation seed; each phase's runs longest first, `jobs` at a time.
    Points are cut until the estimate fits budget_min: the costliest first among those whose loss leaves every
    claim the full grid can read still readable somewhere, inner points before the grid's corners.
    """
    n_evals = pre["depth_iters"] // evals_every(pre) + 1
    steps = pre["depth_iters"] + n_evals * 2 * pre["depth_eval_iters"] / 3
    cost = {key: steps * runner.step_seconds(config(pre, vocab_size, key), pre["batch_size"])
            for key in sorted(runs_at(points))}

    def minutes(pts):
        explore = makespan([cost[k] for k in runs_at(pts)] * len(pre["depth_explore_seeds"]), jobs)
        by_claim = {}
        for inst in instances(pts):
            c = sum(cost[k] for k in needs(inst))
            if c > by_claim.get(inst["claim"], (0, None))[0]:
                by_claim[inst["claim"]] = (c, needs(inst))
        confirm = max((makespan([cost[k] for k in set().union(*(by_claim[c][1] for c in combo))]
                                * len(pre["depth_confirm_seeds"]), jobs)
                       for combo in itertools.combinations(by_claim, min(n_claims, len(by_claim)))), default=0)
        return (explore + confirm) / 60

    def cuttable(pts, p):
        return {i["claim"] for i in instances(pts - {p})} == {i["claim"] for i in instances(points)}

    corners = {(L, S) for L in (min(L for L, _ in points), max(L for L, _ in points))
               for S in (min(S for _, S in points), max(S for _, S in points))}
    kept, cut = set(points), []
    while budget_min > 0 and minutes(kept) > budget_min:
        options = [p for p in kept if cuttable(kept, p)]
        if not options:
            break
        p = max(options, key=lambda p: (p not in corners, cost[("p4",) + p] + cost[("ctl",) + p], p))
        kept.discard(p)
        cut.append(p)
    est = minutes(kept)
    lines = [f"{key_name(k)}: P={streams(pre, k[0])}, {k[1]} layers, {k[2]} slots, "
             f"~{cost[k]:.0f} s a run on one thread" for k in sorted(runs_at(kept))]
    lines.append(f"estimate: {len(runs_at(kept))} runs x {len(pre['depth_explore_seeds'])} exploration seeds, then "
                 f"at most {n_claims} claims x {len(pre['depth_confirm_seeds'])} confirmation seeds, {jobs} at a "
                 f"time: ~{est:.0f} min"
                 + (f"; over the {budget_min:g} min budget, points cut: {', '.join(map(str, cut))}" if cut else "")
                 + (" - still over the budget: lower --depth_iters or --depth_width, or raise --budget_min"
                    if 0 < budget_min < est else ""))
    return sorted(kept), est, cut, cost, lines


# -----------------------------------------------------------------------------
# running

def run_phase(pre, args, keys, seeds, phase, cost):
    """Every run key at every seed of a phase, longest first, args.jobs train.py processes at a time; rows (P = 1
    first, so that every other row has its seed's P = 1 to compare with)."""
    out = os.path.join(args.out_dir, "depth")
    todo = sorted(itertools.product(keys, seeds), key=lambda ks: -cost.get(ks[0], 0))

    def train(k, s):
        d = os.path.join(out, run_name(k, s))
        return runner.run(run_argv(pre, args.data_dir, d, k, s), d, pre["depth_iters"])

    status = runner.run_each(args.jobs, train, [(run_name(k, s), (k, s)) for k, s in todo], phase)
    rows, p1 = [], {}
    for k, s in sorted(todo, key=lambda ks: (ks[0][0] != "p1", ks[0][1:], ks[0][0], ks[1])):
        row = run_row(pre, os.path.join(out, run_name(k, s)), k, s, phase, p1.get((k[1], s)), status[run_name(k, s)])
        if k[0] == "p1":
            p1[(k[1], s)] = row["val"]
        rows.append(row)
    return rows


def depth(args):
    pre = runner.phased_preset(args, "depth", ("depth_iters", "depth_width"),
                               ("layers", "slots", "explore_seeds", "confirm_seeds"))
    vocab = runner.padded_vocab(args.data_dir)
    start = time.time()
    points = [(L, S) for L in pre["depth_layers"] for S in pre["depth_slots"]]
    print(f"grid: {pre['depth_layers']} layers x {pre['depth_slots']} prefix slots ("
          + ", ".join(f"{S} = {100 * S / pre['block_size']:.1f}%" for S in pre["depth_slots"])
          + f" of the {pre['block_size']}-token block; the paper: 48 of 2048 = 2.3%), width {pre['depth_width']}, "
          f"{pre['depth_iters']} steps of {pre['batch_size']} x {pre['block_size']} tokens; P = {pre['depth_streams']} "
          f"with smoothing {pre['depth_smoothing']}; the control: P = {CONTROL_STREAMS} equal zero-initialised "
          "prefixes, uniform mix", flush=True)
    points, est, cut, cost, lines = plan(pre, vocab, points, args.jobs, args.budget_min, args.claims)
    print("\n".join(lines), flush=True)
    if args.dry_run:
        return dict(preset=args.preset, experiment="depth", dry_run=True, points=points, cut=cut,
                    estimate_min=round(est, 1))
    rows = run_phase(pre, args, sorted(runs_at(points)), pre["depth_explore_seeds"], "explore", cost)
    chosen, best = choose(rows, points, args.claims)
    print("chosen on the exploration seeds: " + ("; ".join(f"{i['claim']} at {i['at']} (explore mean "
                                                          f"{i['explore_mean']:+.4f})" for i in chosen) or "none"),
          flush=True)
    confirm_keys = sorted(set().union(*(needs(i) for i in chosen)))
    rows += run_phase(pre, args, confirm_keys, pre["depth_confirm_seeds"], "confirm", cost)
    p1_moved = [r["last20"] for r in rows if r["arm"] == "p1"]
    result = dict(preset=args.preset, experiment="depth", points=points, cut=cut, estimate_min=round(est, 1),
                  wall_min=round((time.time() - start) / 60, 1),
                  chosen=[dict(claim=i["claim"], at=i["at"]) for i in chosen],
                  verdicts=verdicts(rows, chosen, best),
                  readings=dict(explore=readings(rows, points, "explore"), confirm=readings(rows, points, "confirm")),
                  point_table=point_table(rows, "explore") + point_table(rows, "confirm"),
                  p1_last20=dict(mean=noise.rnd(noise.mean(p1_moved)), max=max(p1_moved)),
                  control_max_kl=max(r["kl"] for r in rows if r["arm"] == "ctl"))
    report(args, pre, rows, result)
    return result


def report(args, pre, rows, result):
    """Print the cells, the points, every reading and the verdicts; write the JSON, the CSV and the figure."""
    keys = ["phase", "layers", "slots", "arm", "P"]
    cells = noise.summarise(rows, keys)
    contrasts = [noise.contrast(f"{p['phase']} {p['layers']} layers {p['slots']} slots: P=4 - control", rows,
                                dict(phase=p["phase"], layers=p["layers"], slots=p["slots"], arm="p4"),
                                dict(phase=p["phase"], layers=p["layers"], slots=p["slots"], arm="ctl"))
                 for p in result["point_table"]]
    noise.report(args, pre, "depth", keys, cells, rows, contrasts,
                 {k: v for k, v in result.items() if k not in ("preset", "experiment")})
    print("the points (means over seeds; gap = P=4 - P=1, paired by seed; stream_vs_p1: P=4's streams alone - P=1; "
          "ctl_kl: the control's kl, 0 while its streams are one):")
    print(runner.table(result["point_table"], list(result["point_table"][0])))
    for phase in ("explore", "confirm"):
        if result["readings"][phase]:
            print(f"every contrast on the {phase} seeds ('leans': beyond {noise.NOISE} nats, every seed agreeing):")
            print(runner.table(result["readings"][phase], ["claim", "at", "seeds", "mean", "min", "max", "reading"]))
    print(f"verdicts (confirmed / refuted: the confirmation seeds' mean beyond {noise.NOISE} nats and every one of "
          "them on the same side; the exploration seeds chose the claims and confirm nothing):")
    print(runner.table(result["verdicts"], ["claim", "at", "explore", "seeds", "mean", "min", "max", "verdict"]))
    for v in result["verdicts"]:
        print(f"  {v['claim']}: {v['hypothesis']}")
    print(f"P = 1's val loss over the last 20% of its steps moved {result['p1_last20']['mean']:+.4f} on average, "
          f"{result['p1_last20']['max']:+.4f} at most (positive: still falling); the control's largest kl between "
          f"its streams: {result['control_max_kl']:g}; wall time of this command: {result['wall_min']} min "
          f"(estimated {result['estimate_min']} min for the whole plan; runs already done take none)")
    folders = [(args.out_dir, "depth")] + ([(args.results, f"depth_{args.preset}")] if args.results else [])
    for folder, stem in folders:
        plots.plot_depth(rows, os.path.join(folder, f"{stem}.png"))


def get_args(argv=None):
    p = runner.parser("depth.py", __doc__)
    p.add_argument("--layers", type=runner.int_list, default=None, help="comma-separated depths; default: the "
                   "preset's depth_layers")
    p.add_argument("--slots", type=runner.int_list, default=None, help="comma-separated prefix slots; default: the "
                   "preset's depth_slots")
    p.add_argument("--depth_width", type=int, default=-1, help="n_embd of every run; -1 = the preset's")
    p.add_argument("--depth_iters", type=int, default=-1, help="steps per run; -1 = the preset's")
    p.add_argument("--claims", type=int, default=2, help=f"claims taken to the confirmation seeds, 0 to "
                   f"{len(CLAIMS)}")
    runner.add_phase_flags(p, 120, "claims", "grid points are cut")
    p.add_argument("--results", type=runner.absolute, default="",
                   help="a folder that also gets depth_<preset>.json, .csv and .png, e.g. results")
    args = runner.parse(p, argv)
    pre = runner.load_presets()[args.preset]
    if "depth_layers" not in pre:
        raise UserError(f"--preset={args.preset}: presets.json gives depth.py no grid for it (depth_*); use "
                        "--preset=cpu or --preset=tiny")
    if args.depth_width > 0 and args.depth_width % pre["n_head"]:
        raise UserError(f"--depth_width={args.depth_width}: must be a multiple of the preset's n_head "
                        f"({pre['n_head']})")
    runner.check_phases(args)
    if not 0 <= args.claims <= len(CLAIMS):
        raise UserError(f"--claims={args.claims}: must be 0 to {len(CLAIMS)}")
    return args


def main(argv=None):
    return runner.main(depth, get_args, argv, shown=lambda result: {k: v for k, v in result.items()
                                                                    if k not in ("readings", "point_table")})


if __name__ == "__main__":
    runner.entry(main)
