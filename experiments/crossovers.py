"""
The cost sweep's verdicts, from its rows alone (pure arithmetic and printing, no measuring): for every P > 1,
batch and context, width scaling's cost increase over P = 1 divided by ParScale's (> 1: ParScale is
cheaper), where along context and along batch ParScale stops winning, and the cell nearest the paper's
headline (arXiv 2505.10475, section 3.3, Figure 4: 22x memory and 6x latency, batch 1).

A row is one measurement of experiments/cost_sweep.py: attn, path, side (base / parscale / width), P, batch,
context, mem_mb and ms. args needs paths, stream_counts, batches, contexts, l_out and device_name.
"""


def increase_ratio(width_inc, parscale_inc):
    """Width scaling's cost increase over ParScale's; None when ParScale adds nothing measurable."""
    return width_inc / parscale_inc if parscale_inc > 0 else None


def crossover(xs, margins):
    """
    Where ParScale stops winning along xs (contexts or batch sizes), margins[i] = width's cost -
    ParScale's at xs[i] (> 0: ParScale cheaper). Returns (status, x): 'wins throughout',
    'loses throughout', or 'stops winning' at x interpolated linearly between the two points
    around the first sign change.
    """
    if margins[0] <= 0:
        return "loses throughout", None
    for i in range(1, len(xs)):
        if margins[i] <= 0:
            x0, x1, m0, m1 = xs[i - 1], xs[i], margins[i - 1], margins[i]
            return "stops winning", x0 + (x1 - x0) * m0 / (m0 - m1)
    return "wins throughout", None


def summarise(rows, args):
    """Headline ratios for every P > 1, batch and context; crossovers along context and along batch."""
    at = {(r["attn"], r["path"], r["side"], r["P"], r["batch"], r["context"]): r for r in rows}
    metrics = {"memory": "mem_mb", "latency": "ms"}
    headline, crossovers = [], []
    kinds = list(dict.fromkeys(r["attn"] for r in rows))  # in sweep order
    for path in args.paths:
        for kind in kinds:
            for P in sorted(set(args.stream_counts) - {1}):
                margins = {}  # (metric, batch, context) -> width cost - ParScale cost
                for B in args.batches:
                    for ctx in args.contexts:
                        base, par, wid = (at.get((kind, path, side, p, B, ctx)) for side, p in
                                          (("base", 1), ("parscale", P), ("width", P)))
                        if base is None or par is None or wid is None:
                            continue
                        h = dict(attn=kind, path=path, P=P, batch=B, context=ctx)
                        for name, key in metrics.items():
                            pi, wi = par[key] - base[key], wid[key] - base[key]
                            h[f"{name}_increase_parscale"], h[f"{name}_increase_width"] = pi, wi
                            h[f"{name}_ratio"] = increase_ratio(wi, pi)
                            margins[name, B, ctx] = wi - pi
                        headline.append(h)
                for name in metrics:
                    for B in args.batches:
                        xs = [c for c in args.contexts if (name, B, c) in margins]
                        if xs:
                            status, x = crossover(xs, [margins[name, B, c] for c in xs])
                            crossovers.append(dict(attn=kind, path=path, metric=name, P=P, along="context", batch=B,
                                                   status=status, at=x))
                    for ctx in args.contexts:
                        xs = [b for b in args.batches if (name, b, ctx) in margins]
                        if xs:
                            status, x = crossover(xs, [margins[name, b, ctx] for b in xs])
                            crossovers.append(dict(attn=kind, path=path, metric=name, P=P, along="batch", context=ctx,
                                                   status=status, at=x))
    return headline, crossovers


def format_ratio(ratio, width_inc):
    """A ratio for the table: "22.0x", "inf" where only width adds cost, "n/a" where neither does."""
    if ratio is None:
        return "inf" if width_inc > 0 else "n/a"  # ParScale adds nothing: infinitely cheaper, or both flat
    return f"{ratio:.1f}x"


def print_summary(headline, crossovers, args):
    print("\nheadline: width scaling's cost increase / ParScale's (> 1: ParScale cheaper); "
          "increase = cost(model) - cost(P=1 base); cells are memory ratio, latency ratio")
    groups = {}
    for h in headline:
        groups.setdefault((h["attn"], h["path"]), []).append(h)
    for (kind, path), hs in groups.items():
        print(f"\n{kind}, {path}")
        print(" P  B | " + " | ".join(f"{f'ctx {c}':^17}" for c in args.contexts))
        for P in sorted({h["P"] for h in hs}):
            for B in args.batches:
                cells = {h["context"]: h for h in hs if h["P"] == P and h["batch"] == B}
                if not cells:
                    continue
                line = " | ".join(
                    f"{format_ratio(cells[c]['memory_ratio'], cells[c]['memory_increase_width']):>8} "
                    f"{format_ratio(cells[c]['latency_ratio'], cells[c]['latency_increase_width']):>8}"
                    if c in cells else f"{'-':^17}" for c in args.contexts)
                print(f"{P:2d} {B:2d} | {line}")
    print("\ncrossovers: where ParScale stops being cheaper than width scaling "
          "(linear interpolation between measured points)")
    lines = {}
    for c in crossovers:
        where = f"B={c['batch']}" if c["along"] == "context" else f"ctx={c['context']}"
        axis = "ctx" if c["along"] == "context" else "B"
        what = c["status"] if c["at"] is None else f"stops near {axis} {c['at']:.3g}"
        lines.setdefault((c["attn"], c["path"], c["metric"], c["P"], c["along"]), []).append(f"{where}: {what}")
    for (kind, path, metric, P, along), parts in lines.items():
        print(f"{kind:5} {path:5} {metric:7} P={P} along {along:7}: " + " | ".join(parts))


def paper_comparison(headline, args):
    """The cell closest to the paper's headline: GQA, largest P, batch 1, shortest context, fastest path."""
    gqa = [h for h in headline if h["attn"].startswith("GQA") and h["path"] == args.paths[0]]
    if not gqa:
        return None
    P = max(h["P"] for h in gqa)
    h = min((h for h in gqa if h["P"] == P), key=lambda h: (h["batch"], h["context"]))
    print("\npaper (A100, analytic, 1.6B backbone, GQA, P=8, batch 1, L_in/L_out 64..512): 22x memory, 6x latency")
    print(f"here  ({args.device_name}, measured, {h['attn']}, P={P}, batch {h['batch']}, context {h['context']}, "
          f"{args.l_out} out, {h['path']}): {format_ratio(h['memory_ratio'], h['memory_increase_width'])} memory, "
          f"{format_ratio(h['latency_ratio'], h['latency_increase_width'])} latency")
    return h
