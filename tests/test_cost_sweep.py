"""experiments/cost_sweep.py: the research cost sweep end to end at a toy shape (decode and training cost), its
crossovers on fixed numbers, the two decode paths kept apart, and every flag check. The width matching, the model
family and the models it measures are bench.py's, tested in tests/test_bench.py."""
import json

import pytest
from util import HAS_CUDA

import bench
import measure
from cli import UserError
from experiments import cost_sweep, crossovers, plots

# one layer, a handful of tokens: the whole sweep runs in about a second on CPU
TOY = ["--mode=decode", "--n_layer=1", "--n_embd=32", "--n_head=4", "--vocab_size=64", "--n_prefix=2",
       "--stream_counts=1,2", "--batches=1,2", "--contexts=4,8", "--l_out=2", "--repeats=1"]


def last_json_line(out):
    return json.loads(out.strip().splitlines()[-1])


def test_crossover():
    assert crossovers.crossover([128, 512, 1024], [3.0, 1.0, -1.0]) == ("stops winning", 768.0)
    assert crossovers.crossover([1, 2, 4], [1.0, 2.0, 0.5]) == ("wins throughout", None)
    assert crossovers.crossover([1, 2], [0.0, 2.0]) == ("loses throughout", None)
    assert crossovers.increase_ratio(22.0, 1.0) == 22.0 and crossovers.increase_ratio(5.0, 0.0) is None


def test_decode_sweep_end_to_end(capsys, tmp_path):
    png = tmp_path / "cost.png"
    plot = [f"--plot={png}"] if plots.Figure is not None else []  # without matplotlib --plot is refused up front
    result = cost_sweep.main(["--device=cpu", *TOY, *plot])
    out = capsys.readouterr().out
    assert last_json_line(out)["headline"] == json.loads(json.dumps(cost_sweep.rounded(result)))["headline"]
    assert "decode paths: eager" in out and result["paths"] == ["eager"]  # CPU: said, not silent
    assert png.exists() == bool(plot)
    for key in ("models", "results", "headline", "crossovers", "paper_cell", "notes", "elapsed_s"):
        assert key in result, key
    assert not result["notes"] and result["mode"] == "decode"
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
    monkeypatch.setattr(measure, "fused_decoder_for",
                        lambda model, B, dtype, n: (measure.EagerDecoder(model, B), "stand-in"))
    monkeypatch.setattr(measure, "fused_status", lambda device: (True, "test stand-in"))
    result = cost_sweep.main(["--device=cpu", *TOY, "--kv_heads=2", "--contexts=8"])
    assert result["paths"] == ["fused", "eager"] and "test stand-in" in capsys.readouterr().out
    assert {(r["path"], r["side"]) for r in result["results"]} == {(p, s) for p in ("fused", "eager")
                                                                   for s in ("base", "parscale", "width")}
    assert {h["path"] for h in result["headline"]} == {"fused", "eager"} and result["paper_cell"]["path"] == "fused"


def test_a_refused_model_is_measured_on_the_eager_path_only(monkeypatch, capsys):
    why = "fused decode disagrees with model.py by 1.3 at step 2"
    monkeypatch.setattr(measure, "fused_decoder_for", lambda model, B, dtype, n: (None, why))
    monkeypatch.setattr(measure, "fused_status", lambda device: (True, "test stand-in"))
    result = cost_sweep.main(["--device=cpu", *TOY, "--kv_heads=2", "--contexts=8"])
    assert {r["path"] for r in result["results"]} == {"eager"}
    assert any(why in n and "eager path only" in n for n in result["notes"]) and why in capsys.readouterr().out


def test_time_limit_skips_loudly(capsys):
    result = cost_sweep.main(["--device=cpu", *TOY, "--time_limit=1e-9"])
    assert result["results"] == [] and "TIME LIMIT" in result["notes"][0]
    assert "TIME LIMIT" in capsys.readouterr().out


def test_fused_path_is_refused_when_unavailable():
    with pytest.raises(UserError, match="--paths=fused"):
        cost_sweep.parse_args(["--device=cpu", "--paths=fused"])


def test_train_mode(capsys):
    # a stated peak: MFU is model.GPT.estimate_mfu's (without one it is n/a on CPU, see below)
    result = cost_sweep.main(["--device=cpu", *TOY, "--mode=train", "--kv_heads=4", "--train_batch=2", "--train_seq=8",
                              "--train_steps=1", "--peak_flops=1e12"])
    out = capsys.readouterr().out
    assert last_json_line(out)["mode"] == "train" and "1 TFLOP/s (--peak_flops)" in out
    assert [t["P"] for t in result["train"]] == [1, 2] and result["peak_flops"] == 1e12
    for t in result["train"]:
        assert t["tokens_per_s"] > 0 and t["step_ms"] > 0 and t["flops_per_s"] > 0
        assert t["mfu"] == pytest.approx(t["flops_per_s"] / 1e12)


