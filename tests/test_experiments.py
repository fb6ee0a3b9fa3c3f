"""experiments/: the law fitter against known answers, the noise verdicts on fixed numbers, every experiment's flags,
and the sweep / dynamic-P / prefix_matched / diversity flows end to end on tiny shapes (each run is a train.py
process, ~4 s to start: the grids here are cut to a few runs, and the P=1 base they build on is trained once)."""
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
from util import ROOT, model_from, train_in_this_process

from checkpoint import attach_streams, load_checkpoint
from cli import UserError
from experiments import diversity, dynamic, fit, law, noise, plots, prefix_matched, runner, sweep, two_stage

ONE_THREAD = "--threads=1"  # tiny models on a shared CPU run ~10x faster on one thread
SCRIPTS = dict(fit=fit, sweep=sweep, two_stage=two_stage, dynamic=dynamic, prefix_matched=prefix_matched,
               diversity=diversity, plots=plots)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def tiny_base(data, tmp_path_factory):
    """The tiny preset's P=1 base, trained once by runner.train_base; a test copies it into its --out, where the
    experiment finds it finished (as a second command in the same --out would)."""
    out = tmp_path_factory.mktemp("base_out")
    args = dynamic.get_args(["--preset=tiny", f"--out_dir={out}", f"--data_dir={data}", ONE_THREAD])
    with pytest.MonkeyPatch.context() as mp:
        train_in_this_process(mp)
        runner.train_base(runner.preset(args), args)
    return out / "base"


# -----------------------------------------------------------------------------
# the law, pure

def test_fit_recovers_known_parameters_from_synthetic_data():
    truth = dict(E=1.3, A=4e5, alpha=0.35, k=0.5)
    g = torch.Generator().manual_seed(0)
    N, P, L = [], [], []
    for n in [1e6, 3e6, 1e7, 3e7, 1e8]:
        for p in [1, 2, 4, 8]:
            N.append(n)
            P.append(p)
            L.append(law.law(n, p, **truth).item() * (1 + 1e-4 * torch.randn(1, generator=g).item()))
    fitted = law.fit_law(N, P, L, n_starts=3)
    for key, tol in dict(E=0.02, alpha=0.03, k=0.03).items():
        assert abs(fitted[key] - truth[key]) < tol, (key, fitted)
    assert abs(math.log(fitted["A"] / truth["A"])) < 0.5, fitted
    assert fitted["r2"] > 0.999


def test_fit_reproduces_the_paper():
    fitted = law.fit_law(*law.paper_points(), n_starts=1)
    paper = law.PAPER_FIT
    assert abs(fitted["k"] - paper["k"]) < 0.01 and fitted["r2"] > 0.99, fitted
    assert abs(fitted["E"] - paper["E"]) < 0.01 and abs(fitted["alpha"] - paper["alpha"]) < 0.01, fitted
    assert abs(fitted["A"] / paper["A"] - 1) < 0.05, fitted


def test_k_per_size_on_the_paper_grid():
    fitted = law.fit_law(*law.paper_points(), n_starts=1)
    rows = law.k_per_size(law.PAPER_N, law.PAPER_LOSS, law.PAPER_STREAMS, fitted["E"], fitted["alpha"])
    least_squares = [0.362, 0.400, 0.372, 0.411, 0.477, 0.490]  # least squares on the loss (results/k_per_size.txt)
    mean_of_each = [0.369, 0.412, 0.377, 0.418, 0.490, 0.495]  # the mean of the k each P implies alone
    for r, k, m in zip(rows, least_squares, mean_of_each):
        assert abs(r["k"] - k) < 0.002 and abs(r["k_mean"] - m) < 0.002, r
        # the anchor: the law passes through this size's P = 1 point exactly
        assert abs(law.law(r["N"], 1, fitted["E"], r["A"], fitted["alpha"], r["k"]).item() - r["L1"]) < 1e-12
    assert rows[-1]["k"] > rows[0]["k"] + 0.1  # k grows with size on this grid


