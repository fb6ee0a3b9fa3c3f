"""Stream diagnostics (why P streams do or do not beat one) and --prefix_reparam, against hand computations."""
import json
import os

import pytest
import torch
from test_train import TINY, evals, run, write_corpus
from util import assert_close, model_from, tiny_config

import diagnostics
import model_init
import sample
import train
from model import GPT


def test_diversity_by_hand():
    # streams alone: 2.0 and 2.0 nats; mixture 1.0 -> gain 1.0.
    # Deviations (-1, 0, 1) and (-1, 1, 0): cov 1, var 2, 2 -> rho 0.5
    d = diagnostics.diversity(torch.tensor([[1., 2., 3.], [1., 3., 2.]]), torch.tensor([0.5, 1.0, 1.5]))
    assert d["stream_loss"] == [2.0, 2.0] and d["mix_loss"] == 1.0 and d["gain"] == 1.0
    assert abs(d["rho"] - 0.5) < 1e-12
    # three streams: pairs (0,1) rho -1, (0,2) rho 1, (1,2) rho -1 -> mean -1/3;
    # a mixture worse than the streams: gain < 0
    d = diagnostics.diversity(torch.tensor([[1., 2., 3.], [3., 2., 1.], [2., 4., 6.]]), torch.tensor([3., 3., 3.]))
    assert abs(d["rho"] + 1 / 3) < 1e-12 and abs(d["gain"] - (2 + 2 + 4) / 3 + 3) < 1e-6


def test_identical_prefixes_give_rho_one_kl_zero_and_no_gain():
    torch.manual_seed(0)
    model = GPT(tiny_config(n_streams=3)).eval()
    with torch.no_grad():
        for block in model.transformer.h:  # every stream gets stream 0's prefix: three copies of one model
            block.attn.prefix_k.copy_(block.attn.prefix_k[:1].expand_as(block.attn.prefix_k))
            block.attn.prefix_v.copy_(block.attn.prefix_v[:1].expand_as(block.attn.prefix_v))
    X, Y = (torch.randint(0, model.config.vocab_size, (2, 16)) for _ in range(2))
    nll, mix, kl = diagnostics.stream_losses(model, X, Y)
    d = diagnostics.diversity(nll, mix)
    # identical streams differ only by fp32 round-off of rows in one batched matmul (KL seen up to 1.3e-6 on a
    # 2-core EPYC); two different prefixes give KL above 1e-4 (the next test)
    assert abs(d["rho"] - 1) < 1e-6 and abs(kl) < 1e-5 and d["gain"] <= 1e-6
    assert_close(mix.mean(), model(X, Y)[1], atol=1e-6, what="mixture loss = the model's loss")


def test_different_prefixes_give_rho_below_one_and_positive_kl():
    torch.manual_seed(1)
    model = GPT(tiny_config(n_streams=2, prefix_init_std=1.0)).eval()
    X, Y = (torch.randint(0, model.config.vocab_size, (2, 16)) for _ in range(2))
    nll, mix, kl = diagnostics.stream_losses(model, X, Y)
    assert diagnostics.diversity(nll, mix)["rho"] < 0.999 and kl > 1e-4


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("data"))


def test_every_eval_record_carries_the_diagnostics(data_dir, tmp_path, capsys):
    run(data_dir, tmp_path, "--max_iters=4", "--eval_interval=2", "--n_streams=2")
    for ev in evals(tmp_path):
        assert {"stream_loss", "mix_loss", "gain", "rho", "kl"} <= ev.keys() and len(ev["stream_loss"]) == 2
        assert abs(ev["mix_loss"] - ev["val"]) < 1e-6
    capsys.readouterr()
    train.main(TINY + [f"--data_dir={data_dir}", f"--out_dir={tmp_path}", "--init_from=resume", "--eval_only"])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "rho" in last and abs(last["val"] - evals(tmp_path)[-1]["val"]) < 1e-6


