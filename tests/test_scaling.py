"""scripts/scaling.py: the law fitter against known answers, and the sweep / dynamic-P / prefix_matched / diversity flows
end to end on tiny shapes (each run is a train.py process, ~2 s to start: the grids here are cut to a few runs)."""
import csv
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from test_train import write_corpus
from util import ROOT

sys.path.insert(0, os.path.join(ROOT, "scripts"))
import scaling  # noqa: E402

from checkpoint import attach_streams, load_checkpoint, model_from_checkpoint  # noqa: E402
from common import UserError  # noqa: E402

ONE_THREAD = "--threads=1"  # tiny models on a shared CPU run ~10x faster on one thread


def test_fit_recovers_known_parameters_from_synthetic_data():
    truth = dict(E=1.3, A=4e5, alpha=0.35, k=0.5)
    g = torch.Generator().manual_seed(0)
    N, P, L = [], [], []
    for n in [1e6, 3e6, 1e7, 3e7, 1e8]:
        for p in [1, 2, 4, 8]:
            N.append(n)
            P.append(p)
            L.append(scaling.law(n, p, **truth).item() * (1 + 1e-4 * torch.randn(1, generator=g).item()))
    fit = scaling.fit_law(N, P, L, n_starts=3)
    for key, tol in dict(E=0.02, alpha=0.03, k=0.03).items():
        assert abs(fit[key] - truth[key]) < tol, (key, fit)
    assert abs(math.log(fit["A"] / truth["A"])) < 0.5, fit
    assert fit["r2"] > 0.999


def test_fit_reproduces_the_paper():
    fit = scaling.fit_law(*scaling.paper_points(), n_starts=1)
    paper = scaling.PAPER_FIT
    assert abs(fit["k"] - paper["k"]) < 0.01 and fit["r2"] > 0.99, fit
    assert abs(fit["E"] - paper["E"]) < 0.01 and abs(fit["alpha"] - paper["alpha"]) < 0.01, fit
    assert abs(fit["A"] / paper["A"] - 1) < 0.05, fit


def test_k_per_size_on_the_paper_grid():
    fit = scaling.fit_law(*scaling.paper_points(), n_starts=1)
    rows = scaling.k_per_size(scaling.PAPER_N, scaling.PAPER_LOSS, scaling.PAPER_STREAMS, fit["E"], fit["alpha"])
    least_squares = [0.362, 0.400, 0.372, 0.411, 0.477, 0.490]  # least squares on the loss (results/k_per_size.txt)
    mean_of_each = [0.369, 0.412, 0.377, 0.418, 0.490, 0.495]  # the mean of the k each P implies alone
    for r, k, m in zip(rows, least_squares, mean_of_each):
        assert abs(r["k"] - k) < 0.002 and abs(r["k_mean"] - m) < 0.002, r
        # the anchor: the law passes through this size's P = 1 point exactly
        assert abs(scaling.law(r["N"], 1, fit["E"], r["A"], fit["alpha"], r["k"]).item() - r["L1"]) < 1e-12
    assert rows[-1]["k"] > rows[0]["k"] + 0.1  # k grows with size on this grid


def test_k_per_size_recovers_planted_k_and_the_extrapolation_its_forms():
    E, alpha, A = 1.3, 0.35, 4e5
    sizes, planted, streams = [1e6, 1e7, 1e8], [0.1, 0.3, 0.6], [1, 2, 4, 8]
    N = [[n * (1 + 0.01 * (P - 1)) for n in sizes] for P in streams]  # N grows with P, as ParScale's does
    L = [[scaling.law(n, P, E, A, alpha, k).item() for n, k in zip(row, planted)] for P, row in zip(streams, N)]
    for r, k in zip(scaling.k_per_size(N, L, streams, E, alpha), planted):
        assert abs(r["k"] - k) < 1e-6 and abs(r["k_mean"] - k) < 1e-6, r
        assert all(abs(v - k) < 1e-9 for v in r["k_each"].values()), r
        assert abs(r["A"] / A - 1) < 1e-9, r
    at = [1e3, 1e12]
    linear = [0.05 * math.log(n) - 0.4 for n in sizes]
    power = [0.02 * n ** 0.15 for n in sizes]
    got = scaling.extrapolate_k(sizes, linear, at)["linear"]["at"]
    assert all(abs(got[n] - (0.05 * math.log(n) - 0.4)) < 1e-9 for n in at), got
    got = scaling.extrapolate_k(sizes, power, at)["power"]["at"]
    assert all(abs(got[n] / (0.02 * n ** 0.15) - 1) < 1e-9 for n in at), got


