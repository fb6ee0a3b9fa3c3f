"""bench.py: the pairing against a drifting clock, the ratio rule, the roofline, width matching against real parameter
counts, the card on fixed numbers, every flag check, and the lesson and --mode=step end to end at a toy shape."""
import dataclasses
import importlib.util
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch
from util import ROOT, tiny_config

import bench
import measure
from cli import UserError, resolved
from counts import param_report
from model import GPT, GPTConfig, KVCache


# -----------------------------------------------------------------------------
# pairs: a drifting machine must cancel out of each increase

class DriftingMachine:
    """A fake clock and two fake runs: the base costs 1, the model 1.12 (+12%), times the machine's slowness, which
    swings between 0.5x and 3x over some 50 runs (the 2-core CPU's P = 1 step moved between 269 and 546 ms)."""

    def __init__(self):
        self.now = 0.0

    def slowness(self):
        return 1.75 + 1.25 * math.sin(self.now / 16)

    def run(self, cost):
        self.now += cost * self.slowness()


def test_pairing_cancels_a_drifting_clock():
    m = DriftingMachine()
    base, model = measure.paired(lambda: m.run(1.0), lambda: m.run(1.12), seconds=600, clock=lambda: m.now)
    assert len(base) == len(model) >= measure.MIN_PAIRS and m.now >= 600  # pairs until the budget is spent
    med, lo, hi = measure.increase(base, model)
    assert med == pytest.approx(0.12, abs=0.01) and lo <= 0.12 <= hi and hi - lo < 0.04
    # the premise: unpaired, the drift swamps the increase (all P=1 runs first, then the model's)
    m = DriftingMachine()
    alone = [measure.timed(lambda c=c: m.run(c), reps=40, min_s=0, clock=lambda: m.now) for c in (1.0, 1.12)]
    assert abs(sum(alone[1]) / sum(alone[0]) - 1.12) > 0.1


def test_pairing_keeps_its_minimum_and_swaps_who_goes_first():
    order = []
    base, model = measure.paired(lambda: order.append("b"), lambda: order.append("m"), seconds=0)
    assert len(base) == len(model) == measure.MIN_PAIRS
    assert order[:6] == ["b", "m", "m", "b", "b", "m"]


def test_bootstrap_interval_holds_the_median_and_narrows_with_pairs():
    gen = torch.Generator().manual_seed(0)
    noisy = [1 + 0.1 * torch.randn(1, generator=gen).item() for _ in range(400)]
    few = measure.increase([1.0] * 16, noisy[:16])
    many = measure.increase([1.0] * 400, noisy)
    for med, lo, hi in (few, many):
        assert lo <= med <= hi
    assert many[2] - many[1] < few[2] - few[1] and many[1] < 0 < many[2]


# -----------------------------------------------------------------------------
# the ratio rule: a ratio only where ParScale's increase is resolved; never inf, never negative

def test_an_unresolved_increase_prints_a_bound_not_a_ratio():
    text, short = bench.ratio((0.004, -0.008, 0.012), (0.83, 0.80, 0.86))
    assert text == "ParScale's increase is within noise, below +1.2%: at least 67x" and short == ">=67x"
    text, short = bench.ratio((0.004, -0.008, 0.012), (0.005, -0.002, 0.01))  # no bound worth saying
    assert text == "ParScale's increase is within noise, below +1.2%" and short == "noise"
    assert bench.ratio((-0.06, -0.08, -0.04), (0.8, 0.7, 0.9)) == ("ParScale's increase is not above zero", "none")


def test_a_resolved_increase_prints_a_ratio_and_dearer_below_one():
    assert bench.ratio((0.12, 0.08, 0.15), (0.83, 0.80, 0.86)) == ("6.9x", "6.9x")
    assert bench.ratio((7.4, 7.0, 7.9), (1.05, 1.0, 1.1)) == ("ParScale dearer here", "dearer")
    assert bench.ratio((0.1, 0.05, 0.2), (-0.01, -0.03, 0.01))[1] == "dearer"  # a width decrease: never negative
    for par in [(0.0, -0.1, 0.1), (1e-9, 1e-10, 1e-8), (0.2, 0.1, 0.3), (-0.5, -0.6, -0.4)]:
        for wid in [(0.8, 0.7, 0.9), (-0.1, -0.2, 0.0), (0.0, 0.0, 0.0)]:
            text, short = bench.ratio(par, wid)
            assert "inf" not in text + short and "-" not in short and not text.startswith("-")


# -----------------------------------------------------------------------------
# the roofline: from a Linear's cost by rows and the bandwidth

