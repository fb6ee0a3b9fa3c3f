"""bench.py: width matching against real parameter counts, the lesson's arithmetic on fixed numbers, and
every mode end to end at a toy shape."""
import dataclasses
import json
import math
import statistics

import pytest
import torch
from util import tiny_config

import bench
import measure
from common import UserError, param_report
from model import GPT, GPTConfig, KVCache


def last_json_line(out):
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.parametrize("cfg", [tiny_config(), tiny_config(n_kv_head=2), tiny_config(n_streams=4), tiny_config(bias=False)])
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
    # 0.3x and 6x walk the width down and far up from the base
    for target in [measure.equivalent_params(n_base, P, 0.39) for P in (1, 2, 4, 8)] + [0.3 * n_base, 6 * n_base]:
        cfg = measure.match_width(base, target)
        assert (cfg.n_layer, cfg.head_dim, cfg.n_streams, cfg.vocab_size) == (base.n_layer, base.head_dim, 1, base.vocab_size)
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
    fam = measure.model_family(tiny_config(n_embd=96, n_head=12, n_kv_head=2), [1, 2, 8], k=0.39)
    assert [(m["side"], m["P"]) for m in fam] == [("base", 1), ("parscale", 2), ("width", 2), ("parscale", 8), ("width", 8)]
    assert all(m["cfg"].n_kv_head == 2 for m in fam)
    n_base = fam[0]["non_embedding"]
    assert fam[4]["target"] == pytest.approx(n_base * (1 + 0.39 * torch.log(torch.tensor(8.0)).item()))
    assert fam[0]["cfg"].n_streams == 1 and fam[3]["cfg"].n_streams == 8


def test_fused_path_is_refused_when_unavailable():
    with pytest.raises(UserError, match="--paths=fused"):
        bench.parse_args(["--device=cpu", "--paths=fused"])


# -----------------------------------------------------------------------------
# bad flag values: one named UserError each, before anything is built
# (tests/test_cli.py checks that the command line turns these into `error: ...` and exit 1)

@pytest.mark.parametrize("flags, match", [
    (["--streams=-2"], r"--streams must list integers >= 1"),
    (["--n_embd=100"], r"--n_embd=100 must be a multiple of --n_head=16"),
    (["--n_layer=0"], r"--n_layer must be >= 1"),
    (["--repeats=0"], r"--repeats must be >= 1"),
    (["--n_prefix=0"], r"--n_prefix must be >= 1 when --streams has a P > 1"),
    (["--k=-0.1"], r"--k must be a finite number >= 0"),
    (["--threads=0"], r"--threads must be >= 1, or -1 for all cores"),
    (["--dtype=float16"], r"--dtype=float16 is for GPUs"),
    (["--device=tpu"], r"--device=tpu is not a device"),
    (["--device=meta"], r"--device=meta: bench.py runs on cpu, cuda"),
    (["--mode=step", "--plot=x.png"], r"--mode=step has none"),
    (["--batch=0"], r"--batch must be >= 1"),
    (["--steps=0"], r"--steps must be >= 1"),
    (["--long_context=0"], r"--long_context must be >= 1"),
    (["--n_kv_head=5"], r"--n_kv_head=5 must divide --n_head=16"),
    (["--plot=/no/such/folder/x.png"], r"--plot=.*: its folder does not exist"),
])
def test_bad_flag_values(flags, match, monkeypatch):
    monkeypatch.setattr(bench, "Figure", object)  # as if matplotlib were there: the other --plot checks still apply
    device = [] if any(f.startswith("--device") for f in flags) else ["--device=cpu"]
    with pytest.raises(UserError, match=match) as e:
        bench.parse_args(device + flags)
    assert "\n" not in str(e.value)


def test_plot_without_matplotlib_is_refused_up_front(monkeypatch):
    monkeypatch.setattr(bench, "Figure", None)
    with pytest.raises(UserError, match="--plot=cost.png needs matplotlib"):
        bench.parse_args(["--device=cpu", "--plot=cost.png"])