def test_sweep_runs_end_to_end_and_resumes_without_training(tmp_path, monkeypatch):
    data = write_corpus(tmp_path / "data")
    argv = ["sweep", "--preset=tiny", "--widths=8,16", "--n_streams=1,4", f"--out={tmp_path / 'out'}",
            f"--data_dir={data}", ONE_THREAD]
    first = scaling.main(argv)
    with open(tmp_path / "out" / "sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["width"], r["P"], r["status"]) for r in rows] == [(w, P, "trained") for w in ("8", "16") for P in ("1", "4")]
    n = {(r["width"], r["P"]): int(r["N"]) for r in rows}
    assert n[("8", "1")] < n[("8", "4")] < n[("16", "1")] < n[("16", "4")]  # N counts prefixes + aggregator
    assert first["fit"] is None  # 4 runs: too few for a 4-parameter fit
    assert os.path.isfile(tmp_path / "out" / "sweep" / "w8_p4" / "train.out")

    def no_training(argv, out_dir):
        raise AssertionError(f"a finished run was trained again: {argv}")
    monkeypatch.setattr(scaling, "call_train", no_training)
    second = scaling.main(argv)
    assert second["val"] == first["val"]
    with open(tmp_path / "out" / "sweep.csv") as f:
        assert {r["status"] for r in csv.DictReader(f)} == {"done"}
    from_runs = sorted(zip(*scaling.points_from(str(tmp_path / "out" / "sweep"))))  # fit --runs: a folder or the CSV
    from_csv = sorted(zip(*scaling.points_from(str(tmp_path / "out" / "sweep.csv"))))
    assert [(n, p, round(v, 4)) for n, p, v in from_runs] == from_csv


def test_a_failed_run_says_why(tmp_path):
    with pytest.raises(UserError, match="prepare_data.py"):  # train.py's own error line
        scaling.call_train([f"--data_dir={tmp_path / 'missing'}", f"--out_dir={tmp_path / 'out'}"], str(tmp_path / "out"))


def bad_inputs(tmp_path):
    """Places a user can get wrong: a data folder, one with meta.json only, a CSV that is not a sweep's."""
    data = write_corpus(tmp_path / "data")
    (tmp_path / "meta_only").mkdir()
    shutil.copy(os.path.join(data, "meta.json"), tmp_path / "meta_only")
    (tmp_path / "bad.csv").write_text("width,P\n8,1\n")
    return dict(data=data, meta_only=tmp_path / "meta_only", bad_csv=tmp_path / "bad.csv", missing=tmp_path / "missing",
                out=tmp_path / "out")


@pytest.mark.parametrize("argv, words", [
    ([], ["cmd"]),
    (["fit"], ["--paper", "--runs"]),
    (["fit", "--paper", "--runs=x"], ["--paper", "--runs"]),
    (["fit", "--paper", "--starts=0"], ["--starts"]),
    (["fit", "--runs", "--per_size"], ["--runs", "expected one argument"]),  # argparse's complaint
    (["fit", "--runs={missing}"], ["--runs", "missing"]),
    (["fit", "--runs={data}", "--per_size"], ["--per_size", "--paper"]),
    (["sweep", "--bogus=1", "--data_dir={data}"], ["--bogus", "sweep --help"]),
    (["two_stage", "--widths=8", "--data_dir={data}"], ["--widths", "two_stage"]),
    (["sweep", "--preset=tiny", "--widths=8,x", "--data_dir={data}"], ["--widths=8,x"]),
    (["sweep", "--preset=tiny", "--widths=7", "--data_dir={data}"], ["--widths=7", "n_head"]),
    (["sweep", "--max_iters=0", "--data_dir={data}"], ["--max_iters=0"]),
    (["sweep", "--preset=tiny", "--threads=-2", "--data_dir={data}"], ["--threads=-2"]),
    (["dynamic", "--n_streams=1", "--data_dir={data}"], ["--n_streams=1", "P > 1"]),
    (["prefix_matched", "--cells=2x4,1x2", "--data_dir={data}"], ["--cells=2x4,1x2", "P >= 2"]),
    (["prefix_matched", "--cells=2x4,2x4", "--data_dir={data}"], ["--cells=2x4,2x4", "distinct"]),
    (["prefix_matched", "--cells=2-4", "--data_dir={data}"], ["--cells=2-4"]),
    (["prefix_matched", "--seeds=1,1", "--data_dir={data}"], ["--seeds=1,1", "repeated"]),
    (["prefix_matched", "--seeds=0", "--data_dir={data}"], ["--seeds=0"]),
    (["prefix_matched", "--frozen_iters=0", "--data_dir={data}"], ["--frozen_iters=0"]),
    (["prefix_matched", "--n_streams=2", "--data_dir={data}"], ["--n_streams=2", "prefix_matched --help"]),
    (["prefix_matched", "--data_dir={missing}"], ["--data_dir", "prepare_data.py"]),
    (["diversity", "--reparam=0", "--data_dir={data}"], ["--reparam=0"]),
    (["diversity", "--n_streams=2,2", "--data_dir={data}"], ["--n_streams=2,2", "repeated"]),
    (["diversity", "--cells=2x1", "--data_dir={data}"], ["--cells=2x1", "diversity --help"]),
    (["two_stage", "--dry_run", "--data_dir={data}"], ["--dry_run", "two_stage --help"]),
    (["plot_pays", "--results={missing}"], ["--results", "missing"]),
    (["plot_pays", "--results={data}", "--out=fig.pdf"], ["--out=fig.pdf", ".png"]),
    (["sweep", "--device=bogus", "--data_dir={data}"], ["--device=bogus"]),
    (["sweep", "--data_dir={missing}"], ["--data_dir", "prepare_data.py"]),
])
def test_bad_flags_are_user_errors_naming_the_flag(tmp_path, argv, words):
    where = bad_inputs(tmp_path)
    with pytest.raises(UserError) as e:
        scaling.get_args([a.format(**where) for a in argv])
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


def cli(*argv):
    return subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "scaling.py"), *argv], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("argv, words", [
    (["sweep", "--preset=tiny", "--bogus"], ["--bogus"]),  # argparse's complaint
    (["fit", "--runs={bad_csv}"], ["--runs", "N, P, val"]),  # a file that is not a sweep's CSV
    (["sweep", "--preset=tiny", "--widths=8", "--n_streams=1", "--data_dir={meta_only}", "--out={out}", ONE_THREAD],
     ["train.py", "no train.bin", "train.out"]),  # train.py refused the run: its own line, passed on
])
def test_a_user_error_is_one_line_exit_1_no_traceback(tmp_path, argv, words):
    where = bad_inputs(tmp_path)
    proc = cli(*[a.format(**where) for a in argv])
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert all(w in lines[0] for w in words), lines[0]


