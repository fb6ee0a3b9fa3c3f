"""train.py and sample.py end to end on a tiny byte-level corpus: learning, resume, interruption, errors."""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from util import ROOT, assert_close

import sample
import train
from checkpoint import load_checkpoint, streams_state
from cli import UserError
from model import GPT, GPTConfig
from model_init import convert_to_streams

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
    run(data_dir, tmp_path, "--max_iters=40", "--eval_interval=20", f"--n_streams={P}", "--peak_flops=1e12")
    ev = evals(tmp_path)
    with open(os.path.join(tmp_path, "log.jsonl")) as f:
        # counts.estimate_mfu against the given peak
        assert all(r["mfu"] > 0 for r in map(json.loads, f) if r["kind"] == "train")
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
    assert "interrupted: saved step" in out and "\r" not in out  # not a terminal: plain lines, no progress bar
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


# -----------------------------------------------------------------------------
# mistakes a user can fix: a UserError naming the flag or file, one `error:` line, nothing written

@pytest.fixture(scope="module")
def p1_ckpt(data_dir, tmp_path_factory):
    """A P=1 checkpoint (2 steps) for the tests that start from one."""
    out = tmp_path_factory.mktemp("p1")
    run(data_dir, out, "--max_iters=2", "--eval_interval=2", "--n_streams=1")
    return str(out / "ckpt.pt")


def save_model(path, **config):
    """A checkpoint of an untrained model with TINY's shape, as the model API alone writes it."""
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=256, n_prefix=2, **config)
    torch.save(dict(model=GPT(cfg).state_dict(), model_args=vars(cfg)), path)
    return str(path)


@pytest.mark.parametrize("flag, message", [
    ("--batch_size=0", "--batch_size must be >= 1, got 0"),
    ("--eval_iters=0", "--eval_iters must be >= 1"),
    ("--gradient_accumulation_steps=0", "--gradient_accumulation_steps must be >= 1"),
    ("--max_iters=-1", "--max_iters must be >= 0"),
    ("--learning_rate=0", "--learning_rate must be > 0"),
    ("--learning_rate=-1e-3", "--learning_rate must be > 0"),
    ("--min_lr=1", r"--min_lr \(1.0\) must not exceed --learning_rate"),
    ("--grad_clip=-1", "--grad_clip must be >= 0"),
    ("--weight_decay=-0.1", "--weight_decay must be >= 0"),
    ("--dropout=-0.1", r"dropout must be in \[0, 1\)"),
    ("--beta2=1", r"--beta1 and --beta2 must be in \[0, 1\)"),
    ("--threads=0", "--threads must be -1 or > 0"),
    ("--peak_flops=0", "--peak_flops must be -1 or > 0"),
    ("--seed=-1", "--seed must be >= 0"),
    ("--bias=2", "--bias must be 1"),
    # the model's own fields: model.py's rules (GPTConfig), named by the field, which is the flag's name
    ("--n_embd=31", r"the model flags: n_embd \(31\) must be divisible by n_head \(2\)"),
    ("--n_kv_head=3", r"the model flags: n_kv_head \(3\) must divide n_head \(2\)"),
    ("--n_kv_head=-1", r"the model flags: n_kv_head must be a positive integer, got -1"),  # left out = n_head
    ("--n_prefix=0", "the model flags: n_prefix must be >= 1 at n_streams=2, got 0"),
    ("--agg_smoothing=2", r"the model flags: agg_smoothing must be in \[0, 1\]"),
    ("--dropout=1", r"the model flags: dropout must be in \[0, 1\)"),
    ("--n_layer=0", "the model flags: n_layer must be a positive integer, got 0"),
    ("--prefix_init_std=-1", "the model flags: prefix_init_std must be >= 0"),
    ("--streams=s.pt", "--streams attaches streams to a P=1 backbone"),
    ("--prefix_init=kv", "--prefix_init=kv takes the prefixes from a trained P=1 model"),
    ("--prefix_reparam=8 --prefix_init=kv", "--prefix_init=kv sets plain prefixes, --prefix_reparam makes them"),
])
def test_bad_flag_values_are_refused_where_parsed(flag, message):
    with pytest.raises(UserError, match=message):
        train.get_args(TINY + flag.split())


def test_argparse_complaints_are_one_error_line_too(tmp_path):
    with pytest.raises(UserError, match=r"argument --batch_size: invalid int value: 'abc'; see .* --help"):
        train.get_args(["--batch_size=abc"])
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="is a file, not a folder"):
        train.get_args([f"--out_dir={tmp_path / 'file'}"])


