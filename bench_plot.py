"""
bench.py's figure (`python bench.py --plot=cost.png`): the memory and the decode-step latency that P streams and
width add over P = 1, against P, each latency with its 95% interval and the roofline's prediction beside it.
bench.py imports this module for --plot alone, so that the lesson runs without matplotlib.
"""

from matplotlib.figure import Figure  # the object-oriented API: no backend to choose, no import-time side effects


def plot_lesson(family, args, phases):
    """family: bench.py's models, each with memory_mb, latency and roofline filled in; phases: the phases timed
    (keys of bench.PHASES)."""
    fig = Figure(figsize=(10, 3.6), layout="constrained")
    ax_mem, ax_lat = fig.subplots(1, 2)
    for side, mark, name in (("parscale", "o", "ParScale (P streams)"), ("width", "s", "width (N_base(1 + k ln P))")):
        ms = [m for m in family if m["side"] == side]
        Ps = [m["P"] for m in ms]
        for i, (phase, line) in enumerate((("decode", "-"), ("long", ":"))):
            where = f"@{(args.prompt, args.long_context)[i]}"
            if ms[0]["memory_mb"][i] is not None:
                ax_mem.plot(Ps, [m["memory_mb"][i] for m in ms], line + mark, label=f"{name} {where}")
            if phase in phases:
                v = [[100 * x for x in m["latency"][phase]] for m in ms]  # (median, lo, hi) in percent
                ax_lat.errorbar(Ps, [a[0] for a in v], yerr=[[a[0] - a[1] for a in v], [a[2] - a[0] for a in v]],
                                fmt=line + mark, capsize=3, label=f"{name} {where}")
                ax_lat.plot(Ps, [100 * m["roofline"][phase] for m in ms], "x", color="gray")
    ax_lat.plot([], [], "x", color="gray", label="the roofline's prediction")
    for ax, title, unit in ((ax_mem, "peak memory increase over P=1 (one measurement each)", "MB"),
                            (ax_lat, "decode step increase over its own P=1, 95% interval", "%")):
        ax.set_xscale("log", base=2)
        ax.set(xlabel="P", ylabel=unit)
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(f"ParScale vs width, measured: {args.preset_name} preset, batch {args.batch}, {args.device_name}, "
                 f"{str(args.dtype)[6:]}", fontsize=10)
    fig.savefig(args.plot, dpi=120)
