"""experiments/depth.py: its claims and verdicts on fixed numbers, its budget cuts, its flags, and the whole flow once
on a one-point tiny grid (real train.py runs: one seed a phase), whose control run also shows that the prefix-only
control is one stream: its two streams' prefixes stay equal through training and the mix is either stream."""
import json
import os

import pytest
import torch
from test_train import write_corpus
from util import assert_close, model_from, train_in_this_process

from checkpoint import load_checkpoint
from cli import UserError
from experiments import depth, runner

GRID = [(2, 2), (2, 48), (8, 2), (8, 48)]


def fixed_rows():
    """Runs on a 2 x 2 grid: exploration seeds 1, 2 everywhere; confirmation seeds 3, 4, 5 where two claims need."""
    p1 = {(2, 1): 2.00, (2, 2): 2.02, (8, 1): 1.90, (8, 2): 1.91,
          (2, 3): 2.01, (2, 4): 2.00, (2, 5): 2.03, (8, 3): 1.92, (8, 4): 1.90, (8, 5): 1.91}
    gap = {(2, 2): (0.06, 0.05), (2, 48): (0.10, 0.12, 0.10, 0.11, 0.09), (8, 2): (0.02, 0.01),
           (8, 48): (0.04, 0.05, 0.04, 0.05, 0.06)}
    ctl = {(2, 2): (0.03, 0.02), (2, 48): (0.09, 0.10, -0.02, -0.03, -0.015), (8, 2): (0.0, 0.005),
           (8, 48): (0.02, 0.03)}  # control - P = 1
    rows = [dict(phase="explore" if s < 3 else "confirm", arm="p1", layers=L, slots=0, seed=s, val=v)
            for (L, s), v in p1.items()]
    for arm, table in (("p4", gap), ("ctl", ctl)):
        for (L, S), ds in table.items():
            rows += [dict(phase="explore" if s < 3 else "confirm", arm=arm, layers=L, slots=S, seed=s,
                          val=p1[L, s] + d) for s, d in enumerate(ds, 1)]
    return rows


def test_the_claims_are_chosen_on_the_exploration_seeds_and_judged_on_the_fresh_ones():
    rows = fixed_rows()
    chosen, best = depth.choose(rows, GRID, 2)
    # control - P = 1 is largest at 2 layers, 48 slots (+0.095); the gap falls most with depth at 48 slots
    # (-0.065); at 2 layers it grows with slots (+0.055); P = 4 does best at 8 layers, 2 slots, still +0.015
    assert [(c["claim"], c["at"]) for c in chosen] == [("control", "2 layers, 48 slots"),
                                                       ("depth", "2 -> 8 layers, 48 slots")]
    assert best["slots"]["explore_mean"] == pytest.approx(0.055) and best["beats"]["points"] == ((8, 2),)
    assert best["beats"]["explore_mean"] == pytest.approx(0.015)
    explore_only = [r for r in rows if r["phase"] == "explore"]
    assert depth.choose(explore_only, GRID, 2) == (chosen, best)  # the fresh seeds play no part in the choice
    v = {x["claim"]: x for x in depth.verdicts(rows, chosen, best)}
    # gap(8 layers) - gap(2 layers) at 48 slots: -0.06, -0.06, -0.03 on seeds 3, 4, 5
    assert v["depth"]["verdict"] == "confirmed" and v["depth"]["seeds"] == 3
    assert v["depth"]["mean"] == pytest.approx(-0.05) and (v["depth"]["min"], v["depth"]["max"]) == (-0.06, -0.03)
    assert v["depth"]["explore"] == "leans yes: -0.0650 [-0.0700, -0.0600], 2 seeds"
    # control - P = 1: +0.09, +0.10 on the exploration seeds, then -0.02, -0.03, -0.015: refuted
    assert v["control"]["verdict"] == "refuted" and v["control"]["mean"] == pytest.approx(-0.0217, abs=1e-4)
    for claim in ("slots", "beats"):
        assert v[claim]["verdict"].startswith("null: not taken to fresh seeds") and v[claim]["seeds"] == 0
    assert v["beats"]["explore"].startswith("leans no: +0.0150")
    assert depth.choose(rows, GRID, 0)[0] == []
    confirm = depth.readings(rows, GRID, "confirm")
    assert [(r["claim"], r["at"]) for r in confirm] == [
        ("depth", "2 -> 8 layers, 48 slots"), ("control", "2 layers, 48 slots"), ("beats", "2 layers, 48 slots"),
        ("beats", "8 layers, 48 slots")]