def test_k_per_size_recovers_planted_k_and_the_extrapolation_its_forms():
    E, alpha, A = 1.3, 0.35, 4e5
    sizes, planted, streams = [1e6, 1e7, 1e8], [0.1, 0.3, 0.6], [1, 2, 4, 8]
    N = [[n * (1 + 0.01 * (P - 1)) for n in sizes] for P in streams]  # N grows with P, as ParScale's does
    L = [[law.law(n, P, E, A, alpha, k).item() for n, k in zip(row, planted)] for P, row in zip(streams, N)]
    for r, k in zip(law.k_per_size(N, L, streams, E, alpha), planted):
        assert abs(r["k"] - k) < 1e-6 and abs(r["k_mean"] - k) < 1e-6, r
        assert all(abs(v - k) < 1e-9 for v in r["k_each"].values()), r
        assert abs(r["A"] / A - 1) < 1e-9, r
    at = [1e3, 1e12]
    linear = [0.05 * math.log(n) - 0.4 for n in sizes]
    power = [0.02 * n ** 0.15 for n in sizes]
    got = law.extrapolate_k(sizes, linear, at)["linear"]["at"]
    assert all(abs(got[n] - (0.05 * math.log(n) - 0.4)) < 1e-9 for n in at), got
    got = law.extrapolate_k(sizes, power, at)["power"]["at"]
    assert all(abs(got[n] / (0.02 * n ** 0.15) - 1) < 1e-9 for n in at), got


# -----------------------------------------------------------------------------
# the noise verdicts and paired differences, on fixed numbers

@pytest.mark.parametrize("d, low, high, said", [
    (0.0099, 0.0, 0.02, "noise"), (-0.0099, -0.02, 0.001, "noise"),  # under 0.01 nats, whatever the seeds say
    (0.01, 0.005, 0.015, "higher"), (-0.012, -0.015, -0.009, "lower"),
    (-0.02, -0.05, 0.01, "lower, seeds disagree"), (0.03, -0.001, 0.06, "higher, seeds disagree"),
    ("", 0, 0, ""),  # no difference (P = 1 itself)
])
def test_the_noise_rule(d, low, high, said):
    assert noise.NOISE == 0.01 and noise.verdict(d, low, high) == said


def fixed_run(P, seed, val, p1_val, stream=None, rho=None, kind="plain"):
    """noise.run_row on made-up counts and evaluations: one run of a cell (P, kind) at a seed."""
    counts = dict(non_embedding=1000 + 10 * P, aggregator=4 * (P > 1), prefixes=2 * (P > 1), reparam=0)
    ev = [dict(step=0, val=val + 1.0), dict(step=3, val=val)]
    if stream is not None:
        ev[-1].update(stream_loss=[stream] * P, gain=stream - val, rho=rho, kl=0.01, stream_entropy=0.6)
    return noise.run_row(counts, p1_val, ev, "trained", P=P, prefix=kind, seed=seed)


def test_rows_cells_and_contrasts_on_fixed_runs():
    runs = [fixed_run(1, 1, 2.00, None, kind="none"), fixed_run(1, 2, 2.10, None, kind="none")]
    runs[0]["vs_p1"] = runs[1]["vs_p1"] = ""  # as diversity.py's P = 1 rows: no difference to itself
    runs += [fixed_run(2, 1, 2.03, 2.00, stream=2.05, rho=0.99), fixed_run(2, 2, 2.11, 2.10, stream=2.12, rho=0.97),
             fixed_run(2, 1, 1.98, 2.00, stream=2.10, rho=0.90, kind="reparam"),
             fixed_run(2, 2, 2.09, 2.10, stream=2.20, rho=0.92, kind="reparam")]
    r = runs[2]
    assert (r["N"], r["N_no_agg"], r["val"], r["val_step0"], r["vs_p1"]) == (1020, 1016, 2.03, 3.03, 0.03)
    assert (r["stream_loss"], r["stream_vs_p1"], r["rho"], r["gain"]) == (2.05, 0.05, 0.99, 0.02)
    assert [c["step"] for c in r["curve"]] == [0, 3] and runs[0]["rho"] == "" and runs[0]["stream_loss"] == ""
    cells = {(c["P"], c["prefix"]): c for c in noise.summarise(runs, ("P", "prefix"))}
    assert list(cells) == [(1, "none"), (2, "plain"), (2, "reparam")]  # in order of first appearance
    plain, reparam = cells[2, "plain"], cells[2, "reparam"]
    assert plain["seeds"] == 2 and plain["val"] == 2.07 and (plain["val_min"], plain["val_max"]) == (2.03, 2.11)
    assert plain["vs_p1"] == 0.02 and (plain["vs_p1_min"], plain["vs_p1_max"]) == (0.01, 0.03)
    assert plain["verdict"] == "higher"
    assert reparam["vs_p1"] == -0.015 and reparam["verdict"] == "lower" and reparam["rho"] == 0.91
    assert cells[1, "none"]["verdict"] == "" and cells[1, "none"]["vs_p1_min"] == ""
    c = noise.contrast("reparam - plain", runs, dict(P=2, prefix="reparam"), dict(P=2, prefix="plain"))
    assert c["seeds"] == 2 and c["val"] == -0.035 and (c["val_min"], c["val_max"]) == (-0.05, -0.02)
    assert c["verdict"] == "lower" and c["rho"] == -0.07 and c["stream_loss"] == 0.065
    assert noise.contrast("none", runs, dict(P=4, prefix="plain"), dict(P=2, prefix="plain")) is None  # no such cell


