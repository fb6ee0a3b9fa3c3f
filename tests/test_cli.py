"""
The command lines of prepare_data.py, sample.py, bench.py and experiments/cost_sweep.py: a mistake the user
can fix ends as one `error: ...` line on stderr that names the flag, exit status 1, no traceback. Every CASES
entry is a real subprocess given a bad input that stops it before any real work (two at a time: each one spends
most of its ~1.5 s importing torch, so there are few). Below them, sample.py's flag checks in-process;
prepare_data.py's, bench.py's and cost_sweep.py's are in test_data.py, test_bench.py and test_cost_sweep.py (the
other experiments' in test_experiments.py).
"""
import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from util import HAS_CUDA, ROOT, tiny_config

import prepare_data
import sample
from checkpoint import streams_state
from cli import UserError
from model import GPT
from model_init import convert_to_streams

NO_MATPLOTLIB = importlib.util.find_spec("matplotlib") is None
BYTES_META = {"tokenizer": "bytes", "vocab_size": 256}

# id: (script, flags with {tmp} for the files below, what the error line must say; None = runs fine)
CASES = {
    # prepare_data.py
    "prepare-empty-file": ("prepare_data.py", ["--input={tmp}/empty.txt"], ["--input=", "empty.txt has no text"]),
    "prepare-gpt2-no-vocab": ("{tmp}/bare/prepare_data.py", ["--tokenizer=gpt2"],
                              ["GPT-2 vocabulary file not found", "--gpt2_vocab", "get_gpt2_vocab.sh"]),
    "prepare-not-utf8": ("prepare_data.py", ["--input={tmp}/latin1.txt"], ["--input", "latin1.txt is not valid UTF-8"]),
    # sample.py
    "sample-top-k-0": ("sample.py", ["--ckpt={tmp}/p1.pt", "--top_k=0"], ["--top_k must be >= 1"]),
    "sample-float16-on-cpu": ("sample.py", ["--ckpt={tmp}/p1.pt", "--device=cpu", "--dtype=float16"],
                              ["--dtype=float16 is for GPUs"]),
    "sample-streams-other-backbone": ("sample.py", ["--ckpt={tmp}/p1.pt", "--streams={tmp}/other_streams.pt",
                                                    "--device=cpu"], ["--streams=", "different backbone"]),
    "sample-corrupt-ckpt": ("sample.py", ["--ckpt={tmp}/latin1.txt", "--device=cpu"],
                            ["--ckpt", "corrupt or not a checkpoint"]),
    "sample-ok-long-prompt": ("sample.py", ["--ckpt={tmp}/p1.pt", "--device=cpu", "--start=" + "x" * 20,
                                            "--max_new_tokens=1", "--num_samples=1"], None),
    # bench.py (the lesson) and experiments/cost_sweep.py (the research sweep)
    "bench-batch": ("bench.py", ["--device=cpu", "--batch=0"], ["--batch must be >= 1"]),
    "cost-sweep-batches": ("experiments/cost_sweep.py", ["--device=cpu", "--batches=1,0"],
                           ["--batches: 1,0: expected comma-separated positive integers"]),
}
if NO_MATPLOTLIB:
    CASES["bench-plot-without-matplotlib"] = ("bench.py", ["--device=cpu", "--plot={tmp}/cost.png"],
                                              ["--plot=", "needs matplotlib"])
    CASES["cost-sweep-plot-without-matplotlib"] = ("experiments/cost_sweep.py",
                                                   ["--device=cpu", "--plot={tmp}/cost.png"],
                                                   ["--plot=", "needs matplotlib"])


