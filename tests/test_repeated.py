"""experiments/repeated.py: its verdicts on fixed numbers, its arms, its flags and its budget cuts, and the whole
flow once on the tiny preset (real train.py runs, a few arms and one seed a phase)."""
import json
import os

import pytest

from cli import UserError
from experiments import noise, repeated, runner
from util import train_in_this_process


def row(arm, seed, best, overfit=0.0, phase="confirm", rho=(), gap=0.5):
    curve = [dict(step=s, epoch=s / 10, rho=r) for s, r in zip(range(0, 10 * len(rho), 10), rho)]
    return dict(arm=arm, seed=seed, phase=phase, P=repeated.ARMS[arm][0], best_val=best, overfit=overfit, gap=gap,
                curve=curve)


def by(verdicts):
    return {v["hypothesis"].split(" ", 1)[1]: v for v in verdicts}


def test_verdicts_on_fixed_numbers():
    rows = []
    for seed, (p1, chosen, dropout, matched, law) in {3: (2.00, 1.95, 1.99, 2.00, 1.96),
                                                      4: (2.01, 1.97, 1.98, 2.02, 1.965),
                                                      5: (2.02, 1.96, 2.00, 2.01, 1.955)}.items():
        rows += [row("p1", seed, p1, overfit=0.08, gap=0.9),
                 row("p4_reparam", seed, chosen, overfit=0.03, gap=0.9 + 0.002 * (seed - 4),
                     rho=("", 0.95, 0.93, 0.90)),
                 row("p1_dropout", seed, dropout, overfit=0.02), row("p1_matched_p4", seed, matched),
                 row("p1_law_p4", seed, law)]
    v = by(repeated.verdicts(rows, "p4_reparam"))
    assert v["beats P = 1 (best val)"]["verdict"] == "holds"
    assert v["beats P = 1 (best val)"]["mean"] == pytest.approx(-0.05)
    assert v["overfits less than P = 1 (final - best val)"]["verdict"] == "holds"
    assert v["generalises better than P = 1 (final val - train)"]["verdict"] == "null: within noise"
    # -0.04, -0.01, -0.04: every seed lower, mean beyond noise
    assert v["beats P = 1 with dropout 0.1"]["verdict"] == "holds"
    assert v["beats the parameter-matched P = 1"]["verdict"] == "holds"
    # -0.01, +0.005, +0.005
    assert v["beats or matches the law-width P = 1"]["verdict"] == "holds (a match, within noise)"
    rho = v["rho falls with the epoch (last - first evaluation)"]
    assert rho["verdict"] == "holds" and rho["mean"] == pytest.approx(-0.05) and rho["seeds"] == 3


def test_a_null_and_a_refutation_are_said_as_such():
    rows = [row("p1", 3, 2.00), row("p2_plain", 3, 2.03), row("p1", 4, 2.00), row("p2_plain", 4, 2.01)]
    assert noise.judged("x", repeated.paired(rows, "p2_plain", "p1", "best_val", "confirm"))["verdict"] == "refuted"
    assert noise.judged("x", [0.05, -0.01])["verdict"] == "null: seeds disagree (the mean goes the other way)"
    assert noise.judged("x", [-0.03, 0.005])["verdict"] == "null: seeds disagree"
    assert noise.judged("x", [0.004, -0.002])["verdict"] == "null: within noise"
    assert noise.judged("x", [])["verdict"].startswith("not measured")


def test_the_choice_uses_only_the_exploration_seeds():
    rows = [row("p1", 1, 2.0, phase="explore"), row("p2_plain", 1, 1.99, phase="explore"),
            row("p4_reparam", 1, 1.95, phase="explore"),
            row("p1", 3, 2.0), row("p2_plain", 3, 1.5)]  # a confirmation seed that would change the choice
    chosen, scores = repeated.choose(rows)
    assert chosen == "p4_reparam" and scores["p2_plain"] == pytest.approx(-0.01)