def roof_args():
    """(flags, roofline) of a machine reading 10 GB/s whose Linear costs its weight read up to 8 rows and 3x that
    at 16 (bf16)."""
    read = 2 / 1e10
    return (bench.argparse.Namespace(batch=1, prompt=4, long_context=100),
            dict(per_weight={1: read / 2, 2: read, 4: read, 8: read, 16: 3 * read}, bandwidth=1e10, itemsize=2))


def test_roofline_predicts_free_streams_below_the_ridge_and_dear_ones_above():
    args, roof = roof_args()
    read = 2 / 1e10
    assert bench.weight_s(1, roof) == read and bench.weight_s(8, roof) == read  # reading dominates
    assert bench.weight_s(16, roof) == 3 * read and bench.weight_s(64, roof) == pytest.approx(12 * read)  # compute
    base = tiny_config(n_kv_head=2, block_size=128)
    p8, p16 = (dataclasses.replace(base, n_streams=P) for P in (8, 16))
    step = {c.n_streams: bench.predicted_s(c, args, roof, "decode") for c in (base, p8, p16)}
    kv = {c.n_streams: measure.kv_bytes(c, 1, 4, 2) / 1e10 for c in (base, p8, p16)}
    n = {c.n_streams: measure.param_counts(c)["non_embedding"] for c in (base, p8, p16)}
    head = base.vocab_size * base.n_embd * read
    assert step[8] == pytest.approx(n[8] * read + head + kv[8])  # P=8: still the weights' read
    assert step[16] == pytest.approx(n[16] * 3 * read + head + kv[16])  # P=16: past the ridge
    assert bench.predicted_s(p8, args, roof, "prefill") == pytest.approx(n[8] * bench.weight_s(32, roof) + head + kv[8])


def test_kv_bytes_is_the_caches_size():
    for cfg, B in [(tiny_config(), 1), (tiny_config(n_streams=4, n_kv_head=2), 3)]:
        cache = KVCache(GPT(cfg).to(torch.bfloat16), B, max_len=20)
        assert measure.kv_bytes(cfg, B, 20, 2) == cache.k.nbytes + cache.v.nbytes


# -----------------------------------------------------------------------------
# width matching against real parameter counts

@pytest.mark.parametrize("cfg", [tiny_config(), tiny_config(n_kv_head=2), tiny_config(n_streams=4),
                                 tiny_config(bias=False)])
def test_param_counts_are_a_real_models(cfg):
    assert measure.param_counts(cfg) == param_report(GPT(cfg))


@pytest.mark.parametrize("n_kv_head", [None, 2])
def test_match_width(n_kv_head):
    base = tiny_config(n_embd=64, n_head=8, n_kv_head=n_kv_head)  # head_dim 8
    mha = n_kv_head is None
    step = 1 if mha else 2
    n_base = measure.param_counts(base)["backbone"]

    def error(cfg, target):
        return abs(measure.param_counts(cfg)["non_embedding"] - target)

    widths = []
    # 0.3x and 6x: a target far below the base and far above it
    for target in [n_base * (1 + 0.39 * math.log(P)) for P in (1, 2, 4, 8)] + [0.3 * n_base, 6 * n_base]:
        cfg = measure.match_width(base, target)
        assert (cfg.n_layer, cfg.head_dim, cfg.n_streams) == (base.n_layer, base.head_dim, 1)
        assert cfg.vocab_size == base.vocab_size
        assert cfg.n_head % cfg.n_kv_head == 0 and cfg.n_kv_head == (cfg.n_head if mha else 2)  # GQA stays valid
        for h in (cfg.n_head - step, cfg.n_head + step):  # within rounding: no neighbouring width is closer
            if h >= step:
                other = dataclasses.replace(cfg, n_head=h, n_embd=h * base.head_dim, n_kv_head=h if mha else 2)
                assert error(cfg, target) <= error(other, target), (h, cfg.n_head)
        widths.append(cfg.n_embd)
    assert widths[0] == base.n_embd  # P=1 is the base itself
    assert widths[:4] == sorted(widths[:4])  # monotone in P
    assert widths[4] < base.n_embd < widths[5]


def test_family_pairs_every_p_with_a_width_model():
    fam = measure.model_family(tiny_config(n_embd=96, n_head=12, n_kv_head=2), [1, 2, 8], law_k=0.39)
    assert [(m["side"], m["P"]) for m in fam] == [("base", 1), ("parscale", 2), ("width", 2), ("parscale", 8),
                                                  ("width", 8)]
    assert all(m["cfg"].n_kv_head == 2 for m in fam)
    n_base = fam[0]["non_embedding"]
    assert fam[4]["target"] == fam[3]["target"] == pytest.approx(n_base * (1 + 0.39 * math.log(8)))
    assert fam[0]["cfg"].n_streams == 1 and fam[3]["cfg"].n_streams == 8