def test_the_research_modes_are_the_cost_sweeps(capsys):
    for mode in ("sweep", "train", "all"):  # experiments/cost_sweep.py's now (tests/test_cost_sweep.py)
        with pytest.raises(SystemExit):
            bench.parse_args(["--device=cpu", f"--mode={mode}"])
        assert f"invalid choice: '{mode}'" in capsys.readouterr().err


def test_list_flags_that_are_not_integers_are_argparse_errors(capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--device=cpu", "--streams=1,two"])
    assert "expected comma-separated integers such as 1,2,4, got '1,two'" in capsys.readouterr().err


# -----------------------------------------------------------------------------
# the lesson (the default run)

LESSON = ["--preset=tiny", "--streams=1,2", "--steps=2", "--repeats=3", "--long_context=40"]


def test_lesson_end_to_end_with_its_json_line(capsys):
    result = bench.main(["--device=cpu", *LESSON])
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) <= 26, "the lesson is one table of at most 25 lines, then the JSON line"
    assert last_json_line("\n".join(out))["ratios"] == json.loads(json.dumps(measure.rounded(result)))["ratios"]
    assert [m["label"] for m in result["models"]] == ["base", "P=2", "width~P2"]
    for m in result["models"]:
        assert len(m["prefill_s"]) == len(m["step_short_s"]) == len(m["step_long_s"]) == 3
        assert all(t > 0 for t in m["prefill_s"] + m["step_short_s"] + m["step_long_s"])
        assert m["peak_short"] is not None and m["peak_long"] >= m["peak_short"]  # each in its own process, RSS measured
        assert 0 < m["floor_short"] < 10 and m["kv_long_mb"] > m["kv_short_mb"]
    r = result["ratios"][0]
    assert r["P"] == 2 and {"memory_peak_short", "memory_counted_long", "step_short_s", "step_long_s", "total_s"} <= set(r)
    assert result["bandwidth"] > 0 and "GiB" in result["bandwidth_how"] and result["dtype_why"]
    assert any("filled directly" in line for line in out) and any("22x memory, 6x latency" in line for line in out)


def fake_family(times):
    """model_family at the tiny shape, each model with fixed 'measurements': times[label] = dict of runs."""
    base_cfg = GPTConfig(n_layer=2, n_embd=96, n_head=12, n_kv_head=2, vocab_size=512, n_prefix=4, block_size=64)
    family = measure.model_family(base_cfg, [1, 2], 0.39)
    for m in family:
        m.update(times[m["label"]])
    return family


def test_lesson_ratios_on_a_fixed_timing_table():
    args = bench.argparse.Namespace(dtype=torch.bfloat16, batch=1, prompt=16, long_context=40, steps=2, bandwidth=1e10)
    family = fake_family({
        "base": dict(prefill_s=[1.0, 1.2], step_short_s=[0.100, 0.120], step_long_s=[0.2, 0.2], peak_short=1000, peak_long=1001),
        # ParScale's runs, each paired with its own backbone's run in the same process
        "P=2": dict(prefill_s=[2.0, 2.2], step_short_s=[0.110, 0.125], step_long_s=[0.3, 0.3], peak_short=1010, peak_long=1011,
                    base_prefill_s=[1.0, 1.1], base_step_short_s=[0.100, 0.105], base_step_long_s=[0.2, 0.2]),
        "width~P2": dict(prefill_s=[1.5, 1.7], step_short_s=[0.160, 0.170], step_long_s=[0.2, 0.2], peak_short=1100, peak_long=1101),
    })
    (r,), pool = bench.lesson_rows(family, args)
    assert r["memory_peak_short"] == pytest.approx(10.0)  # (1100 - 1000) / (1010 - 1000)
    assert r["memory_peak_long"] == pytest.approx(10.0)
    # every P = 1 run of the session: the base's own two and the two ParScale ran beside its backbone
    assert pool["step_short_s"] == [0.100, 0.120, 0.100, 0.105]
    par = [0.010, 0.020]  # ParScale, paired run by run with its backbone
    wid = [w - b for w in (0.160, 0.170) for b in pool["step_short_s"]]  # width, against the whole pool
    med, lo, hi = r["step_short_s"]
    assert med == pytest.approx(statistics.median(wid) / statistics.median(par))
    assert lo == pytest.approx(min(wid) / max(par)) and hi == pytest.approx(max(wid) / min(par))
    assert r["step_long_s"] == (0.0, 0.0, 0.0)  # width adds nothing at the long context here
    assert r["prefill_s"][0] < 1  # ParScale's prefill costs more than width's
    # prefill + 64 steps, run by run
    par_total = [2.0 + 64 * 0.110 - (1.0 + 64 * 0.100), 2.2 + 64 * 0.125 - (1.1 + 64 * 0.105)]
    base_total = [1.0 + 64 * 0.100, 1.2 + 64 * 0.120, 1.0 + 64 * 0.100, 1.1 + 64 * 0.105]
    wid_total = [w - b for w in (1.5 + 64 * 0.160, 1.7 + 64 * 0.170) for b in base_total]
    assert r["total_s"][0] == pytest.approx(statistics.median(wid_total) / statistics.median(par_total))
    assert r["total_s"][1] == pytest.approx(min(wid_total) / max(par_total))
    assert family[1]["step_increase"] == pytest.approx(0.015 / 0.1025)  # +15 ms over the paired 102.5 ms
    n = measure.param_counts(family[0]["cfg"])
    assert family[0]["weights_mb"] == pytest.approx((n["embedding"] + n["non_embedding"]) * 2 / 2**20)


