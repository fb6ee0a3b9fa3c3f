"""checkpoint.py: atomic saves, a full disk, and loads that say what is wrong."""
import collections
import errno
import os

import pytest
import torch
from util import tiny_config

import checkpoint
from common import UserError
from model import GPT


def test_a_full_disk_is_one_error_and_leaves_the_earlier_checkpoint(tmp_path, monkeypatch):
    model = GPT(tiny_config())
    checkpoint.save_checkpoint(dict(model=model.state_dict(), model_args={}), str(tmp_path))
    before = (tmp_path / "ckpt.pt").read_bytes()
    real_save = torch.save

    def save_until_the_disk_is_full(obj, f):
        real_save(obj, f)  # half a checkpoint lands in the temporary file, then the disk is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint.torch, "save", save_until_the_disk_is_full)
    with pytest.raises(UserError) as e:
        checkpoint.save_checkpoint(dict(model=GPT(tiny_config(n_layer=1)).state_dict(), model_args={}), str(tmp_path))
    message = str(e.value)
    assert "no space left on the device" in message and str(tmp_path / "ckpt.pt") in message and "\n" not in message
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt"], "a .tmp was left behind"
    assert (tmp_path / "ckpt.pt").read_bytes() == before, "the earlier checkpoint changed"


def test_a_full_disk_that_torch_reports_without_an_errno(tmp_path, monkeypatch):
    # what torch.save raised on a real full tmpfs: no errno, only the writer's position check
    def full(obj, f):
        f.write(b"PK\x03\x04")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1393792 vs 1393680")

    monkeypatch.setattr(checkpoint.torch, "save", full)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: collections.namedtuple("usage", "total used free")(1, 1, 0))
    with pytest.raises(UserError, match="no space left on the device to save"):
        checkpoint.save_checkpoint({}, str(tmp_path))
    assert os.listdir(tmp_path) == []


def test_other_write_errors_name_the_path(tmp_path, monkeypatch):
    def refuse(obj, f):
        raise OSError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(checkpoint.torch, "save", refuse)
    with pytest.raises(UserError, match=f"could not save {tmp_path / 'x.pt'}: .*Permission denied"):
        checkpoint.save_checkpoint({}, str(tmp_path), "x.pt")
    assert os.listdir(tmp_path) == []


def test_a_saved_checkpoint_loads_with_weights_only(tmp_path):
    model = GPT(tiny_config(n_streams=2))
    ckpt = dict(model=model.state_dict(), model_args=dict(vars(model.config)), iter_num=3)
    checkpoint.save_checkpoint(ckpt, str(tmp_path))
    loaded = checkpoint.load_checkpoint(str(tmp_path / "ckpt.pt"))
    again = checkpoint.model_from_checkpoint(loaded)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    (tmp_path / "bad.pt").write_text("not a checkpoint")
    with pytest.raises(UserError, match="corrupt or not a checkpoint"):
        checkpoint.load_checkpoint(str(tmp_path / "bad.pt"))
    with pytest.raises(UserError, match="no checkpoint at"):
        checkpoint.load_checkpoint(str(tmp_path / "none.pt"))