def test_built_models_are_cheap_tied_finite_and_in_their_dtype():
    cfg = tiny_config(n_streams=2, n_kv_head=2)
    model = measure.build_model(cfg, torch.device("cpu"), torch.bfloat16, seed=3)
    assert model.lm_head.weight is model.transformer.wte.weight
    for name, p in model.named_parameters():
        assert p.dtype == torch.bfloat16 and torch.isfinite(p).all(), name
        nonzero = p[p != 0].float().abs()
        assert nonzero.numel() == 0 or nonzero.min() >= torch.finfo(torch.bfloat16).tiny, f"{name}: subnormal"
    assert torch.equal(model.transformer.h[0].ln_1.weight, torch.ones(cfg.n_embd, dtype=torch.bfloat16))
    assert model.transformer.h[0].attn.c_attn.weight.float().std().item() == pytest.approx(0.02, rel=0.1)
    again = measure.build_model(cfg, torch.device("cpu"), torch.bfloat16, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(cfg.vocab_size, (2, 8)))[0]).all()


def test_read_bandwidth_is_a_rate():
    assert 1e8 < measure.read_bandwidth(torch.device("cpu")) < 1e13


# -----------------------------------------------------------------------------
# the card and the summary on fixed numbers: the full family of P = 1, 2, 4, 8

def fixed_lesson(phases=3):
    """The paper preset's family with made-up measurements, summarised as bench.lesson does: every model 100 MB per P
    above the base; width's steps and prefill 40% dearer; ParScale's step within noise of its P=1, its prefill P
    times."""
    args = resolved(bench.parse_args(["--device=cpu", "--budget=0"]), dtype=torch.bfloat16,  # the longest texts met
                    dtype_why="bf16, as fp32 needs 22 GB; an 8-row 2048x2048 Linear: 1.88 ms in bf16, 0.92 ms in fp32",
                    device_name="AMD EPYC 9R14 96-Core Processor")
    roof = dict(shape=[8192, 2048], per_weight={r: 6e-11 * max(1, r / 64) for r in (1, 2, 4, 8, 16, 32, 64, 128)},
                peak_flops=2e12, ridge=67, bandwidth=3e10, itemsize=2)
    phases, need = list(bench.PHASES)[:phases], {ph: 999.0 for ph in bench.PHASES}
    cfg = GPTConfig(n_layer=36, n_embd=2048, n_head=16, n_kv_head=2, vocab_size=151936, n_prefix=48, block_size=1001)
    family = measure.model_family(cfg, [1, 2, 4, 8], 0.39)
    base = [0.20, 0.21, 0.22] * 7
    for m in family:
        m["peak"] = [3.7e9 + (m["P"] - 1) * 1e8 * (1 + 9 * (m["side"] == "width"))] * 2
        for ph in phases:
            scale = {"base": 1, "width": 1.4, "parscale": m["P"] if ph == "prefill" else 1}[m["side"]]
            model = [scale * t for t in (base if m["side"] == "width" or ph == "prefill" else base[::-1])]
            m[ph] = (base, model)  # ParScale's steps: +10%, 0 and -9% in turn
    return family, bench.summarise(family, args, roof, phases), (args, roof, need, phases)


@pytest.mark.parametrize("phases", [3, 2, 1])
def test_the_card_fits_and_never_prints_inf(phases):
    family, ratios, run = fixed_lesson(phases)
    lines = bench.card(family, ratios, *run)
    assert len(lines) <= 24 and max(map(len, lines)) <= 120, "\n".join(lines)
    text = " ".join(line.strip() for line in lines)
    assert not re.search(r"\binf\b|-\d[\d.]*x", text) and "memory: P=2 10.0x, P=4 10.0x, P=8 10.0x (paper 22x)" in text
    assert "P=8 decode step @64: ParScale's increase is within noise, below +10.0%: at least 4x (paper 6x)" in text
    assert ("prefill 64 tokens not timed (16 pairs: ~999 s)" in text) == (phases < 3)
    assert ("in the prefill (dearer: ParScale +700%)" in text) == (phases == 3)
    assert ("decode step @1000 not timed" in text) == (phases < 2) and ("latency not timed" in text) == (phases < 2)
    result = dict(preset="paper", device="CPU", dtype="bfloat16", batch=1, ratios=ratios,
                  models=[{k: v for k, v in m.items() if k != "cfg"} for m in family])
    summary = json.loads(bench.summary(result))
    assert len(bench.summary(result)) <= 1000 - 40 and {"memory", "latency", "ratio"} <= set(summary)  # 40: a long name
    assert summary["ratio"]["8"]["decode"].startswith(">=") and summary["memory"]["P=8"] == [round(7e8 / 2**20)] * 2
    assert summary["latency"]["width~P8"]["decode"] == [40, 40, 40] and summary["latency"]["P=8"]["decode"][0] == 0.0