@pytest.mark.parametrize("flag, message", [
    ("--device=tpu", "--device=tpu is not a device"),
    ("--device=cuda:x", "--device=cuda:x is not a device"),
    ("--dtype=float16", "--dtype=float16 is for GPUs"),
    pytest.param("--device=cuda", "--device=cuda, but this torch .* sees no CUDA GPU",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")),
    pytest.param("--device=mps", "--device=mps, but MPS is not available",
                 marks=pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has MPS")),
])
def test_devices_and_dtypes_this_machine_lacks_are_refused(data_dir, tmp_path, flag, message):
    with pytest.raises(UserError, match=message):
        run(data_dir, tmp_path / "o", flag)
    assert not os.path.exists(tmp_path / "o")


def test_data_mistakes_are_named(tmp_path):
    with pytest.raises(UserError, match="does not exist: run python prepare_data.py"):
        run(tmp_path / "nowhere", tmp_path / "o")
    for missing in ("meta.json", "train.bin", "val.bin"):
        folder = write_corpus(tmp_path / f"no_{missing}")
        os.remove(os.path.join(folder, missing))
        with pytest.raises(UserError, match=f"has no {missing}: run python prepare_data.py"):
            run(folder, tmp_path / "o")
    folder = write_corpus(tmp_path / "bad_meta")
    (tmp_path / "bad_meta" / "meta.json").write_text("{not json")
    with pytest.raises(UserError, match="meta.json is not readable JSON"):
        run(folder, tmp_path / "o")
    (tmp_path / "bad_meta" / "meta.json").write_text('{"tokenizer": "bytes"}')
    with pytest.raises(UserError, match="lacks a 'tokenizer' or a positive integer 'vocab_size'"):
        run(folder, tmp_path / "o")
    small = write_corpus(tmp_path / "small", n_bytes=300)
    with pytest.raises(UserError, match=r"fewer than --block_size \+ 1 = 65: lower --block_size"):
        run(small, tmp_path / "o", "--block_size=64")
    assert not os.path.exists(tmp_path / "o")


def test_checkpoint_mistakes_are_named(data_dir, tmp_path, p1_ckpt):
    with pytest.raises(UserError, match="--init_from=resume: no checkpoint at .*empty/ckpt.pt"):
        run(data_dir, tmp_path / "empty", "--init_from=resume")
    with pytest.raises(UserError, match="--init_from=.*nope.pt: no checkpoint at"):
        run(data_dir, tmp_path / "o", f"--init_from={tmp_path / 'nope.pt'}")
    os.makedirs(tmp_path / "bad")
    (tmp_path / "bad" / "ckpt.pt").write_bytes(os.urandom(1000))
    with pytest.raises(UserError, match="corrupt"):
        run(data_dir, tmp_path / "bad", "--init_from=resume")
    os.makedirs(tmp_path / "api")
    p2 = save_model(tmp_path / "api" / "ckpt.pt", n_streams=2)  # weights only: no optimizer state to resume
    with pytest.raises(UserError, match="not a train.py checkpoint that can resume"):
        run(data_dir, tmp_path / "api", "--init_from=resume")
    gpt2 = write_corpus(tmp_path / "gpt2", tokenizer="gpt2", vocab_size=50257)
    with pytest.raises(UserError, match="vocabulary mismatch"):
        run(gpt2, tmp_path / "o", f"--init_from={p1_ckpt}")
    with pytest.raises(UserError, match="--block_size=64 exceeds the checkpoint's block_size 32"):
        run(data_dir, tmp_path / "o", f"--init_from={p1_ckpt}", "--block_size=64")
    with pytest.raises(UserError, match="--freeze_backbone trains only the prefixes"):
        run(data_dir, tmp_path / "o", f"--init_from={p1_ckpt}", "--n_streams=1", "--freeze_backbone")
    with pytest.raises(UserError, match="--prefix_init=kv sets the prefixes of a P=1 checkpoint converted"):
        run(data_dir, tmp_path / "o", f"--init_from={p1_ckpt}", "--n_streams=1", "--prefix_init=kv")
    with pytest.raises(UserError, match="--streams attaches to a P=1 backbone, but --init_from=.* holds a P=2 model"):
        run(data_dir, tmp_path / "o", f"--init_from={p2}", f"--streams={p1_ckpt}")
    with pytest.raises(UserError, match="is a full checkpoint, not a streams_p"):
        run(data_dir, tmp_path / "o", f"--init_from={p1_ckpt}", f"--streams={p1_ckpt}")
    other = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=256))  # right shape, other weights
    torch.save(streams_state(convert_to_streams(other, 2, n_prefix=2)), tmp_path / "streams_p2.pt")
    with pytest.raises(UserError, match="--streams=.*streams_p2.pt: these streams were trained on "
                                        "a different backbone"):
        run(data_dir, tmp_path / "o", f"--init_from={p1_ckpt}", f"--streams={tmp_path / 'streams_p2.pt'}")
    assert not os.path.exists(tmp_path / "o")


