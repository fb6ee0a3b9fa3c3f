"""bench.py: width matching against real parameter counts, the lesson's arithmetic on fixed numbers, and
every mode end to end at a toy shape."""
import dataclasses
import json
import math
import statistics

import pytest
import torch
from util import HAS_CUDA, tiny_config

import bench
from common import UserError
from model import GPT, GPTConfig, KVCache

# one layer, a handful of tokens: the whole sweep runs in about a second on CPU
TOY = ["--mode=sweep", "--n_layer=1", "--n_embd=32", "--n_head=4", "--vocab_size=64", "--n_prefix=2", "--streams=1,2",
       "--batches=1,2", "--contexts=4,8", "--l_out=2", "--repeats=1"]


def last_json_line(out):
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.parametrize("cfg", [tiny_config(), tiny_config(n_kv_head=2), tiny_config(n_streams=4), tiny_config(bias=False)])
def test_param_counts_are_a_real_models(cfg):
    assert bench.param_counts(cfg) == GPT(cfg).param_report()


@pytest.mark.parametrize("n_kv_head", [None, 2])
def test_match_width(n_kv_head):
    base = tiny_config(n_embd=64, n_head=8, n_kv_head=n_kv_head)  # head_dim 8
    mha = n_kv_head is None
    step = 1 if mha else 2
    n_base = bench.param_counts(base)["backbone"]

    def error(cfg, target):
        return abs(bench.param_counts(cfg)["non_embedding"] - target)

    widths = []
    # 0.3x and 6x walk the width down and far up from the base
    for target in [bench.equivalent_params(n_base, P, 0.39) for P in (1, 2, 4, 8)] + [0.3 * n_base, 6 * n_base]:
        cfg = bench.match_width(base, target)
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
    fam = bench.model_family(tiny_config(n_embd=96, n_head=12, n_kv_head=2), [1, 2, 8], k=0.39)
    assert [(m["side"], m["P"]) for m in fam] == [("base", 1), ("parscale", 2), ("width", 2), ("parscale", 8), ("width", 8)]
    assert all(m["cfg"].n_kv_head == 2 for m in fam)
    n_base = fam[0]["non_embedding"]
    assert fam[4]["target"] == pytest.approx(n_base * (1 + 0.39 * torch.log(torch.tensor(8.0)).item()))
    assert fam[0]["cfg"].n_streams == 1 and fam[3]["cfg"].n_streams == 8


def test_crossover():
    assert bench.crossover([128, 512, 1024], [3.0, 1.0, -1.0]) == ("stops winning", 768.0)
    assert bench.crossover([1, 2, 4], [1.0, 2.0, 0.5]) == ("wins throughout", None)
    assert bench.crossover([1, 2], [0.0, 2.0]) == ("loses throughout", None)
    assert bench.increase_ratio(22.0, 1.0) == 22.0 and bench.increase_ratio(5.0, 0.0) is None


def test_decode_sweep_end_to_end(capsys, tmp_path):
    png = tmp_path / "cost.png"
    plot = [f"--plot={png}"] if bench.Figure is not None else []  # without matplotlib --plot is refused up front
    result = bench.main(["--device=cpu", *TOY, *plot])
    out = capsys.readouterr().out
    assert last_json_line(out)["headline"] == json.loads(json.dumps(bench.rounded(result)))["headline"]
    assert "decode paths: eager" in out and result["paths"] == ["eager"]  # CPU: said, not silent
    assert png.exists() == bool(plot)
    for key in ("models", "results", "headline", "crossovers", "paper_cell", "notes", "elapsed_s"):
        assert key in result, key
    assert not result["notes"]
    rows = result["results"]
    assert len(rows) == 2 * 3 * 2 * 2  # attention kinds x models x contexts x batches
    for r in rows:
        assert r["mem_mb"] > 0 and r["weights_mb"] > 0 and r["state_mb"] > 0
        assert 0 < r["ms_min"] <= r["ms"] <= r["ms_max"] and r["prefill_ms"] > 0 and r["ms_per_token"] > 0
    at = {(r["attn"], r["side"], r["batch"], r["context"]): r for r in rows}
    for kind in ("MHA", "GQA2"):  # two streams and their prefix need a bigger KV cache than one stream
        assert at[kind, "parscale", 2, 8]["state_mb"] > at[kind, "base", 2, 8]["state_mb"]
    assert len(result["headline"]) == 2 * 1 * 2 * 2  # kinds x (P > 1) x batches x contexts
    for h in result["headline"]:
        assert {"memory_ratio", "latency_ratio", "memory_increase_parscale", "latency_increase_width"} <= set(h)
    assert {c["along"] for c in result["crossovers"]} == {"context", "batch"}