def test_prefix_matched_contrasts_follow_the_line_of_equal_prefix_parameters():
    names = [name for name, *_ in prefix_matched.contrast_pairs([(2, 4), (4, 2), (8, 1), (2, 1)])]
    assert names == ["4x2 - 2x4 (learned)", "8x1 - 2x4 (learned)", "2x4 - 2x1 (learned: fewer slots)",
                     "4x2 - 2x4 (uniform)", "8x1 - 2x4 (uniform)", "2x4 - 2x1 (uniform: fewer slots)",
                     "2x4 learned - uniform", "4x2 learned - uniform", "8x1 learned - uniform", "2x1 learned - uniform"]


# -----------------------------------------------------------------------------
# the command lines

def test_presets_are_data():
    presets = runner.load_presets()
    assert sorted(presets) == ["cpu", "gpu", "tiny"] and all("about" not in p for p in presets.values())
    assert presets["gpu"]["noise_cell"] == (256, 2) and presets["cpu"]["noise_cell"] is None
    assert all(isinstance(c, tuple) for p in presets.values() for c in p["matched_cells"])


def test_every_experiment_parses_its_flags(data, tmp_path):
    common = [f"--data_dir={data}", "--preset=tiny"]
    args = sweep.get_args(common + ["--widths=8,16", "--stream_counts=1,4", "--max_iters=5", "--dry_run",
                                    "--threads=1"])
    assert (args.widths, args.stream_counts, args.max_iters, args.dry_run, args.threads) == ([8, 16], [1, 4], 5, True,
                                                                                             1)
    assert args.out_dir == os.path.abspath(os.path.join("out", "scaling", "tiny")) and os.path.isabs(args.data_dir)
    args = two_stage.get_args(common + ["--base_iters=4", "--extra_iters=6", "--eval_iters=2", "--batch_size=8"])
    assert (args.base_iters, args.extra_iters, args.eval_iters, args.batch_size) == (4, 6, 2, 8)
    args = dynamic.get_args(common + ["--stream_counts=2,8", "--prefix_init=random", f"--out_dir={tmp_path}"])
    assert (args.stream_counts, args.prefix_init, args.out_dir) == ([2, 8], "random", str(tmp_path))
    assert dynamic.get_args(common).prefix_init == "kv"
    args = prefix_matched.get_args(common + ["--cells=2x2,4x1", "--seeds=3,4", "--frozen_iters=7", "--results=r"])
    assert (args.cells, args.seeds, args.frozen_iters) == ([(2, 2), (4, 1)], [3, 4], 7)
    assert args.results == os.path.abspath("r")
    args = diversity.get_args(common + ["--stream_counts=1,2", "--seeds=5", "--prefix_reparam=16", "--max_iters=9"])
    assert (args.stream_counts, args.seeds, args.prefix_reparam, args.max_iters) == ([1, 2], [5], 16, 9)
    assert args.results == ""
    args = fit.get_args(["--paper", "--per_size", "--starts=3"])
    assert args.paper and args.per_size and args.starts == 3 and args.runs == ""
    args = plots.get_args(["--preset=tiny", f"--results={tmp_path}"])
    assert args.figure == ""  # plot_pays writes <results>/pays_<preset>.png
    assert plots.get_args([]).results == os.path.join(ROOT, "results")  # the committed logs, wherever it runs from


