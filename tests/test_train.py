"""train.py and sample.py end to end on a tiny byte-level corpus: learning, resume, interruption, errors."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from util import ROOT, assert_close

import sample
import train
from model import UserError, load_checkpoint

TINY = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=8", "--n_prefix=2",
        "--eval_iters=2", "--log_interval=5", "--device=cpu", "--warmup_iters=5",
        "--learning_rate=3e-3"]


def write_corpus(folder, tokenizer="bytes", vocab_size=256, n_bytes=20000):
    """A small, learnable byte corpus: Python-like lines with a counter in them."""
    os.makedirs(folder, exist_ok=True)
    text = "".join(f"def f{i % 97}(x):\n    return x * {i % 7} + {i % 13}\n" for i in range(n_bytes // 30))
    data = np.frombuffer(text.encode(), dtype=np.uint8).astype(np.uint16)
    cut = int(0.9 * len(data))
    data[:cut].tofile(os.path.join(folder, "train.bin"))
    data[cut:].tofile(os.path.join(folder, "val.bin"))
    with open(os.path.join(folder, "meta.json"), "w") as f:
        json.dump({"tokenizer": tokenizer, "vocab_size": vocab_size}, f)
    return str(folder)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("data"))


def run(data_dir, out_dir, *extra):
    train.main(TINY + [f"--data_dir={data_dir}", f"--out_dir={out_dir}", *extra])
    return load_checkpoint(os.path.join(out_dir, "ckpt.pt"))


def evals(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["kind"] == "eval"]


@pytest.mark.parametrize("P", [1, 3])
def test_short_run_lowers_loss_and_logs_stream_weights(data_dir, tmp_path, P):
    run(data_dir, tmp_path, "--max_iters=40", "--eval_interval=20", f"--n_streams={P}")
    ev = evals(tmp_path)
    assert [r["step"] for r in ev] == [0, 20, 40]
    assert ev[-1]["val"] < ev[0]["val"] - 1.0, ev
    if P > 1:
        w = ev[-1]["stream_weight"]
        assert len(w) == P and abs(sum(w) - 1) < 1e-3
        assert 0 < ev[-1]["stream_entropy"] <= np.log(P) + 1e-6


def test_resumed_run_equals_uninterrupted(data_dir, tmp_path):
    common = ["--n_streams=2", "--dropout=0.1", "--eval_interval=6", "--lr_decay_iters=12"]
    full = run(data_dir, tmp_path / "full", "--max_iters=12", *common)
    run(data_dir, tmp_path / "half", "--max_iters=6", *common)
    resumed = run(data_dir, tmp_path / "half", "--max_iters=12", "--init_from=resume", *common)
    assert resumed["iter_num"] == full["iter_num"] == 12
    for k, v in full["model"].items():
        assert_close(resumed["model"][k], v, atol=0, rtol=0, what=k)
    by_step = lambda rows: {r["step"]: r["val"] for r in rows}  # noqa: E731  (the resumed run re-evaluates step 6)
    assert by_step(evals(tmp_path / "full")) == by_step(evals(tmp_path / "half"))


def test_sigint_saves_a_checkpoint_that_resumes(data_dir, tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), *TINY, f"--data_dir={data_dir}", f"--out_dir={tmp_path}",
           "--max_iters=100000", "--eval_interval=100000", "--log_interval=1"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:  # wait until training is under way
        if line.startswith("step") and "|" in line:
            break
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "interrupted: saved step" in out
    ckpt = load_checkpoint(os.path.join(tmp_path, "ckpt.pt"))
    step = ckpt["iter_num"]
    assert step >= 1
    resumed = run(data_dir, tmp_path, f"--max_iters={step + 2}", "--eval_interval=100000", "--init_from=resume")
    assert resumed["iter_num"] == step + 2


def test_two_stage_and_frozen_backbone_through_train(data_dir, tmp_path, capsys):
    base = run(data_dir, tmp_path / "p1", "--max_iters=10", "--eval_interval=10", "--n_streams=1")
    conv = run(data_dir, tmp_path / "p3", "--max_iters=4", "--eval_interval=4", "--n_streams=3",
               f"--init_from={tmp_path / 'p1' / 'ckpt.pt'}", "--freeze_backbone")
    assert conv["model_args"]["n_streams"] == 3 and conv["args"]["freeze_backbone"]
    for k, v in base["model"].items():
        assert torch.equal(conv["model"][k], v), k  # frozen: the backbone never moved
    assert any("prefix" in k for k in conv["model"])
    streams = tmp_path / "p3" / "streams_p3.pt"  # dynamic P: backbone + the small streams file
    capsys.readouterr()
    train.main(TINY + [f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'eval'}", "--eval_only",
                       f"--init_from={tmp_path / 'p1' / 'ckpt.pt'}", f"--streams={streams}"])
    out = capsys.readouterr().out
    assert "P=3" in out and json.loads(out.strip().splitlines()[-1])["val"] == evals(tmp_path / "p3")[-1]["val"]
    with pytest.raises(UserError, match="P=3 checkpoint"):
        run(data_dir, tmp_path / "p2", "--max_iters=1", "--n_streams=2", f"--init_from={tmp_path / 'p3' / 'ckpt.pt'}")


def test_bad_inputs_get_named_errors(data_dir, tmp_path):
    with pytest.raises(UserError, match="prepare_data"):
        run(tmp_path / "nowhere", tmp_path / "o")
    small = write_corpus(tmp_path / "small", n_bytes=300)
    with pytest.raises(ValueError, match="block_size"):
        run(small, tmp_path / "o", "--block_size=64")
    with pytest.raises(UserError, match="no checkpoint"):
        run(data_dir, tmp_path / "empty", "--init_from=resume")
    os.makedirs(tmp_path / "bad")
    (tmp_path / "bad" / "ckpt.pt").write_bytes(os.urandom(1000))
    with pytest.raises(UserError, match="corrupt"):
        run(data_dir, tmp_path / "bad", "--init_from=resume")
    with pytest.raises(ValueError, match="n_embd"):
        run(data_dir, tmp_path / "o", "--n_embd=31")
    run(data_dir, tmp_path / "bytes", "--max_iters=2", "--eval_interval=2")
    gpt2 = write_corpus(tmp_path / "gpt2", tokenizer="gpt2", vocab_size=50257)
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        run(gpt2, tmp_path / "o", f"--init_from={tmp_path / 'bytes' / 'ckpt.pt'}")
    with pytest.raises(UserError, match="--batch_size must be >= 1"):
        train.get_args(["--batch_size=0"])


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(data_dir, tmp_path):
    run(data_dir, tmp_path, "--max_iters=4", "--eval_interval=2")
    path = os.path.join(tmp_path, "ckpt.pt")
    ckpt = load_checkpoint(path)
    ckpt["model"]["transformer.ln_f.weight"][0] = float("nan")  # poison, then resume from it
    torch.save(ckpt, path)
    before = open(path, "rb").read()
    with pytest.raises(UserError, match="non-finite"):
        run(data_dir, tmp_path, "--max_iters=8", "--eval_interval=2", "--init_from=resume")
    assert open(path, "rb").read() == before


def test_ddp_with_gloo_on_cpu(data_dir, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
           *TINY, f"--data_dir={data_dir}", f"--out_dir={tmp_path}", "--max_iters=3", "--eval_interval=3",
           "--gradient_accumulation_steps=2"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "DDP world 2" in res.stdout
    assert load_checkpoint(os.path.join(tmp_path, "ckpt.pt"))["iter_num"] == 3


def test_sample_from_checkpoint(data_dir, tmp_path, capsys):
    run(data_dir, tmp_path, "--max_iters=30", "--eval_interval=30", "--n_streams=2")
    capsys.readouterr()
    argv = [f"--out_dir={tmp_path}", "--start=def f", "--temperature=0", "--num_samples=2", "--max_new_tokens=20", "--device=cpu"]
    sample.main(argv)
    first = capsys.readouterr()
    sample.main(argv)
    second = capsys.readouterr()
    texts = first.out.split("---------------")
    assert first.out == second.out and texts[0].startswith("def f") and texts[0].strip() == texts[1].strip()
    assert "tokens/s" in first.err and "reference PyTorch with KV cache" in first.err
    with pytest.raises(UserError, match="no checkpoint"):
        sample.main([f"--out_dir={tmp_path / 'none'}"])
    gpt2 = write_corpus(tmp_path / "gpt2", tokenizer="gpt2", vocab_size=50257)
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        sample.main(argv + [f"--data_dir={gpt2}"])


def test_kv_prefix_init_starts_near_the_base_model(data_dir, tmp_path):
    """Two-stage with prefixes from the base model's own keys/values: no loss jump at conversion."""
    run(data_dir, tmp_path / "p1", "--max_iters=60", "--eval_interval=60", "--n_streams=1")
    base_val = evals(tmp_path / "p1")[-1]["val"]
    jumps = {}
    for init in ("random", "kv"):
        ck = run(data_dir, tmp_path / init, "--max_iters=1", "--eval_interval=1", "--n_streams=2", "--n_prefix=4",
                 f"--init_from={tmp_path / 'p1' / 'ckpt.pt'}", f"--prefix_init={init}")
        jumps[init] = evals(tmp_path / init)[0]["val"] - base_val
        assert torch.isfinite(ck["model"]["transformer.h.0.attn.prefix_k"]).all()
    assert jumps["kv"] < jumps["random"], jumps