def test_dynamic_p_switches_kv_initialised_streams_on_an_untouched_backbone(tmp_path):
    data = write_corpus(tmp_path / "data")
    out = tmp_path / "out"
    result = scaling.main(["dynamic", "--preset=tiny", "--n_streams=2,4", f"--out={out}", f"--data_dir={data}", ONE_THREAD])
    assert set(result["val"]) == {1, 2, 4}
    base_ckpt = load_checkpoint(os.path.join(out, "base", "ckpt.pt"))
    assert result["val"][1] == round(scaling.evals(out / "base")[-1]["val"], 4)
    for P in (2, 4):
        run = load_checkpoint(os.path.join(out, "dynamic", f"p{P}", "ckpt.pt"))
        assert run["args"]["prefix_init"] == "kv" and run["args"]["freeze_backbone"] and run["args"]["threads"] == 1
        for k, v in base_ckpt["model"].items():
            assert torch.equal(run["model"][k], v), k  # the frozen backbone never moved
        model = attach_streams(model_from_checkpoint(base_ckpt), load_checkpoint(os.path.join(out, "dynamic", f"p{P}", f"streams_p{P}.pt")))
        assert model.config.n_streams == P
        assert result["val"][P] == round(scaling.evals(out / "dynamic" / f"p{P}")[-1]["val"], 4)