def test_two_paths_are_kept_apart(monkeypatch, capsys):
    # a stand-in for kernels.fused (the eager decoder under the fused name) exercises the two-path sweep on CPU
    monkeypatch.setattr(bench, "fused_decoder_for", lambda model, B, dtype, n: (bench.EagerDecoder(model, B), "stand-in"))
    monkeypatch.setattr(bench, "fused_status", lambda device: (True, "test stand-in"), raising=False)
    result = bench.main(["--device=cpu", *TOY, "--kv_heads=2", "--contexts=8"])
    assert result["paths"] == ["fused", "eager"] and "test stand-in" in capsys.readouterr().out
    assert {(r["path"], r["side"]) for r in result["results"]} == {(p, s) for p in ("fused", "eager") for s in ("base", "parscale", "width")}
    assert {h["path"] for h in result["headline"]} == {"fused", "eager"} and result["paper_cell"]["path"] == "fused"


def test_a_refused_model_is_measured_on_the_eager_path_only(monkeypatch, capsys):
    why = "fused decode disagrees with model.py by 1.3 at step 2"
    monkeypatch.setattr(bench, "fused_decoder_for", lambda model, B, dtype, n: (None, why))
    monkeypatch.setattr(bench, "fused_status", lambda device: (True, "test stand-in"), raising=False)
    result = bench.main(["--device=cpu", *TOY, "--kv_heads=2", "--contexts=8"])
    assert {r["path"] for r in result["results"]} == {"eager"}
    assert any(why in n and "eager path only" in n for n in result["notes"]) and why in capsys.readouterr().out


def test_time_limit_skips_loudly(capsys):
    result = bench.main(["--device=cpu", *TOY, "--time_limit=1e-9"])
    assert result["results"] == [] and "TIME LIMIT" in result["notes"][0]
    assert "TIME LIMIT" in capsys.readouterr().out


def test_fused_path_is_refused_when_unavailable():
    with pytest.raises(UserError, match="--paths=fused"):
        bench.parse_args(["--device=cpu", "--paths=fused"])


def test_train_mode(capsys):
    # a stated peak: MFU is model.GPT.estimate_mfu's (without one it is n/a on CPU, see below)
    result = bench.main(["--device=cpu", *TOY, "--mode=train", "--kv_heads=0", "--train_batch=2", "--train_seq=8",
                         "--train_steps=1", "--peak_flops=1e12"])
    out = capsys.readouterr().out
    assert last_json_line(out)["mode"] == "train" and "1 TFLOP/s (--peak_flops)" in out
    assert [t["P"] for t in result["train"]] == [1, 2] and result["peak_flops"] == 1e12
    for t in result["train"]:
        assert t["tokens_per_s"] > 0 and t["step_ms"] > 0 and t["flops_per_s"] > 0
        assert t["mfu"] == pytest.approx(t["flops_per_s"] / 1e12)


def test_peak_flops_comes_from_model_py():
    assert bench.parse_args(["--device=cpu"]).peak_flops is None  # no datasheet peak for a CPU: MFU n/a
    assert bench.parse_args(["--device=cpu", "--peak_flops=5e12"]).peak_flops == 5e12
    assert not hasattr(bench, "H200_BF16_FLOPS")  # one table, common.PEAK_FLOPS


# -----------------------------------------------------------------------------
# bad flag values: one named UserError each, before anything is built
# (tests/test_cli.py checks that the command line turns these into `error: ...` and exit 1)

