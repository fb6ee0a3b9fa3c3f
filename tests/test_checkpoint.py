"""checkpoint.py: atomic saves, a full disk, and loads that say what is wrong."""
import collections
import errno
import os

import pytest
import torch
from util import model_from, tiny_config

import checkpoint
from cli import UserError
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
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: usage(1, 1, 0))
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
    again = model_from(loaded)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    (tmp_path / "bad.pt").write_text("not a checkpoint")
    with pytest.raises(UserError, match="corrupt or not a checkpoint"):
        checkpoint.load_checkpoint(str(tmp_path / "bad.pt"))
    with pytest.raises(UserError, match="no checkpoint at"):
        checkpoint.load_checkpoint(str(tmp_path / "none.pt"))


def test_load_checks_a_nanogpt_checkpoint_and_a_streams_file(tmp_path):
    """nanoGPT's own checkpoint format loads (compiled-model keys, mask buffers, its model_args only), and a
    streams file is checked against the prefixes and aggregator its model_args describe."""
    model = GPT(tiny_config())
    cfg = model.config
    sd = {"_orig_mod." + k: v for k, v in model.state_dict().items()}
    sd.update({f"_orig_mod.transformer.h.{i}.attn.bias": torch.ones(1, 1, 4, 4) for i in range(cfg.n_layer)})
    nanogpt_args = dict(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, block_size=cfg.block_size,
                        bias=cfg.bias, vocab_size=cfg.vocab_size, dropout=0.0)  # as nanoGPT's train.py saves them
    torch.save(dict(model=sd, model_args=nanogpt_args, iter_num=0), tmp_path / "nanogpt.pt")
    loaded = checkpoint.load_checkpoint(str(tmp_path / "nanogpt.pt"))
    assert set(loaded["model"]) == set(model.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), model_from(loaded).state_dict().values()))
    p2 = GPT(tiny_config(n_streams=2))
    streams = checkpoint.streams_state(p2)
    torch.save(streams, tmp_path / "streams_p2.pt")
    assert checkpoint.load_checkpoint(str(tmp_path / "streams_p2.pt"))["kind"] == "streams"
    streams["model"].pop("aggregator.proj_out.bias")
    torch.save(streams, tmp_path / "cut.pt")
    with pytest.raises(UserError, match=r"--streams: checkpoint .*cut.pt: its weights do not fit "
                                        r".*aggregator.proj_out.bias"):
        checkpoint.load_checkpoint(str(tmp_path / "cut.pt"), "--streams")