def test_a_refused_run_leaves_out_dir_as_it_was(data_dir, tmp_path):
    run(data_dir, tmp_path, "--max_iters=2", "--eval_interval=2")
    before = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}
    assert {"ckpt.pt", "log.jsonl"} <= set(before)
    small = write_corpus(tmp_path.parent / f"{tmp_path.name}_small", n_bytes=300)
    refusals = [  # each found only after the model is built or the checkpoint read
        ([f"--data_dir={small}", "--block_size=64"], "fewer than --block_size"),
        (["--init_from=resume", "--block_size=64"], "exceeds the checkpoint's block_size"),
        (["--n_streams=1", "--freeze_backbone"], "--freeze_backbone"),
        (["--dtype=float16"], "float16"),
    ]
    for flags, message in refusals:
        with pytest.raises(UserError, match=message):
            train.main(TINY + [f"--data_dir={data_dir}", f"--out_dir={tmp_path}", "--max_iters=4", *flags])
        assert {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)} == before, flags


@pytest.mark.parametrize("flag, start", [("--batch_size=0", "error: --batch_size must be >= 1, got 0\n"),
                                         ("--data_dir={tmp}/nowhere", "error: --data_dir=")])
def test_the_command_line_prints_one_error_line(tmp_path, flag, start):
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), *TINY, f"--out_dir={tmp_path / 'o'}",
           flag.format(tmp=tmp_path)]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and res.stdout == "", res.stdout + res.stderr
    assert res.stderr.startswith(start) and res.stderr.count("\n") == 1, res.stderr  # no traceback, no usage text
    assert not os.path.exists(tmp_path / "o")


def test_a_checkpoint_overrides_given_shape_flags_and_says_so(data_dir, tmp_path, p1_ckpt, capsys):
    capsys.readouterr()
    argv = TINY + [f"--data_dir={data_dir}", f"--out_dir={tmp_path}", "--eval_only", "--n_layer=3", "--n_embd=64"]
    train.main(argv + [f"--init_from={p1_ckpt}", "--n_streams=1"])
    assert [line for line in capsys.readouterr().out.splitlines() if "overrides" in line] == [
        "the checkpoint overrides --n_layer=3 -> 2, --n_embd=64 -> 32"]
    train.main(argv + ["--init_from=resume", f"--out_dir={os.path.dirname(p1_ckpt)}"])  # resume overrides too
    assert "the checkpoint overrides --n_layer=3 -> 2, --n_embd=64 -> 32\n" in capsys.readouterr().out
    # flags left out take the checkpoint's values silently: the default --block_size=128 is no error here
    train.main([f"--data_dir={data_dir}", f"--out_dir={tmp_path}", "--eval_only", "--eval_iters=1", "--device=cpu",
                f"--init_from={p1_ckpt}", "--n_streams=1"])
    out = capsys.readouterr().out
    assert "overrides" not in out and "2 layers" in out and "block 32" in out


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
    argv = [f"--out_dir={tmp_path}", "--start=def f", "--temperature=0", "--num_samples=2", "--max_new_tokens=20",
            "--device=cpu"]
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


def test_smoothing_defaults_to_the_papers_and_the_official_codes_is_one_flag_away(data_dir, tmp_path):
    args, _ = train.get_args(TINY)
    assert train.model_fields(args)["agg_smoothing"] == 0.1  # arXiv 2505.10475's text
    ck = run(data_dir, tmp_path, "--max_iters=1", "--eval_interval=1", "--agg_smoothing=0.01")
    assert ck["model_args"]["agg_smoothing"] == 0.01 and ck["args"]["agg_smoothing"] == 0.01


def test_args_are_read_never_written(data_dir, tmp_path, p1_ckpt):
    """A run from a checkpoint that overrides typed flags, converts P and resumes: args stays as parsed."""
    for extra in ([f"--init_from={p1_ckpt}", "--n_layer=3", "--lr_decay_iters=-1"],
                  ["--init_from=resume", f"--out_dir={os.path.dirname(p1_ckpt)}", "--n_embd=64"]):
        args, typed = train.get_args(TINY + [f"--data_dir={data_dir}", f"--out_dir={tmp_path}", "--eval_only", *extra])
        before = dict(vars(args))
        train.run(args, typed)
        assert vars(args) == before