def bad_inputs(tmp_path):
    """Places a user can get wrong: a data folder, one with meta.json only, a CSV that is not a sweep's."""
    data = write_corpus(tmp_path / "data")
    (tmp_path / "meta_only").mkdir()
    shutil.copy(os.path.join(data, "meta.json"), tmp_path / "meta_only")
    (tmp_path / "bad.csv").write_text("width,P\n8,1\n")
    return dict(data=data, meta_only=tmp_path / "meta_only", bad_csv=tmp_path / "bad.csv", missing=tmp_path / "missing",
                out=tmp_path / "out")


@pytest.mark.parametrize("argv, words", [
    (["fit"], ["--paper", "--runs"]),
    (["fit", "--paper", "--runs=x"], ["--paper", "--runs"]),
    (["fit", "--paper", "--starts=0"], ["--starts"]),
    (["fit", "--runs", "--per_size"], ["--runs", "expected one argument"]),  # argparse's complaint
    (["fit", "--runs={missing}"], ["--runs", "missing"]),
    (["fit", "--runs={data}", "--per_size"], ["--per_size", "--paper"]),
    (["fit", "--paper", "--preset=cpu"], ["--preset=cpu", "fit.py --help"]),  # another script's flag
    (["sweep", "--bogus=1", "--data_dir={data}"], ["--bogus", "sweep.py --help"]),
    (["two_stage", "--widths=8", "--data_dir={data}"], ["--widths", "two_stage.py"]),
    (["sweep", "--preset=tiny", "--widths=8,x", "--data_dir={data}"], ["--widths", "8,x: expected comma-separated"]),
    (["sweep", "--preset=tiny", "--widths=7", "--data_dir={data}"], ["--widths=7", "n_head"]),
    (["sweep", "--max_iters=0", "--data_dir={data}"], ["--max_iters=0"]),
    (["sweep", "--preset=tiny", "--threads=-2", "--data_dir={data}"], ["--threads=-2"]),
    (["sweep", "--preset=bogus", "--data_dir={data}"], ["--preset", "invalid choice"]),
    (["two_stage", "--extra_iters=-3", "--data_dir={data}"], ["--extra_iters=-3"]),
    (["dynamic", "--stream_counts=1", "--data_dir={data}"], ["--stream_counts=1", "P > 1"]),
    (["dynamic", "--n_streams=2,4", "--data_dir={data}"], ["--n_streams is now --stream_counts", "train.py"]),
    (["sweep", "--n_streams=2", "--data_dir={data}"], ["--n_streams is now --stream_counts"]),
    (["dynamic", "--prefix_init=zero", "--data_dir={data}"], ["--prefix_init", "invalid choice"]),
    (["prefix_matched", "--cells=2x4,1x2", "--data_dir={data}"], ["--cells", "2x4,1x2: expected", "P >= 2"]),
    (["prefix_matched", "--cells=2x4,2x4", "--data_dir={data}"], ["--cells", "2x4,2x4: expected", "distinct"]),
    (["prefix_matched", "--cells=2-4", "--data_dir={data}"], ["--cells", "2-4: expected"]),
    (["prefix_matched", "--seeds=1,1", "--data_dir={data}"], ["--seeds", "1,1: a value is repeated"]),
    (["prefix_matched", "--seeds=0", "--data_dir={data}"], ["--seeds", "0: expected comma-separated positive"]),
    (["prefix_matched", "--frozen_iters=0", "--data_dir={data}"], ["--frozen_iters=0"]),
    (["prefix_matched", "--n_streams=2", "--data_dir={data}"], ["--n_streams=2", "prefix_matched.py --help"]),
    (["prefix_matched", "--data_dir={missing}"], ["--data_dir", "prepare_data.py"]),
    (["diversity", "--prefix_reparam=0", "--data_dir={data}"], ["--prefix_reparam=0"]),
    (["diversity", "--reparam=16", "--data_dir={data}"], ["--reparam is now --prefix_reparam"]),
    (["diversity", "--stream_counts=2,2", "--data_dir={data}"], ["--stream_counts", "2,2: a value is repeated"]),
    (["diversity", "--cells=2x1", "--data_dir={data}"], ["--cells=2x1", "diversity.py --help"]),
    (["two_stage", "--dry_run", "--data_dir={data}"], ["--dry_run", "two_stage.py --help"]),
    (["plots", "--results={missing}"], ["--results", "missing"]),
    (["plots", "--results={data}", "--figure=fig.pdf"], ["--figure=fig.pdf", ".png"]),
    (["plots", "--out=fig.png"], ["--out is now --figure"]),
    (["sweep", "--out=x", "--data_dir={data}"], ["--out is now --out_dir"]),
    (["sweep", "--device=bogus", "--data_dir={data}"], ["--device=bogus"]),
    (["sweep", "--data_dir={missing}"], ["--data_dir", "prepare_data.py"]),
])
def test_bad_flags_are_user_errors_naming_the_flag(tmp_path, argv, words):
    where = bad_inputs(tmp_path)
    with pytest.raises(UserError) as e:
        SCRIPTS[argv[0]].get_args([a.format(**where) for a in argv[1:]])
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