def test_a_claim_with_disagreeing_fresh_seeds_is_a_null_and_a_missing_one_is_said():
    rows = [r for r in fixed_rows() if not (r["phase"] == "confirm" and r["arm"] == "ctl" and r["seed"] == 3)]
    rows.append(dict(phase="confirm", arm="ctl", layers=2, slots=48, seed=3, val=2.01 + 0.01))  # +0.01, -0.03, -0.015
    chosen, best = depth.choose(rows, GRID, 2)
    control = {x["claim"]: x for x in depth.verdicts(rows, chosen, best)}["control"]
    assert control["verdict"] == "null: seeds disagree (the mean goes the other way)"
    one_depth = [r for r in rows if r["layers"] == 2]
    chosen, best = depth.choose(one_depth, [(2, 2), (2, 48)], 2)
    v = {x["claim"]: x for x in depth.verdicts(one_depth, chosen, best)}
    assert v["depth"]["verdict"] == "not measured (the grid lacks it)" and "depth" not in best


def test_instances_and_the_runs_each_needs():
    inst = depth.instances(GRID)
    assert [i["claim"] for i in inst].count("depth") == 2 and [i["claim"] for i in inst].count("beats") == 4
    assert len(inst) == 12 and len(depth.runs_at(GRID)) == 10  # P = 1 once per depth: it has no prefix
    control = next(i for i in inst if i["claim"] == "control" and i["points"] == ((8, 48),))
    assert depth.needs(control) == {("p1", 8, 0), ("p4", 8, 48), ("ctl", 8, 48)}
    slots = next(i for i in inst if i["claim"] == "slots" and i["at"] == "8 layers, 2 -> 48 slots")
    assert depth.needs(slots) == {("p1", 8, 0), ("p4", 8, 2), ("p4", 8, 48)}


def test_over_budget_points_are_cut_costliest_first_never_seeds(monkeypatch):
    pre = dict(runner.load_presets()["cpu"])
    monkeypatch.setattr(runner, "step_seconds",
                        lambda cfg, batch: 0.01 * cfg.n_streams * cfg.n_layer * (1 + cfg.n_prefix / cfg.block_size))
    full = depth.plan(pre, 256, GRID, jobs=2, budget_min=-1, n_claims=2)
    assert full[2] == [] and full[0] == GRID
    kept, est, cut, cost, lines = depth.plan(pre, 256, GRID, jobs=2, budget_min=full[1] - 1, n_claims=2)
    assert cut == [(8, 48)] and est <= full[1] - 1 and kept == [(2, 2), (2, 48), (8, 2)]
    assert "points cut: (8, 48)" in lines[-1] and "2 exploration seeds" in lines[-1] and "3 confirmation" in lines[-1]
    kept, est, cut, cost, lines = depth.plan(pre, 256, GRID, jobs=2, budget_min=0.001, n_claims=2)
    assert len(kept) == 3 and "still over the budget" in lines[-1]  # both contrasts keep a pair of points
    assert depth.makespan([5, 4, 3, 3], 2) == 8 and depth.makespan([5, 4, 3, 3], 1) == 15


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("data"))


@pytest.mark.parametrize("flags, match", [
    (["--claims=5"], "--claims=5: must be 0 to 4"),
    (["--explore_seeds=1,2", "--confirm_seeds=2,3"], "share a seed"),
    (["--preset=gpu", "--device=cpu"], "--preset=gpu: presets.json gives depth.py no grid"),
    (["--depth_width=30"], "--depth_width=30: must be a multiple of the preset's n_head"),
    (["--slots=0"], "--slots: 0: expected comma-separated positive"),
    (["--budget_min=0"], "--budget_min=0"),
])
def test_bad_flags_are_one_named_error(flags, match, data, tmp_path):
    with pytest.raises(UserError, match=match):
        depth.get_args([f"--data_dir={data}", "--preset=cpu", f"--out_dir={tmp_path}", *flags])