def save_ckpt(path, model, meta=BYTES_META):
    """A checkpoint shaped like train.py's (the parts sample.py reads)."""
    torch.save(dict(model=model.state_dict(), model_args=dataclasses.asdict(model.config), meta=meta,
                    iter_num=0, args={}), path)


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    return GPT(tiny_config(**{**dict(block_size=16, vocab_size=256, n_layer=1, n_head=2, n_embd=16, n_prefix=2), **kw}))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Checkpoints, a streams file for them and one for another backbone, and bad inputs."""
    tmp = tmp_path_factory.mktemp("cli")
    p1 = tiny_model()
    save_ckpt(tmp / "p1.pt", p1)
    p2 = convert_to_streams(p1, 2)
    save_ckpt(tmp / "p2.pt", p2)
    torch.save(streams_state(p2), tmp / "streams.pt")
    torch.save(streams_state(convert_to_streams(tiny_model(seed=1), 2)), tmp / "other_streams.pt")
    (tmp / "empty.txt").write_text("")
    (tmp / "latin1.txt").write_bytes("café, naïve\n".encode("latin-1"))
    (tmp / "bad.json").mkdir()
    (tmp / "bad.json" / "meta.json").write_text("{not json")
    # prepare_data.py seen through a link in a folder without data/gpt2.tiktoken: its DATA_DIR is there
    (tmp / "bare").mkdir()
    os.symlink(os.path.join(ROOT, "prepare_data.py"), tmp / "bare" / "prepare_data.py")
    return tmp


def run_script(script, flags):
    env = {k: v for k, v in os.environ.items() if k != prepare_data.GPT2_VOCAB_ENV}
    path = script if os.path.isabs(script) else os.path.join(ROOT, script)
    return subprocess.run([sys.executable, path, *flags], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)


@pytest.fixture(scope="module")
def results(files):
    """Every CASES entry's CompletedProcess, run two at a time."""
    fill = lambda s: s.replace("{tmp}", str(files))  # noqa: E731
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(run_script, fill(script), [fill(f) for f in flags])
                   for name, (script, flags, _) in CASES.items()}
        return {name: f.result() for name, f in futures.items()}


@pytest.mark.parametrize("name", list(CASES))
def test_command_line(name, results):
    res, words = results[name], CASES[name][2]
    assert "Traceback" not in res.stderr, res.stderr
    if words is None:
        assert res.returncode == 0, res.stderr
        return
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == 1 and lines, (res.returncode, res.stderr)
    assert lines[-1].startswith("error: "), res.stderr
    for word in words:
        assert word in lines[-1], (word, lines[-1])


def test_long_prompt_is_said(results):
    err = results["sample-ok-long-prompt"].stderr
    assert "note: the prompt is 20 tokens, more than block_size 16: the model sees only its last 16" in err


# -----------------------------------------------------------------------------
# sample.py in-process: every flag check, and out-of-vocabulary ids

