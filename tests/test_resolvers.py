"""machine.py and cli.py: the one resolver each for device, dtype and meta.json that every entry point uses."""
import json

import pytest
import torch
from util import HAS_CUDA

import cli
import machine
from cli import UserError


def test_cpu_dtype_follows_the_probe():
    fast_bf16 = machine.choose_cpu_dtype(probe=lambda dtype: 0.2 if dtype == torch.bfloat16 else 0.5)
    slow_bf16 = machine.choose_cpu_dtype(probe=lambda dtype: 3.0 if dtype == torch.bfloat16 else 0.5)
    assert fast_bf16[0] == torch.bfloat16 and "0.20 ms in bf16, 0.50 ms in fp32" in fast_bf16[1]
    assert slow_bf16[0] == torch.float32 and slow_bf16[1].startswith("fp32")


def test_the_dtype_rule_is_the_entry_points_and_a_flag_overrides_it(monkeypatch):
    monkeypatch.setattr(machine, "choose_cpu_dtype", lambda: (torch.bfloat16, "probed"))
    assert machine.resolve_dtype("auto", "cpu", cpu_auto="probe") == (torch.bfloat16, "probed")  # bench.py
    assert machine.resolve_dtype("auto", "cpu")[0] == torch.float32  # train.py, sample.py
    monkeypatch.setattr(machine, "choose_cpu_dtype", lambda: pytest.fail("--dtype given: no probe"))
    assert machine.resolve_dtype("float32", "cpu", cpu_auto="probe") == (torch.float32, "float32 (--dtype)")
    with pytest.raises(UserError, match="--dtype=float16 is for GPUs: on cpu"):
        machine.resolve_dtype("float16", "cpu")


@pytest.mark.parametrize("name, allowed, match", [
    ("tpu", ("cpu", "cuda", "mps"), "--device=tpu is not a device: use auto, cpu, cuda, mps"),
    ("mps", ("cpu", "cuda"), "--device=mps: bench.py runs on cpu, cuda"),
    pytest.param("cuda", ("cpu", "cuda"),
                 r"--device=cuda, but this torch .* sees no CUDA GPU \(torch.cuda.is_available\(\) is False\)",
                 marks=pytest.mark.skipif(HAS_CUDA, reason="this machine has a GPU")),
])
def test_devices_a_machine_or_a_script_lacks_are_refused(name, allowed, match):
    with pytest.raises(UserError, match=match):
        machine.resolve_device(name, allowed, who="bench.py")
    assert machine.resolve_device("auto", ("cpu",)) == "cpu"


def test_meta_json_mistakes_are_named(tmp_path):
    with pytest.raises(UserError, match="does not exist: run python prepare_data.py"):
        cli.load_meta(str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match="has no meta.json: run python prepare_data.py"):
        cli.load_meta(str(tmp_path))
    (tmp_path / "meta.json").write_text(json.dumps({"tokenizer": "bytes", "vocab_size": 256}))
    with pytest.raises(UserError, match="has no train.bin: run python prepare_data.py"):
        cli.load_meta(str(tmp_path))
    (tmp_path / "meta.json").write_text("{not json")
    with pytest.raises(UserError, match="meta.json is not readable JSON"):
        cli.load_meta(str(tmp_path), files=("meta.json",))
    (tmp_path / "meta.json").write_text(json.dumps({"tokenizer": "bytes"}))
    with pytest.raises(UserError, match="lacks a 'tokenizer' or a positive integer 'vocab_size'"):
        cli.load_meta(str(tmp_path), files=("meta.json",))
    (tmp_path / "meta.json").write_text(json.dumps({"tokenizer": "bytes", "vocab_size": 256}))
    assert cli.load_meta(str(tmp_path), files=("meta.json",))["vocab_size"] == 256