def test_peak_flops_comes_from_model_py():
    assert cost_sweep.parse_args(["--device=cpu"]).peak_flops is None  # no datasheet peak for a CPU: MFU n/a
    assert cost_sweep.parse_args(["--device=cpu", "--peak_flops=5e12"]).peak_flops == 5e12
    assert not hasattr(cost_sweep, "H200_BF16_FLOPS") and not hasattr(bench, "H200_BF16_FLOPS")  # machine.PEAK_FLOPS


def test_the_preset_fills_what_the_flags_leave():
    args = cost_sweep.parse_args(["--device=cpu"])  # auto on a CPU: the tiny shape and its sizes
    assert (args.preset_name, args.n_embd, args.batches, args.contexts, args.l_out) == ("tiny", 96, [1, 2, 4, 8],
                                                                                        [32, 128], 16)
    args = cost_sweep.parse_args(["--device=cpu", "--preset=gpt2", "--contexts=64", "--stream_counts=2,4",
                                  "--mode=all"])
    assert (args.n_layer, args.vocab_size, args.contexts, args.l_out, args.train_seq) == (12, 50257, [64], 64, 1024)
    assert args.stream_counts == [1, 2, 4] and args.kv_heads == [12, 2] and args.mode == "all"  # P=1 base; MHA, GQA


# -----------------------------------------------------------------------------
# bad flag values: one named UserError each, before anything is built
# (tests/test_cli.py checks that the command line turns these into `error: ...` and exit 1)

@pytest.mark.parametrize("flags, match", [
    (["--streams=1,2"], r"--streams is now --stream_counts \(the P values; --streams is a file\)"),
    (["--kv_heads=5"], r"the model flags \(--kv_heads=5\): n_kv_head \(5\) must divide n_head \(12\)"),
    (["--preset=paper", "--kv_heads=5"], r"n_kv_head \(5\) must divide n_head \(16\)"),
    (["--n_embd=100"], r"n_embd \(100\) must be divisible by n_head \(12\)"),
    (["--n_layer=0"], r"n_layer must be a positive integer, got 0"),
    (["--l_out=0"], r"--l_out must be >= 1"),
    (["--repeats=0"], r"--repeats must be >= 1"),
    (["--train_steps=0"], r"--train_steps must be >= 1"),
    (["--n_prefix=0"], r"n_prefix must be >= 1 at n_streams=8, got 0"),
    (["--law_k=-0.1"], r"--law_k must be a finite number >= 0"),
    (["--k=0.3"], r"--k is now --law_k"),
    (["--time_limit=0"], r"--time_limit must be .* > 0, or -1"),
    (["--threads=0"], r"--threads must be >= 1, or -1 for all cores"),
    (["--peak_flops=0"], r"--peak_flops must be a positive number of FLOP/s, or -1"),
    (["--peak_bw=0"], r"--peak_bw must be a positive number of bytes/s"),
    (["--dtype=float16"], r"--dtype=float16 is for GPUs"),
    (["--device=meta"], r"--device=meta: cost_sweep.py runs on cpu, cuda"),
    (["--mode=train", "--plot=x.png"], r"--plot draws the sweep's cost figure; --mode=train has none"),
    (["--plot=/no/such/folder/x.png"], r"--plot=.*: its folder does not exist"),
])
def test_bad_flag_values(flags, match, monkeypatch):
    monkeypatch.setattr(plots, "Figure", object)  # as if matplotlib were there: the other --plot checks still apply
    device = [] if any(f.startswith("--device") for f in flags) else ["--device=cpu"]
    with pytest.raises(UserError, match=match) as e:
        cost_sweep.parse_args(device + flags)
    assert "\n" not in str(e.value)


def test_plot_without_matplotlib_is_refused_up_front(monkeypatch):
    monkeypatch.setattr(plots, "Figure", None)
    with pytest.raises(UserError, match="--plot=cost.png needs matplotlib"):
        cost_sweep.parse_args(["--device=cpu", "--plot=cost.png"])


@pytest.mark.parametrize("flag", ["--batches=1,two", "--contexts=", "--stream_counts=-2", "--kv_heads=0"])
def test_list_flags_of_anything_but_positive_integers_are_refused(flag):
    with pytest.raises(UserError, match=f"{flag.split('=')[1]}: expected comma-separated positive integers"):
        cost_sweep.parse_args(["--device=cpu", flag])


def test_the_mode_names_are_the_sweeps():
    with pytest.raises(UserError, match="invalid choice: 'lesson'"):  # the lesson is bench.py's, not this script's
        cost_sweep.parse_args(["--device=cpu", "--mode=lesson"])


@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU")
def test_decode_sweep_on_gpu():
    # head_dim 32: the smallest the fused kernels take
    result = cost_sweep.main(["--device=cuda", "--n_layer=1", "--n_embd=128", "--n_head=4", "--vocab_size=64",
                              "--n_prefix=2",
                              "--stream_counts=1,2", "--batches=1,2", "--contexts=4,8", "--l_out=3", "--repeats=1"])
    assert not result["notes"], result["notes"]
    assert {r["path"] for r in result["results"]} == set(result["paths"])
    assert all(r["peak_mb"] >= r["weights_mb"] > 0 and r["roofline"] > 0 for r in result["results"])