@pytest.mark.parametrize("flags, match", [
    (["--num_samples=0"], "--num_samples must be >= 1"),
    (["--max_new_tokens=0"], "--max_new_tokens must be >= 1"),
    (["--top_k=-2"], r"--top_k must be >= 1, or -1"),
    (["--temperature=-0.5"], "--temperature must be a finite number >= 0"),
    (["--temperature=inf"], "--temperature must be a finite number >= 0"),
    (["--device=tpu"], "--device=tpu is not a device"),
    (["--device=meta"], "--device=meta: sample.py runs on cpu, cuda, mps"),
    (["--start=FILE:{tmp}"], r"--start=FILE:.*: cannot read it"),
    (["--start=FILE:{tmp}/latin1.txt"], r"--start=FILE:.*latin1.txt is not valid UTF-8"),
    (["--start="], "--start is empty"),
    (["--ckpt={tmp}/streams.pt"], r"--ckpt: .*streams.pt is a streams file .* pass it as --streams"),
    (["--streams={tmp}/p1.pt"], r"--streams=.*p1.pt is a full checkpoint, not a streams_p\{P\}.pt file.* --ckpt"),
    (["--streams={tmp}/nope.pt"], r"--streams: no checkpoint at"),
    (["--data_dir={tmp}/bad.json"], r"--data_dir=.*meta.json is not readable JSON"),
    (["--data_dir={tmp}/gpt2"], r"--data_dir: vocabulary mismatch: the checkpoint was trained on bytes \(256\)"),
    (["--ckpt={tmp}/no_meta.pt"], r"--ckpt: the checkpoint records no tokenizer; pass --data_dir="),
    (["--ckpt={tmp}/p2.pt", "--streams={tmp}/streams.pt"],
     r"--streams attaches to a P=1 backbone, but --ckpt=.* holds a P=2"),
    (["--ckpt={tmp}/bad_args.pt"],
     r"--ckpt: checkpoint .*bad_args.pt: its model_args: n_kv_head \(3\) must divide n_head \(2\)"),
    (["--ckpt={tmp}/bad_weights.pt"], r"--ckpt: checkpoint .*bad_weights.pt: its weights do not fit its model_args"),
    (["--out_dir={tmp}/nowhere"], r"--out_dir: no checkpoint at .*nowhere/ckpt.pt"),
    (["--start=FILE:{tmp}/nope.txt"], r"--start=FILE:.*nope.txt: cannot read it \(No such file or directory\)"),
    (["--data_dir={tmp}"], r"--data_dir=.* has no meta.json: run python prepare_data.py"),
    pytest.param(["--device=cuda"],
                 r"--device=cuda, but this torch .* sees no CUDA GPU \(torch.cuda.is_available\(\) is False\)",
                 marks=pytest.mark.skipif(HAS_CUDA, reason="a GPU is here")),
])
def test_sample_flag_errors(flags, match, files):
    if not (files / "no_meta.pt").exists():
        save_ckpt(files / "no_meta.pt", tiny_model(), meta=None)  # as nanoGPT's: no tokenizer recorded
        model = tiny_model()
        torch.save(dict(model=model.state_dict(), model_args={**dataclasses.asdict(model.config), "n_kv_head": 3},
                        meta=BYTES_META), files / "bad_args.pt")  # a config model.py refuses
        torch.save(dict(model=model.state_dict(), model_args={**dataclasses.asdict(model.config), "n_layer": 2},
                        meta=BYTES_META), files / "bad_weights.pt")  # weights of another shape
        (files / "gpt2").mkdir()
        (files / "gpt2" / "meta.json").write_text(json.dumps({"tokenizer": "gpt2", "vocab_size": 50257}))
    flags = [f.replace("{tmp}", str(files)) for f in flags]
    ckpt = [] if any(f.startswith(("--ckpt", "--out_dir")) for f in flags) else [f"--ckpt={files / 'p1.pt'}"]
    device = [] if any(f.startswith("--device") for f in flags) else ["--device=cpu"]
    with pytest.raises(UserError, match=match) as e:
        sample.main([*ckpt, *device, "--max_new_tokens=1", *flags])
    assert "\n" not in str(e.value)


def test_sample_drops_ids_past_the_vocabulary_and_says_so(tmp_path, capsys):
    # a bytes model whose vocabulary is padded to 320: make the padding rows always win, greedily
    model = tiny_model(vocab_size=320)
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.fill_(1.0)  # every final hidden state is all ones
        model.lm_head.weight.zero_()
        model.lm_head.weight[256:] = 1.0  # so the padding rows' logits are n_embd, the bytes' 0
    save_ckpt(tmp_path / "padded.pt", model)
    sample.main([f"--ckpt={tmp_path / 'padded.pt'}", "--device=cpu", "--start=hi", "--temperature=0",
                 "--num_samples=2", "--max_new_tokens=3"])
    out, err = capsys.readouterr()
    assert out.split("---------------\n")[:2] == ["hi\n", "hi\n"]  # the prompt, and nothing decoded after it
    assert "note: 6 sampled ids were past the tokenizer's vocabulary (256, the model's 320)" in err