def test_the_flow_end_to_end_on_a_tiny_grid_and_the_control_is_one_stream(data, tmp_path, capsys, monkeypatch):
    train_in_this_process(monkeypatch)  # --jobs=1: one run at a time, in this thread
    args = ["--jobs=1", "--preset=tiny", f"--data_dir={data}", f"--out_dir={tmp_path / 'out'}",
            f"--results={tmp_path / 'res'}", "--threads=1", "--layers=1", "--slots=2", "--explore_seeds=1", "--confirm_seeds=2"]
    result = depth.main(args)
    out = capsys.readouterr().out
    assert result["points"] == [(1, 2)] and result["cut"] == []
    assert {c["claim"] for c in result["chosen"]} == {"control", "beats"}  # the only claims one point can read
    v = {x["claim"]: x for x in result["verdicts"]}
    assert v["depth"]["verdict"].startswith("not measured") and v["slots"]["verdict"].startswith("not measured")
    assert v["control"]["seeds"] == 1 and v["control"]["verdict"] in ("confirmed", "refuted", "null: within noise")
    assert [(p["phase"], p["seeds"]) for p in result["point_table"]] == [("explore", 1), ("confirm", 1)]
    assert result["point_table"][0]["slots_pct"] == 12.5 and "verdicts (confirmed / refuted" in out
    assert result["control_max_kl"] == 0.0
    saved = json.load(open(tmp_path / "res" / "depth_tiny.json"))
    p1 = next(r for r in saved["runs"] if r["arm"] == "p1" and r["phase"] == "explore")
    assert [c["step"] for c in p1["curve"]] == [0, 1, 2, 3, 4, 5]  # an evaluation every fifth of the 5 steps
    assert p1["last20"] == pytest.approx(p1["curve"][-2]["val"] - p1["curve"][-1]["val"], abs=1e-4)  # step 4 - 5
    assert {(r["phase"], r["arm"], r["seed"]) for r in saved["runs"]} == {
        (phase, arm, seed) for phase, seed in (("explore", 1), ("confirm", 2)) for arm in ("p1", "p4", "ctl")}
    assert os.path.isfile(tmp_path / "res" / "depth_tiny.csv")

    # the control: two streams that started equal (zero) under an exactly uniform mix are still equal, though
    # training moved them, and the model's output is either stream's; P = 4's streams differ
    ctl = load_checkpoint(str(tmp_path / "out" / "depth" / "ctl_L1_S2_s1" / "ckpt.pt"))
    p4 = load_checkpoint(str(tmp_path / "out" / "depth" / "p4_L1_S2_s1" / "ckpt.pt"))
    for name in ("prefix_k", "prefix_v"):
        prefix = ctl["model"][f"transformer.h.0.attn.{name}"]
        assert torch.equal(prefix[0], prefix[1]) and prefix.abs().max() > 0
        assert not torch.equal(p4["model"][f"transformer.h.0.attn.{name}"][0],
                               p4["model"][f"transformer.h.0.attn.{name}"][1])
    model = model_from(ctl).eval()
    x = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, _, per_stream = model(x, x, streams=True)
    assert_close(per_stream[0], per_stream[1], atol=0, rtol=0, what="the control's two streams")
    assert_close(logits, per_stream[0], atol=1e-6, rtol=1e-6, what="the control's mix against one stream")
    last = runner.evals(str(tmp_path / "out" / "depth" / "ctl_L1_S2_s1"))[-1]
    assert abs(last["kl"]) < 1e-6 and abs(last["gain"]) < 1e-6 and last["stream_weight"] == [0.5, 0.5]

    again = depth.main(args)  # the same command again trains nothing
    assert again["verdicts"] == result["verdicts"] and " done" in capsys.readouterr().out