def test_arms_share_a_run_when_their_model_is_the_same():
    pre = runner.load_presets()["cpu"]
    keys = {arm: repeated.run_key(pre, 256, arm) for arm in repeated.ARMS}
    assert keys["p1_matched_p2"] == keys["p1"] == (1, 64, ())  # at width 64, P = 2's N is closest to P = 1's own width
    assert keys["p1_law_p2"][1] == 72 and keys["p1_law_p4"][1] == 80  # N_base (1 + 0.39 ln P), whole heads of 8
    assert keys["p4_reparam"] == (4, 64, ("reparam",))
    assert repeated.run_name(keys["p1_dropout"], 3) == "p1_w64_dropout0.1_s3"


def test_over_budget_arms_are_cut_in_order_never_seeds(monkeypatch):
    pre = runner.load_presets()["cpu"]
    monkeypatch.setattr(repeated, "step_seconds", lambda cfg, pre, reparam: 0.1 * cfg.n_streams)
    full = repeated.plan(pre, 256, list(repeated.ARMS), jobs=2, budget_min=-1)[1]
    arms, est, cut, lines = repeated.plan(pre, 256, list(repeated.ARMS), jobs=2, budget_min=full - 1)
    assert cut == repeated.CUT_ORDER[:len(cut)] and cut and est <= full - 1
    assert "arms cut: " + ", ".join(cut) in lines[-1]
    assert all(a not in arms for a in cut) and "p1" in arms
    assert "still over the budget" in repeated.plan(pre, 256, list(repeated.ARMS), jobs=2, budget_min=1)[3][-1]
    assert repeated.plan(pre, 256, list(repeated.ARMS), jobs=2, budget_min=-1)[2] == []  # no budget, nothing cut


@pytest.mark.parametrize("flags, match", [
    (["--arms=p3"], "--arms: p3 is not an arm"),
    (["--explore_seeds=1,2", "--confirm_seeds=2,3"], "share a seed"),
    (["--jobs=0"], "--jobs=0: must be >= 1"),
    (["--budget_min=0"], "--budget_min=0"),
])
def test_bad_flags_are_one_named_error(flags, match, tmp_path):
    with pytest.raises(UserError, match=match):
        repeated.get_args(["--preset=tiny", f"--out_dir={tmp_path}", *flags])


def test_the_flow_end_to_end_on_the_tiny_preset(tmp_path, capsys, monkeypatch):
    train_in_this_process(monkeypatch)  # --jobs=1: one run at a time, in the main thread, as train.py wants
    args = ["--preset=tiny", f"--out_dir={tmp_path / 'out'}", f"--results={tmp_path / 'res'}", "--threads=1",
            "--jobs=1",
            "--arms=p2_plain,p1_dropout,p1_matched_p2,p1_law_p2", "--explore_seeds=1", "--confirm_seeds=2"]
    result = repeated.main(args)
    out = capsys.readouterr().out
    meta = json.load(open(tmp_path / "out" / "repeated" / "data_200" / "meta.json"))
    assert meta["train_tokens"] == 200 and meta["val_tokens"] > 200  # the training set capped, the validation set not
    assert result["chosen"] == "p2_plain" and result["epochs"] > 1
    phases = {(r["phase"], r["arm"]) for r in result["runs"]}
    assert ("confirm", "p2_plain") in phases and ("confirm", "p1_law_p2") in phases and ("explore", "p1") in phases
    assert all(r["seed"] == 2 for r in result["runs"] if r["phase"] == "confirm")
    for r in result["runs"]:
        assert r["best_val"] <= r["final_val"] and r["overfit"] >= 0 and r["curve"][-1]["epoch"] == result["epochs"]
    assert len(result["verdicts"]["confirm"]) == 7 and "verdicts, confirm seeds" in out
    for ext in ("json", "csv"):
        assert os.path.isfile(tmp_path / "res" / f"repeated_tiny.{ext}")
    again = repeated.main(args)  # a second command in the same --out trains nothing again
    assert again["verdicts"] == result["verdicts"] and " done" in capsys.readouterr().out