def cli(name, *argv, cwd):
    return subprocess.run([sys.executable, os.path.join(ROOT, "experiments", f"{name}.py"), *argv], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("argv, words", [
    (["sweep", "--preset=tiny", "--bogus"], ["--bogus"]),  # argparse's complaint
    (["fit", "--runs={bad_csv}"], ["--runs", "N, P, val"]),  # a file that is not a sweep's CSV
    (["sweep", "--preset=tiny", "--widths=8", "--stream_counts=1", "--data_dir={meta_only}", "--out_dir={out}",
      ONE_THREAD],
     ["train.py", "no train.bin", "train.out"]),  # train.py refused the run: its own line, passed on
])
def test_a_user_error_is_one_line_exit_1_no_traceback(tmp_path, argv, words):
    where = bad_inputs(tmp_path)
    proc = cli(*[a.format(**where) for a in argv], cwd=tmp_path)  # run from outside the repository
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert all(w in lines[0] for w in words), lines[0]


def test_experiment_flags_override_the_preset(data):
    args = prefix_matched.get_args(["--preset=tiny", "--cells=2x1,8x1", "--seeds=3", "--frozen_iters=5",
                                    f"--data_dir={data}"])
    pre = runner.preset(args)
    assert pre["matched_cells"] == [(2, 1), (8, 1)] and pre["seeds"] == [3] and pre["frozen_iters"] == 5
    pre = runner.preset(diversity.get_args(["--preset=cpu", f"--data_dir={data}"]), diversity.GRID)
    # its own grid, not the sweep's
    assert pre["streams"] == [1, 2, 4] and pre["max_iters"] == runner.load_presets()["cpu"]["diversity_iters"]
    pre = runner.preset(diversity.get_args(["--preset=cpu", "--max_iters=7", "--stream_counts=2", "--prefix_reparam=32",
                                            f"--data_dir={data}"]), diversity.GRID)
    assert (pre["max_iters"], pre["streams"], pre["reparam_hidden"]) == (7, [2], 32)


# -----------------------------------------------------------------------------
# the experiments, end to end

def test_sweep_runs_end_to_end_and_resumes_without_training(data, tmp_path, monkeypatch):
    argv = ["--preset=tiny", "--widths=8,16", "--stream_counts=1,4", f"--out_dir={tmp_path / 'out'}",
            f"--data_dir={data}", ONE_THREAD]
    first = sweep.main(argv)
    with open(tmp_path / "out" / "sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["width"], r["P"], r["status"]) for r in rows] == [(w, P, "trained") for w in ("8", "16")
                                                                  for P in ("1", "4")]
    n = {(r["width"], r["P"]): int(r["N"]) for r in rows}
    assert n[("8", "1")] < n[("8", "4")] < n[("16", "1")] < n[("16", "4")]  # N counts prefixes + aggregator
    assert first["fit"] is None  # 4 runs: too few for a 4-parameter fit
    assert os.path.isfile(tmp_path / "out" / "sweep" / "w8_p4" / "train.out")

    def no_training(argv, out_dir):
        raise AssertionError(f"a finished run was trained again: {argv}")
    monkeypatch.setattr(runner, "call_train", no_training)
    second = sweep.main(argv)
    assert second["val"] == first["val"]
    with open(tmp_path / "out" / "sweep.csv") as f:
        assert {r["status"] for r in csv.DictReader(f)} == {"done"}
    from_runs = sorted(zip(*fit.points_from(str(tmp_path / "out" / "sweep"))))  # fit --runs: a folder or the CSV
    from_csv = sorted(zip(*fit.points_from(str(tmp_path / "out" / "sweep.csv"))))
    assert [(n, p, round(v, 4)) for n, p, v in from_runs] == from_csv


def test_a_failed_run_says_why(tmp_path):
    with pytest.raises(UserError, match="prepare_data.py"):  # train.py's own error line
        runner.call_train([f"--data_dir={tmp_path / 'missing'}", f"--out_dir={tmp_path / 'out'}"],
                          str(tmp_path / "out"))


def test_dynamic_p_switches_kv_initialised_streams_on_an_untouched_backbone(data, tiny_base, tmp_path, monkeypatch):
    train_in_this_process(monkeypatch)
    out = tmp_path / "out"
    shutil.copytree(tiny_base, out / "base")
    result = dynamic.main(["--preset=tiny", "--stream_counts=2,4", f"--out_dir={out}", f"--data_dir={data}",
                           ONE_THREAD])
    assert set(result["val"]) == {1, 2, 4}
    base_ckpt = load_checkpoint(os.path.join(out, "base", "ckpt.pt"))
    assert result["val"][1] == round(runner.evals(out / "base")[-1]["val"], 4)
    for P in (2, 4):
        run = load_checkpoint(os.path.join(out, "dynamic", f"p{P}", "ckpt.pt"))
        assert run["args"]["prefix_init"] == "kv" and run["args"]["freeze_backbone"] and run["args"]["threads"] == 1
        for k, v in base_ckpt["model"].items():
            assert torch.equal(run["model"][k], v), k  # the frozen backbone never moved
        streams = load_checkpoint(os.path.join(out, "dynamic", f"p{P}", f"streams_p{P}.pt"))
        model = attach_streams(model_from(base_ckpt), streams)
        assert model.config.n_streams == P
        assert result["val"][P] == round(runner.evals(out / "dynamic" / f"p{P}")[-1]["val"], 4)


def test_gpu_sweep_dry_run_plans_ten_runs_within_four_minutes_without_a_gpu(data, tmp_path, capsys):
    result = sweep.main(["--preset=gpu", "--dry_run", f"--data_dir={data}", f"--out_dir={tmp_path / 'out'}"])
    printed = capsys.readouterr().out
    assert result["runs"] == 10 and result["estimated_s"] <= 4 * 60, result  # 3 widths x P in {1,2,4} + one noise run
    assert printed.count("python train.py") == 10 and "--n_embd=384" in printed and "--n_layer=6" in printed
    assert "sweep_noise/w256_p2_s2" in printed and "--seed=2" in printed
    assert not os.path.exists(tmp_path / "out")  # nothing ran


def test_the_noise_run_is_evaluated_again_on_the_first_seeds_batches(data, tmp_path, monkeypatch):
    """sweep's noise cell (the gpu preset's; tiny has none, to keep this file fast), without a process: the
    re-evaluation must resume the run at SEED, and the difference is taken on those batches."""
    args = sweep.get_args(["--preset=gpu", "--dry_run", f"--data_dir={data}", f"--out_dir={tmp_path / 'out'}"])
    pre = runner.preset(args)
    name, d, argv, width, P, seed = sweep.sweep_runs(pre, args)[-1]
    assert (name, width, P, seed) == ("w256_p2_s2", 256, 2, runner.NOISE_SEED) and f"--seed={seed}" in argv
    os.makedirs(d)
    with open(os.path.join(d, "log.jsonl"), "w") as f:
        f.write(json.dumps(dict(kind="eval", step=pre["max_iters"], train=2.0, val=1.9)) + "\n")
    calls = []

    def fake_eval(argv, out_dir):
        calls.append(argv)
        return 'step 360 ...\n{"train": 2.0, "val": 1.80126}\n'
    monkeypatch.setattr(runner, "call_train", fake_eval)
    row = sweep.noise_row(pre, args, [dict(width=256, P=2, val=1.81)], d, width, P)
    assert row == dict(width=256, P=2, seeds=[runner.SEED, runner.NOISE_SEED], val=[1.81, 1.8013], own_batches_val=1.9,
                       diff=0.0087)
    (argv,) = calls
    assert argv[-2:] == ["--init_from=resume", "--eval_only"]
    assert f"--seed={runner.SEED}" in argv and f"--out_dir={d}" in argv


def test_prefix_matched_writes_cells_runs_and_contrasts(data, tiny_base, tmp_path, monkeypatch):
    train_in_this_process(monkeypatch)
    out, results = tmp_path / "out", tmp_path / "results"
    shutil.copytree(tiny_base, out / "base")
    result = prefix_matched.main(["--preset=tiny", "--cells=2x1", "--seeds=1", f"--out_dir={out}", f"--data_dir={data}",
                                  f"--results={results}", ONE_THREAD])
    assert set(result["val"]) == {"1_0_-", "2_1_learned", "2_1_uniform"}
    with open(results / "prefix_matched_tiny.csv") as f:
        cells = list(csv.DictReader(f))
    assert list(cells[0]) == ["P", "n_prefix", "mix"] + noise.CELL_COLS
    by = {(c["P"], c["mix"]): c for c in cells}
    p1, learned, uniform = by[("1", "-")], by[("2", "learned")], by[("2", "uniform")]
    assert p1["rho"] == "" and p1["vs_p1"] == "" and p1["N"] == p1["N_no_agg"]
    for c in (learned, uniform):
        assert int(c["N_no_agg"]) < int(c["N"]) and int(c["N_no_agg"]) > int(p1["N"])  # prefixes, then the aggregator
        assert -1 <= float(c["rho"]) <= 1 and c["verdict"] in ("noise", "lower", "higher")
        assert abs(float(c["vs_p1"]) - (float(c["val"]) - float(p1["val"]))) < 2e-4  # one seed: the same batches
    with open(results / "prefix_matched_tiny.json") as f:
        saved = json.load(f)
    assert saved["noise_nats"] == noise.NOISE
    assert [c["contrast"] for c in saved["contrasts"]] == ["2x1 learned - uniform"]
    run = next(r for r in saved["runs"] if r.get("mix") == "uniform")
    assert abs(run["entropy"] - math.log(2)) < 1e-4 and len(run["curve"]) == 2  # a fixed 1/2, 1/2 mix; steps 0 and last
    ckpt = load_checkpoint(os.path.join(out, "prefix_matched", "p2_n1_uniform_s1", "ckpt.pt"))
    assert ckpt["model_args"]["agg_smoothing"] == 1.0 and ckpt["args"]["freeze_backbone"] and ckpt["args"]["seed"] == 1
    assert os.path.isfile(out / "prefix_matched.csv") and os.path.isfile(out / "prefix_matched.json")


def test_diversity_writes_its_table_and_plots_reads_it(data, tmp_path, capsys, monkeypatch):
    train_in_this_process(monkeypatch)
    out, results = tmp_path / "out", tmp_path / "results"
    diversity.main(["--preset=tiny", "--stream_counts=1,2", "--seeds=1", f"--out_dir={out}", f"--data_dir={data}",
                    f"--results={results}", ONE_THREAD])
    with open(results / "diversity_tiny.csv") as f:
        cells = {c["prefix"]: c for c in csv.DictReader(f)}
    assert set(cells) == {"none", "plain", "reparam"} and list(cells["none"]) == ["P", "prefix"] + noise.CELL_COLS
    assert cells["plain"]["N"] == cells["reparam"]["N"]  # the reparameterised checkpoint holds folded prefixes
    assert cells["none"]["N"] == cells["none"]["N_no_agg"] and cells["plain"]["stream_loss"] != ""
    with open(results / "diversity_tiny.json") as f:
        runs = {r["prefix"]: r for r in json.load(f)["runs"]}
    assert runs["reparam"]["reparam_params"] > 0 == runs["plain"]["reparam_params"]
    assert load_checkpoint(os.path.join(out, "diversity", "p2_reparam_s1", "ckpt.pt"))["args"]["prefix_reparam"] == 8
    capsys.readouterr()
    figure = plots.main(["--preset=tiny", f"--results={results}"])["figure"]
    printed = capsys.readouterr().out
    assert (figure is None and "matplotlib is not installed" in printed) or os.path.isfile(results / "pays_tiny.png")
    with pytest.raises(UserError, match="prefix_matched_cpu.json"):  # nothing for that preset
        plots.main(["--preset=cpu", f"--results={results}"])