def test_ratio_spread_is_infinite_where_parscale_adds_nothing():
    assert bench.ratio_spread([1.0], [0.0]) == (math.inf, math.inf, math.inf)
    med, lo, hi = bench.ratio_spread([2.0, 1.8], [0.5, -0.1])
    assert med == pytest.approx(1.9 / 0.2) and lo == pytest.approx(1.8 / 0.5) and hi == math.inf


@pytest.mark.parametrize("P, kv, B", [(1, 4, 1), (4, 2, 3)])
def test_floor_counts_the_bytes_of_the_tensors_a_step_reads(P, kv, B):
    cfg = tiny_config(n_streams=P, n_kv_head=kv)
    model = GPT(cfg).to(torch.bfloat16)
    # every weight once: wte is the LM head (tied), wpe gives one row; the prefixes are parameters
    weights = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if n != "transformer.wpe.weight")
    cache = KVCache(model, B, max_len=20)
    assert measure.floor_bytes(cfg, measure.param_counts(cfg), B, 20, 2) == weights + cache.k.nbytes + cache.v.nbytes


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
    idx = torch.randint(cfg.vocab_size, (2, 8))
    with torch.no_grad():
        assert torch.isfinite(model(idx)[0]).all()


def test_read_bandwidth_reads_more_than_the_last_cache():
    bw, how = measure.read_bandwidth(torch.device("cpu"))
    llc = measure.last_cache_bytes(torch.device("cpu"))
    assert bw > 1e8 and "sums over" in how
    assert llc is None or f"{max(2**30, 4 * llc) / 2**30:.0f} GiB" in how


def test_step_mode_end_to_end(capsys):
    result = bench.main(["--device=cpu", "--mode=step", "--n_layer=1", "--n_embd=256", "--n_head=4", "--vocab_size=64",
                         "--n_prefix=4", "--steps=2", "--repeats=1"])
    out = capsys.readouterr().out
    assert [r["context"] for r in result["step"]] == [128, 960] and "targets:" in out
    for r in result["step"]:
        assert r["ratio_min"] <= r["ratio"] <= r["ratio_max"] and r["bytes_ratio"] > 1
        assert len(r["p1_ms"]) == len(r["p8_ms"]) == 2 and r["alloc_p8"] > 0
    layer_keys = 8 * 4 * 961 * 64 * 2  # P=8 rows x 4 kv heads x (960 + 1) slots x head_dim 64, bf16
    assert result["step"][1]["alloc_p8"] < layer_keys / 2, "a decode step allocated as much as a copy of the cache"