def test_experiment_flags_override_the_preset(tmp_path):
    data = write_corpus(tmp_path / "data")
    args = scaling.get_args(["prefix_matched", "--preset=tiny", "--cells=2x1,8x1", "--seeds=3", "--frozen_iters=5",
                             f"--data_dir={data}"])
    pre = scaling.preset(args)
    assert pre["matched_cells"] == [(2, 1), (8, 1)] and pre["seeds"] == [3] and pre["frozen_iters"] == 5
    pre = scaling.preset(scaling.get_args(["diversity", "--preset=cpu", f"--data_dir={data}"]))
    assert pre["streams"] == [1, 2, 4] and pre["max_iters"] == scaling.PRESETS["cpu"]["diversity_iters"]  # not the sweep's
    pre = scaling.preset(scaling.get_args(["diversity", "--preset=cpu", "--max_iters=7", "--n_streams=2", "--reparam=32",
                                           f"--data_dir={data}"]))
    assert (pre["max_iters"], pre["streams"], pre["reparam_hidden"]) == (7, [2], 32)


def test_gpu_sweep_dry_run_plans_ten_runs_within_four_minutes_without_a_gpu(tmp_path, capsys):
    data = write_corpus(tmp_path / "data")
    result = scaling.main(["sweep", "--preset=gpu", "--dry_run", f"--data_dir={data}", f"--out={tmp_path / 'out'}"])
    printed = capsys.readouterr().out
    assert result["runs"] == 10 and result["estimated_s"] <= 4 * 60, result  # 3 widths x P in {1,2,4} + one noise run
    assert printed.count("python train.py") == 10 and "--n_embd=384" in printed and "--n_layer=6" in printed
    assert "sweep_noise/w256_p2_s2" in printed and "--seed=2" in printed
    assert not os.path.exists(tmp_path / "out")  # nothing ran


def test_the_noise_run_is_evaluated_again_on_the_first_seeds_batches(tmp_path, monkeypatch):
    """sweep's noise cell (the gpu preset's; tiny has none, to keep this file fast), without a process: the
    re-evaluation must resume the run at SEED, and the difference is taken on those batches."""
    args = scaling.get_args(["sweep", "--preset=gpu", "--dry_run", f"--data_dir={write_corpus(tmp_path / 'data')}",
                             f"--out={tmp_path / 'out'}"])
    pre = scaling.preset(args)
    name, d, argv, width, P, seed = scaling.sweep_runs(pre, args)[-1]
    assert (name, width, P, seed) == ("w256_p2_s2", 256, 2, scaling.NOISE_SEED) and f"--seed={seed}" in argv
    os.makedirs(d)
    with open(os.path.join(d, "log.jsonl"), "w") as f:
        f.write(json.dumps(dict(kind="eval", step=pre["max_iters"], train=2.0, val=1.9)) + "\n")
    calls = []

    def fake_eval(argv, out_dir):
        calls.append(argv)
        return 'step 360 ...\n{"train": 2.0, "val": 1.80126}\n'
    monkeypatch.setattr(scaling, "call_train", fake_eval)
    row = scaling.noise_row(pre, args, [dict(width=256, P=2, val=1.81)], d, width, P)
    assert row == dict(width=256, P=2, seeds=[scaling.SEED, scaling.NOISE_SEED], val=[1.81, 1.8013], own_batches_val=1.9,
                       diff=0.0087)
    (argv,) = calls
    assert argv[-2:] == ["--init_from=resume", "--eval_only"] and f"--seed={scaling.SEED}" in argv and f"--out_dir={d}" in argv


