"""scripts/nanogpt_diff.py: the diff against nanoGPT's model.py, and how each added line is classified.
nanoGPT's file is not in the repository, so these tests build their own small pair of files."""
import os
import subprocess
import sys

from util import ROOT

sys.path.insert(0, os.path.join(ROOT, "scripts"))
import nanogpt_diff  # noqa: E402

ORIGINAL = '''\
import torch

class Block:

    def __init__(self, config):
        self.ln = LayerNorm(config.n_embd)
        self.attn = Attention(config)

    def forward(self, x):
        x = x + self.attn(self.ln(x))
        return x

@dataclass
class GPTConfig:
    n_embd: int = 768

    def total(self):
        return 1
'''

CHANGED = '''\
import torch
from contextlib import nullcontext

class Block:

    def __init__(self, config, layer_idx):
        self.ln = nn.LayerNorm(config.n_embd)
        self.attn = Attention(config)
        # ParScale: the prefix, per stream
        self.prefix = None

    def forward(self, x, cache=None):
        if cache is not None: # the decode step
            x = x + self.attn(self.ln(x))
        return x

class Mixer:
    """Mixes the P streams."""

    def __init__(self):
        self.w = 1

    def forward(self, h):
        return h * self.w

@dataclass
class GPTConfig:
    n_embd: int = 768
    n_kv_head: int = None # GQA

    def __post_init__(self):
        if self.n_embd < 1:
            raise ValueError("n_embd")

    def total(self):
        return 1
'''


def kinds(result):
    return {result["lines"][n - 1].strip(): kind for n, kind in result["kinds"].items()}


def test_the_counts_are_those_of_a_longest_common_subsequence():
    a, b = ORIGINAL.splitlines(), CHANGED.splitlines()
    added, deleted = nanogpt_diff.added_lines(a, b)
    kept = [line for n, line in enumerate(b, 1) if n not in added]
    assert kept == [line for n, line in enumerate(a, 1) if n not in deleted]  # what stays is common to both
    assert len(kept) == len(a) - len(deleted) == len(b) - len(added)
    # the unchanged lines stay unchanged: a deletion or an edit is never hidden
    assert "        self.ln = LayerNorm(config.n_embd)" in [a[n - 1] for n in deleted]
    assert "    def total(self):" in kept and "        x = x + self.attn(self.ln(x))" not in kept  # re-indented


def test_every_added_line_gets_the_kind_its_rules_give():
    r = nanogpt_diff.compare(ORIGINAL, CHANGED)
    k = kinds(r)
    assert k["from contextlib import nullcontext"] == "cache"  # rule 2: its own words
    assert k["def __init__(self, config, layer_idx):"] == "cache"
    assert k["# ParScale: the prefix, per stream"] == "parscale"
    assert k["self.prefix = None"] == "parscale"
    assert k["if cache is not None: # the decode step"] == "cache"
    assert k["x = x + self.attn(self.ln(x))"] == "cache"  # rule 7: re-indented under an added `if`
    assert k["class Mixer:"] == k["self.w = 1"] == k["return h * self.w"] == "parscale"  # rule 6: by its docstring
    assert k["n_kv_head: int = None # GQA"] == "gqa"
    assert k['raise ValueError("n_embd")'] == "checks"  # rule 1: in GPTConfig.__post_init__
    assert k["self.ln = nn.LayerNorm(config.n_embd)"] == "other"  # nothing says why: listed as other
    assert r["counts"] == dict(parscale=8, cache=5, gqa=1, checks=3, other=1), r["counts"]
    assert sum(r["counts"].values()) == r["added_nonblank"] == len(r["kinds"])


def test_the_command_line_prints_the_counts_and_lists_the_other_lines(tmp_path):
    (tmp_path / "nanogpt.py").write_text(ORIGINAL)
    (tmp_path / "ours.py").write_text(CHANGED)
    script = os.path.join(ROOT, "scripts", "nanogpt_diff.py")
    res = subprocess.run([sys.executable, script, str(tmp_path / "nanogpt.py"), f"--model={tmp_path / 'ours.py'}"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "added non-blank lines by kind: ParScale" in res.stdout
    assert "other, line 7: self.ln = nn.LayerNorm(config.n_embd)" in res.stdout
    missing = subprocess.run([sys.executable, script, str(tmp_path / "no.py")], capture_output=True, text=True,
                             timeout=60)
    assert missing.returncode == 1 and missing.stderr.startswith("error: cannot read")
    assert "Traceback" not in missing.stderr