def test_nearly_free_is_the_most_rows_within_ten_percent_and_survives_one_noisy_point():
    family, ratios, (args, roof, need, phases) = fixed_lesson()
    assert "nearly free here up to P=64 at batch 1: a 64-row Linear costs what reading its weights costs" in " ".join(
        line.strip() for line in bench.card(family, ratios, args, roof, need, phases))
    roof["per_weight"][2] *= 3  # a scheduler stall at 2 rows
    roof["per_weight"] = {r: s * (1 if r < 16 else 5) for r, s in roof["per_weight"].items()}  # compute
    text = " ".join(line.strip() for line in bench.card(family, ratios, args, roof, need, phases))
    assert "up to P=8 at batch 1: a 8-row Linear" in text and "a 16-row one, 4.5x" in text  # 5 x 6e-11 / (2 / 3e10)


# -----------------------------------------------------------------------------
# bad flag values: one named UserError each, before anything is built
# (tests/test_cli.py checks that the command line turns these into `error: ...` and exit 1)

@pytest.mark.parametrize("flags, match", [
    (["--streams=1,2"], r"--streams is now --stream_counts \(the P values; --streams is a file\)"),
    (["--stream_counts=1"], r"--stream_counts must list a P > 1"),
    (["--n_embd=100"], r"n_embd \(100\) must be divisible by n_head \(16\)"),
    (["--n_layer=0"], r"n_layer must be a positive integer"),
    (["--n_prefix=0"], r"n_prefix must be >= 1 at n_streams="),
    (["--n_kv_head=5"], r"n_kv_head \(5\) must divide n_head \(16\)"),
    (["--law_k=-0.1"], r"--law_k must be >= 0"),
    (["--law_k=nan"], r"--law_k must be >= 0"),
    (["--k=0.3"], r"--k is now --law_k \(the scaling law's k\)"),
    (["--budget=-1"], r"--budget must be >= 0"),
    (["--batch=0"], r"--batch must be >= 1"),
    (["--long_context=0"], r"--long_context must be >= 1"),
    (["--dtype=float16"], r"--dtype=float16 is for GPUs"),
    (["--device=tpu"], r"--device=tpu is not a device"),
    (["--device=meta"], r"--device=meta: bench.py runs on cpu, cuda"),
    (["--mode=step", "--plot=x.png"], r"--mode=step has no figure"),
    (["--plot=/no/such/folder/x.png"], r"--plot=.*: its folder does not exist"),
    (["--json=/no/such/folder/x.json"], r"--json=.*: its folder does not exist"),
])
def test_bad_flag_values(flags, match):
    device = [] if any(f.startswith("--device") for f in flags) else ["--device=cpu"]
    with pytest.raises(UserError, match=match) as e:
        bench.parse_args(device + flags)
    assert "\n" not in str(e.value)


def test_plot_without_matplotlib_is_refused_up_front(monkeypatch):
    find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else find(name, *a))
    with pytest.raises(UserError, match="--plot=cost.png: it needs matplotlib"):
        bench.parse_args(["--device=cpu", "--plot=cost.png"])


def test_the_research_modes_are_the_cost_sweeps():
    for mode in ("sweep", "train", "all"):  # experiments/cost_sweep.py's now (tests/test_cost_sweep.py)
        with pytest.raises(UserError, match=f"invalid choice: '{mode}'"):
            bench.parse_args(["--device=cpu", f"--mode={mode}"])


@pytest.mark.parametrize("value, why", [("1,two", "expected comma-separated positive integers"),
                                        ("-2", "expected comma-separated positive integers"),
                                        ("1,1", "a value is repeated")])
def test_list_flags_that_are_not_positive_integers_are_refused(value, why):
    with pytest.raises(UserError, match=f"--stream_counts: {value}: {why}"):
        bench.parse_args(["--device=cpu", f"--stream_counts={value}"])


def test_fused_path_is_refused_when_unavailable():
    with pytest.raises(UserError, match="--paths=fused"):
        bench.parse_args(["--device=cpu", "--paths=fused"])