def test_prefix_matched_writes_cells_runs_and_contrasts(tmp_path):
    data = write_corpus(tmp_path / "data")
    out, results = tmp_path / "out", tmp_path / "results"
    result = scaling.main(["prefix_matched", "--preset=tiny", "--cells=2x1", "--seeds=1", f"--out={out}",
                           f"--data_dir={data}", f"--results={results}", ONE_THREAD])
    assert set(result["val"]) == {"1_0_-", "2_1_learned", "2_1_uniform"}
    with open(results / "prefix_matched_tiny.csv") as f:
        cells = list(csv.DictReader(f))
    assert list(cells[0]) == ["P", "n_prefix", "mix"] + scaling.CELL_COLS
    by = {(c["P"], c["mix"]): c for c in cells}
    p1, learned, uniform = by[("1", "-")], by[("2", "learned")], by[("2", "uniform")]
    assert p1["rho"] == "" and p1["vs_p1"] == "" and p1["N"] == p1["N_no_agg"]
    for c in (learned, uniform):
        assert int(c["N_no_agg"]) < int(c["N"]) and int(c["N_no_agg"]) > int(p1["N"])  # prefixes, then the aggregator
        assert -1 <= float(c["rho"]) <= 1 and c["verdict"] in ("noise", "lower", "higher")
        assert abs(float(c["vs_p1"]) - (float(c["val"]) - float(p1["val"]))) < 2e-4  # one seed: the same batches
    with open(results / "prefix_matched_tiny.json") as f:
        saved = json.load(f)
    assert saved["noise_nats"] == scaling.NOISE and [c["contrast"] for c in saved["contrasts"]] == ["2x1 learned - uniform"]
    run = next(r for r in saved["runs"] if r.get("mix") == "uniform")
    assert abs(run["entropy"] - math.log(2)) < 1e-4 and len(run["curve"]) == 2  # a fixed 1/2, 1/2 mix; steps 0 and last
    ckpt = load_checkpoint(os.path.join(out, "prefix_matched", "p2_n1_uniform_s1", "ckpt.pt"))
    assert ckpt["model_args"]["agg_smoothing"] == 1.0 and ckpt["args"]["freeze_backbone"] and ckpt["args"]["seed"] == 1
    assert os.path.isfile(out / "prefix_matched.csv") and os.path.isfile(out / "prefix_matched.json")


def test_diversity_writes_its_table_and_plot_pays_reads_it(tmp_path, capsys):
    data = write_corpus(tmp_path / "data")
    out, results = tmp_path / "out", tmp_path / "results"
    scaling.main(["diversity", "--preset=tiny", "--n_streams=1,2", "--seeds=1", f"--out={out}", f"--data_dir={data}",
                  f"--results={results}", ONE_THREAD])
    with open(results / "diversity_tiny.csv") as f:
        cells = {c["prefix"]: c for c in csv.DictReader(f)}
    assert set(cells) == {"none", "plain", "reparam"} and list(cells["none"]) == ["P", "prefix"] + scaling.CELL_COLS
    assert cells["plain"]["N"] == cells["reparam"]["N"]  # the reparameterised checkpoint holds folded prefixes
    assert cells["none"]["N"] == cells["none"]["N_no_agg"] and cells["plain"]["stream_loss"] != ""
    with open(results / "diversity_tiny.json") as f:
        runs = {r["prefix"]: r for r in json.load(f)["runs"]}
    assert runs["reparam"]["reparam_params"] > 0 == runs["plain"]["reparam_params"]
    assert load_checkpoint(os.path.join(out, "diversity", "p2_reparam_s1", "ckpt.pt"))["args"]["prefix_reparam"] == 8
    capsys.readouterr()
    figure = scaling.main(["plot_pays", "--preset=tiny", f"--results={results}"])["figure"]
    printed = capsys.readouterr().out
    assert (figure is None and "matplotlib is not installed" in printed) or os.path.isfile(results / "pays_tiny.png")
    with pytest.raises(UserError, match="prefix_matched_cpu.json"):  # nothing for that preset
        scaling.main(["plot_pays", "--preset=cpu", f"--results={results}"])
