"""scripts/scaling.py: the law fitter against known answers, and the sweep / dynamic-P flows end to end on tiny shapes
(each run is a train.py process, ~2 s to start: the grids here are cut to a few runs)."""
import csv
import math
import os
import sys

import pytest
import torch
from test_train import write_corpus
from util import ROOT

sys.path.insert(0, os.path.join(ROOT, "scripts"))
import scaling  # noqa: E402

from model import attach_streams, load_checkpoint, model_from_checkpoint  # noqa: E402

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
    with pytest.raises(SystemExit, match="prepare_data.py"):  # the tail of train.out
        scaling.call_train([f"--data_dir={tmp_path / 'missing'}", f"--out_dir={tmp_path / 'out'}"], str(tmp_path / "out"))


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