def test_memory_turns_the_dtype_bf16_or_names_a_smaller_preset(monkeypatch):
    args = resolved(bench.parse_args(["--device=cpu"]), dtype=torch.float32,
                    dtype_why="fp32, measured: an 8-row 2048x2048 Linear: 1.88 ms in bf16, 0.92 ms in fp32")
    cfg = GPTConfig(n_layer=36, n_embd=2048, n_head=16, n_kv_head=2, vocab_size=151936, n_prefix=48)
    family = measure.model_family(cfg, [1, 8], 0.39)
    monkeypatch.setattr(bench, "proc_value", lambda path, key: "100000000 kB")  # ~100 GB free
    fitted = bench.memory_fit(family, args)
    assert fitted.dtype == torch.bfloat16
    assert fitted.dtype_why == "bf16, as fp32 needs 22 GB; an 8-row 2048x2048 Linear: 1.88 ms in bf16, 0.92 ms in fp32"
    assert args.dtype == torch.float32, "the flags the user gave stay as they were"
    monkeypatch.setattr(bench, "proc_value", lambda path, key: "4000000 kB")  # ~4 GB free
    with pytest.raises(UserError, match=r"the paper preset needs ~11.\d GB of free memory, this machine has 4.1 GB "
                                        r"available: try --preset=gpt2"):
        bench.memory_fit(family, fitted)


# -----------------------------------------------------------------------------
# end to end at a toy shape: the lesson's command line once, every assertion on that one run

@pytest.fixture(scope="module")
def lesson_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lesson")
    plot = [f"--plot={tmp / 'cost.png'}"] if importlib.util.find_spec("matplotlib") else []
    flags = ["--device=cpu", "--preset=tiny", "--stream_counts=1,2", "--budget=0", f"--json={tmp / 'all.json'}", *plot]
    out = subprocess.run([sys.executable, "bench.py", *flags], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": ROOT})
    assert out.returncode == 0, out.stderr[-3000:]
    with open(tmp / "all.json") as f:
        return out, json.load(f), tmp, bool(plot)


def test_lesson_prints_a_card_then_one_short_json_line(lesson_run):
    out, _, _, _ = lesson_run
    lines = out.stdout.strip().splitlines()
    assert len(lines) <= 25 and max(map(len, lines[:-1])) <= 120, out.stdout  # at most 24, then the JSON line
    assert all(line.startswith("[bench]") for line in out.stderr.strip().splitlines()), out.stderr
    summary = json.loads(lines[-1])
    assert len(lines[-1]) <= 1000 and {"memory", "latency", "ratio"} <= set(summary)
    assert not re.search(r"\binf\b", out.stdout) and "USDT" not in out.stdout + out.stderr
    assert any("ridge point" in line for line in lines) and any("free here" in line for line in lines)


def test_lesson_pairs_every_increase_and_writes_everything(lesson_run):
    _, result, tmp, plotted = lesson_run
    assert [m["label"] for m in result["models"]] == ["P=1", "P=2", "width~P2"]
    for m in result["models"][1:]:
        for ph in result["phases"]:
            base, model = m[ph]
            assert len(base) == len(model) >= measure.MIN_PAIRS and min(base + model) > 0
            med, lo, hi = m["latency"][ph]
            assert lo <= med <= hi
    base = result["models"][0]
    assert 0 < base["peak"][0] <= base["peak"][1]  # in its own process, above the torch runtime
    assert result["roofline"]["ridge"] > 0 and result["roofline"]["bandwidth"] > 0
    assert result["flags"]["stream_counts"] == [1, 2]
    assert result["device"] and result["dtype_why"] and result["elapsed_s"] > 0
    assert (tmp / "cost.png").exists() == plotted


def test_step_mode_end_to_end(capfd):
    result = bench.main(["--device=cpu", "--mode=step", "--n_layer=1", "--n_embd=256", "--n_head=4", "--vocab_size=64",
                         "--n_prefix=4", "--budget=0"])
    out, err = capfd.readouterr()
    assert [r["context"] for r in result["step"]] == [128, 960] and "targets:" in out
    assert "USDT" not in out + err and "profiler" not in out + err  # the allocation count's own output is silenced
    for r in result["step"]:
        assert r["ratio_lo"] <= r["ratio"] <= r["ratio_hi"] and r["bytes_ratio"] > 1
        assert len(r["p1_ms"]) == len(r["p8_ms"]) == measure.MIN_PAIRS and r["alloc_p8"] > 0
    layer_keys = 8 * 4 * 961 * 64 * 2  # P=8 rows x 4 kv heads x (960 + 1) slots x head_dim 64, bf16
    assert result["step"][1]["alloc_p8"] < layer_keys / 2, "a decode step allocated as much as a copy of the cache"