def test_prefix_reparam_resumes_exactly_and_exports_folded(data_dir, tmp_path, capsys):
    common = ["--n_streams=2", "--prefix_reparam=16", "--eval_interval=4", "--lr_decay_iters=8"]
    full = run(data_dir, tmp_path / "full", "--max_iters=8", *common)
    run(data_dir, tmp_path / "half", "--max_iters=4", *common)
    resumed = run(data_dir, tmp_path / "half", "--max_iters=8", "--init_from=resume", *common)
    for part in ("model", "prefix_reparam"):  # the folded model and the MLPs themselves
        assert full[part].keys() == resumed[part].keys() and full[part]
        for k, v in full[part].items():
            assert_close(resumed[part][k], v, atol=0, rtol=0, what=f"{part} {k}")
    # the exported model is a plain model: no MLP, and it loads as any checkpoint does
    assert not any("parametrizations" in k for k in full["model"])
    plain = model_from(full)
    assert set(plain.state_dict()) == set(GPT(plain.config).state_dict())
    # ... and it computes what the reparameterised model computed
    model = model_from(full)
    model_init.add_prefix_reparam(model, 16)
    model.load_state_dict(full["prefix_reparam"], strict=False)
    idx = torch.randint(0, plain.config.vocab_size, (2, 16))
    with torch.no_grad():
        assert_close(plain.eval()(idx)[0], model.eval()(idx)[0], atol=1e-6, what="folded vs reparameterised logits")
    sample.main([f"--out_dir={tmp_path / 'full'}", "--max_new_tokens=5", "--num_samples=1", "--device=cpu"])
    assert "decoding: reference" in capsys.readouterr().err


def test_prefix_reparam_streams_file_is_folded(data_dir, tmp_path):
    base = run(data_dir, tmp_path / "base", "--max_iters=2", "--eval_interval=2", "--n_streams=1")
    assert base["iter_num"] == 2
    run(data_dir, tmp_path / "frozen", "--max_iters=2", "--eval_interval=2", "--n_streams=2", "--prefix_reparam=8",
        "--freeze_backbone", f"--init_from={tmp_path / 'base' / 'ckpt.pt'}")
    streams = torch.load(os.path.join(tmp_path / "frozen", "streams_p2.pt"), weights_only=True)
    assert streams["model"] and not any("parametrizations" in k for k in streams["model"])


def test_prefix_reparam_refusals(data_dir, tmp_path):
    with pytest.raises(train.UserError, match="--prefix_reparam needs --n_streams > 1"):
        run(data_dir, tmp_path, "--max_iters=1", "--n_streams=1", "--prefix_reparam=8")
    with pytest.raises(train.UserError, match="--prefix_reparam must be >= 0"):
        run(data_dir, tmp_path, "--max_iters=1", "--prefix_reparam=-1")
    run(data_dir, tmp_path / "p2", "--max_iters=1", "--eval_interval=1", "--n_streams=2")
    with pytest.raises(train.UserError, match="throw away the trained prefixes of --init_from"):
        run(data_dir, tmp_path / "o", "--max_iters=1", "--prefix_reparam=8",
            f"--init_from={tmp_path / 'p2' / 'ckpt.pt'}")
    ck = torch.load(tmp_path / "p2" / "ckpt.pt", weights_only=True)
    ck["args"]["prefix_reparam"] = 8  # a checkpoint that names MLPs it does not hold
    torch.save(ck, tmp_path / "p2" / "ckpt.pt")
    with pytest.raises(train.UserError, match="does not hold the --prefix_reparam=8 MLPs"):
        run(data_dir, tmp_path / "p2", "--max_iters=2", "--init_from=resume")


def test_kl_matches_the_pairwise_definition():
    torch.manual_seed(2)
    model = GPT(tiny_config(n_streams=3, prefix_init_std=1.0)).eval()
    X, Y = (torch.randint(0, model.config.vocab_size, (2, 16)) for _ in range(2))
    _, _, kl = diagnostics.stream_losses(model, X, Y)
    with torch.no_grad():
        h = model.transformer.ln_f  # every stream's final hidden states, (P*B, T, C), taken where they are made
        seen = []
        hook = h.register_forward_hook(lambda m, inp, out: seen.append(out))
        model(X)
        hook.remove()
        logp = torch.log_softmax(model.lm_head(seen[0]), -1).view(3, 32, -1)
    pairs = [(logp[a].exp() * (logp[a] - logp[b])).sum(-1).mean() for a in range(3) for b in range(3) if a != b]
    assert abs(kl - sum(pairs).item() / 6) < 1e-5