@pytest.mark.parametrize("flags, match", [
    (["--batches=1,0"], r"--batches must list integers >= 1"),
    (["--contexts="], r"--contexts must list integers >= 1"),
    (["--streams=-2"], r"--streams must list integers >= 1"),
    (["--kv_heads=-1"], r"--kv_heads must list integers >= 0"),
    (["--kv_heads=5"], r"--kv_heads=5 must divide --n_head=16"),
    (["--n_embd=100"], r"--n_embd=100 must be a multiple of --n_head=16"),
    (["--n_layer=0"], r"--n_layer must be >= 1"),
    (["--l_out=0"], r"--l_out must be >= 1"),
    (["--repeats=0"], r"--repeats must be >= 1"),
    (["--train_steps=0"], r"--train_steps must be >= 1"),
    (["--n_prefix=0"], r"--n_prefix must be >= 1 when --streams has a P > 1"),
    (["--k=-0.1"], r"--k must be a finite number >= 0"),
    (["--time_limit=0"], r"--time_limit must be .* > 0, or -1"),
    (["--threads=0"], r"--threads must be >= 1, or -1 for all cores"),
    (["--peak_flops=0"], r"--peak_flops must be a positive number of FLOP/s, or -1"),
    (["--peak_bw=0"], r"--peak_bw must be a positive number of bytes/s"),
    (["--dtype=float16"], r"--dtype=float16 is for GPUs"),
    (["--device=tpu"], r"--device=tpu is not a device"),
    (["--device=meta"], r"--device=meta: bench.py runs on cpu, cuda"),
    (["--mode=train", "--plot=x.png"], r"--plot draws the lesson's or the sweep's cost figure; --mode=train has none"),
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


def test_list_flags_that_are_not_integers_are_argparse_errors(capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--device=cpu", "--batches=1,two"])
    assert "expected comma-separated integers such as 1,2,4, got '1,two'" in capsys.readouterr().err


@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU")
def test_decode_sweep_on_gpu():
    # head_dim 32: the smallest the fused kernels take
    result = bench.main(["--device=cuda", "--n_layer=1", "--n_embd=128", "--n_head=4", "--vocab_size=64", "--n_prefix=2",
                         "--streams=1,2", "--batches=1,2", "--contexts=4,8", "--l_out=3", "--repeats=1"])
    assert not result["notes"], result["notes"]
    assert {r["path"] for r in result["results"]} == set(result["paths"])
    assert all(r["peak_mb"] >= r["weights_mb"] > 0 and r["roofline"] > 0 for r in result["results"])


# -----------------------------------------------------------------------------
# the lesson (the default run)

LESSON = ["--preset=tiny", "--streams=1,2", "--steps=2", "--repeats=3", "--long_context=40"]


def test_lesson_end_to_end_with_its_json_line(capsys):
    result = bench.main(["--device=cpu", *LESSON])
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) <= 26, "the lesson is one table of at most 25 lines, then the JSON line"
    assert last_json_line("\n".join(out))["ratios"] == json.loads(json.dumps(bench.rounded(result)))["ratios"]
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
    family = bench.model_family(base_cfg, [1, 2], 0.39)
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
    assert med == pytest.approx(statistics.median(wid) / 0.015)
    assert lo == pytest.approx(min(wid) / 0.020) and hi == pytest.approx(max(wid) / 0.010)
    assert r["step_long_s"] == (0.0, 0.0, 0.0)  # width adds nothing at the long context here
    assert r["prefill_s"][0] < 1  # ParScale's prefill costs more than width's
    # prefill + 64 steps, run by run
    par_total = [2.0 + 64 * 0.110 - (1.0 + 64 * 0.100), 2.2 + 64 * 0.125 - (1.1 + 64 * 0.105)]
    base_total = [1.0 + 64 * 0.100, 1.2 + 64 * 0.120, 1.0 + 64 * 0.100, 1.1 + 64 * 0.105]
    wid_total = [w - b for w in (1.5 + 64 * 0.160, 1.7 + 64 * 0.170) for b in base_total]
    assert r["total_s"][0] == pytest.approx(statistics.median(wid_total) / statistics.median(par_total))
    assert r["total_s"][1] == pytest.approx(min(wid_total) / max(par_total))
    assert family[1]["step_increase"] == pytest.approx(0.015 / 0.1025)  # +15 ms over the paired 102.5 ms
    n = bench.param_counts(family[0]["cfg"])
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
    assert bench.floor_bytes(cfg, bench.param_counts(cfg), B, 20, 2) == weights + cache.k.nbytes + cache.v.nbytes


def test_built_models_are_cheap_tied_finite_and_in_their_dtype():
    cfg = tiny_config(n_streams=2, n_kv_head=2)
    model = bench.build_model(cfg, torch.device("cpu"), torch.bfloat16, seed=3)
    assert model.lm_head.weight is model.transformer.wte.weight
    for name, p in model.named_parameters():
        assert p.dtype == torch.bfloat16 and torch.isfinite(p).all(), name
        nonzero = p[p != 0].float().abs()
        assert nonzero.numel() == 0 or nonzero.min() >= torch.finfo(torch.bfloat16).tiny, f"{name}: subnormal"
    assert torch.equal(model.transformer.h[0].ln_1.weight, torch.ones(cfg.n_embd, dtype=torch.bfloat16))
    assert model.transformer.h[0].attn.c_attn.weight.float().std().item() == pytest.approx(0.02, rel=0.1)
    again = bench.build_model(cfg, torch.device("cpu"), torch.bfloat16, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    idx = torch.randint(cfg.vocab_size, (2, 8))
    with torch.no_grad():
        assert torch.isfinite(model(idx)[0]).all()


def test_read_bandwidth_reads_more_than_the_last_cache():
    bw, how = bench.read_bandwidth(torch.device("cpu"))
    llc = bench.last_cache_bytes(torch.device("cpu"))
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
