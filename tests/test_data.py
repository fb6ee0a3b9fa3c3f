"""prepare_data.py: tokenizers round-trip, prepared bins decode back to the input, bad inputs fail clearly."""
import inspect
import json
import os
import sysconfig

import numpy as np
import pytest
import tiktoken_ext.openai_public

from util import ROOT  # noqa: F401  (puts the repo root on sys.path)

import prepare_data as prep  # noqa: E402
from cli import UserError  # noqa: E402

TEXT = "Hello world! naïve café, Ünïcödé, 日本語, emoji 🙂, a\ttab and\r\nCRLF.\n"


@pytest.fixture(scope="module")
def gpt2():
    try:
        return prep.load_tokenizer({"tokenizer": "gpt2"})
    except UserError:
        pytest.skip("GPT-2 vocabulary file not found; run `bash scripts/get_gpt2_vocab.sh` (tests "
                    "never use the network)")


def make_folder(root, n_files):
    """n_files small UTF-8 files f00.txt.. (one in a subfolder, one empty), plus hidden junk that must be ignored."""
    texts = {}
    for i in range(n_files):
        rel = f"sub/f{i:02d}.txt" if i == 3 else f"f{i:02d}.txt"
        texts[rel] = "" if i == 5 else f"file {i}: {TEXT * (i + 1)}"
    for rel, text in texts.items():
        os.makedirs(os.path.dirname(os.path.join(root, rel)), exist_ok=True)
        with open(os.path.join(root, rel), "w", encoding="utf-8", newline="") as f:
            f.write(text)
    os.makedirs(os.path.join(root, ".git"))
    for junk in [".hidden", ".git/index"]:
        with open(os.path.join(root, junk), "wb") as f:
            f.write(b"\xff\xfe not UTF-8")
    return [texts[rel] for rel in sorted(texts)]  # sorted order of relative path, as prepare_data reads them


def read_bins(out_dir):
    with open(os.path.join(out_dir, "meta.json")) as f:
        meta = json.load(f)
    train = np.fromfile(os.path.join(out_dir, "train.bin"), dtype=np.uint16)
    val = np.fromfile(os.path.join(out_dir, "val.bin"), dtype=np.uint16)
    assert (len(train), len(val)) == (meta["train_tokens"], meta["val_tokens"])
    return meta, train, val


# -----------------------------------------------------------------------------
# tokenizers

def test_bytes_round_trip():
    tok = prep.load_tokenizer({"tokenizer": "bytes"})
    ids = tok.encode(TEXT)
    assert ids == list(TEXT.encode("utf-8")) and max(ids) < tok.vocab_size == 256
    assert tok.decode(ids) == TEXT
    emoji = "🙂".encode("utf-8")
    assert tok.decode(list(emoji[:2])) == "\ufffd"  # a cut multi-byte sequence decodes to U+FFFD, no exception
    assert tok.encode_prompt("<|endoftext|>") == tok.encode("<|endoftext|>")  # no special tokens in bytes


@pytest.mark.parametrize("kind", ["bytes", "gpt2"])
def test_decode_drops_ids_outside_the_vocabulary(kind, request):
    # the model's vocabulary is padded to a multiple of 64, so sampling can produce ids with no text:
    # both tokenizers drop them (and any negative id) instead of raising
    tok = request.getfixturevalue("gpt2") if kind == "gpt2" else prep.load_tokenizer({"tokenizer": "bytes"})
    ids = tok.encode("Hi there")
    padded = [-1, *ids[:2], tok.vocab_size, *ids[2:], tok.vocab_size + 47, 2**16 - 1]
    assert tok.decode(padded) == "Hi there"


def test_gpt2_round_trip_and_known_ids(gpt2):
    assert gpt2.decode(gpt2.encode(TEXT)) == TEXT
    # ids of tiktoken's own r50k_base / GPT-2
    assert gpt2.encode("Hello world") == [15496, 995]
    assert gpt2.encode("hello world") == [31373, 995]
    assert gpt2.encode(" the") == [262]
    assert gpt2.encode("\n") == [198]
    assert gpt2.decode([50256]) == "<|endoftext|>" and gpt2.eot_token == 50256
    assert gpt2.encode("<|endoftext|>") != [50256]  # in the data it is ordinary text, not the separator
    assert gpt2.encode_prompt("<|endoftext|>") == [50256]  # in a prompt it starts a fresh document
    assert gpt2.encode_prompt("Hello world") == gpt2.encode("Hello world")
    assert gpt2.enc.n_vocab == gpt2.vocab_size == 50257


def test_gpt2_vocab_hash_is_tiktokens():
    # tiktoken's own r50k_base loads exactly the file with this hash, so our encoding is byte-identical
    assert prep.GPT2_VOCAB_SHA256 in inspect.getsource(tiktoken_ext.openai_public.r50k_base)


def test_gpt2_vocab_lookup_errors(tmp_path, monkeypatch):
    monkeypatch.delenv(prep.GPT2_VOCAB_ENV, raising=False)
    monkeypatch.setattr(prep, "DATA_DIR", str(tmp_path))  # no data/gpt2.tiktoken here
    with pytest.raises(UserError, match="scripts/get_gpt2_vocab.sh"):
        prep.load_tokenizer({"tokenizer": "gpt2"})
    with pytest.raises(UserError, match="--gpt2_vocab does not exist"):
        prep.load_tokenizer({"tokenizer": "gpt2"}, gpt2_vocab=str(tmp_path / "nope.tiktoken"))
    with pytest.raises(UserError, match="--gpt2_vocab does not exist or is not a file"):
        prep.load_tokenizer({"tokenizer": "gpt2"}, gpt2_vocab=str(tmp_path))
    monkeypatch.setenv(prep.GPT2_VOCAB_ENV, str(tmp_path / "nope.tiktoken"))
    with pytest.raises(UserError, match=prep.GPT2_VOCAB_ENV):
        prep.load_tokenizer({"tokenizer": "gpt2"})
    junk = tmp_path / "junk.tiktoken"
    junk.write_bytes(b"not a vocabulary\n")
    with pytest.raises(UserError, match="not GPT-2's vocabulary"):
        prep.load_tokenizer({"tokenizer": "gpt2"}, gpt2_vocab=str(junk))
    with pytest.raises(UserError, match="unknown tokenizer"):
        prep.load_tokenizer({"tokenizer": "words"})


def test_gpt2_vocab_from_env(gpt2, tmp_path, monkeypatch):
    monkeypatch.setenv(prep.GPT2_VOCAB_ENV, prep.find_gpt2_vocab())
    monkeypatch.setattr(prep, "DATA_DIR", str(tmp_path))  # so only the env var can find it
    assert prep.load_tokenizer({"tokenizer": "gpt2"}).encode("Hello world") == [15496, 995]


# -----------------------------------------------------------------------------
# prepared data decodes back to the input

@pytest.mark.parametrize("tokenizer", ["bytes", "gpt2"])
def test_prepare_folder_round_trip(tokenizer, tmp_path, request):
    if tokenizer == "gpt2":
        request.getfixturevalue("gpt2")
    texts = make_folder(tmp_path / "corpus", 20)
    is_val = [i in (9, 19) for i in range(20)]  # 20 files: 2 to val, the last of each run of 10
    args = [f"--input={tmp_path / 'corpus'}", f"--tokenizer={tokenizer}", "--block_size=8"]
    meta = prep.main(args + [f"--out_dir={tmp_path / 'a'}"])
    meta, train, val = read_bins(tmp_path / "a")
    assert (meta["train_files"], meta["val_files"], meta["source"]["files"]) == (18, 2, 20)
    tok = prep.load_tokenizer(meta)
    for ids, want in [(train, [t for t, v in zip(texts, is_val) if not v]),
                      (val, [t for t, v in zip(texts, is_val) if v])]:
        if tokenizer == "bytes":
            assert tok.decode(ids.tolist()) == "".join(want)
        else:
            assert ids[-1] == meta["eot_token"]
            docs = [tok.decode(list(d)) for d in np.split(ids, np.flatnonzero(ids == meta["eot_token"]) + 1)[:-1]]
            assert docs == [t + "<|endoftext|>" for t in want if t]  # the empty file adds no separator
    # deterministic: a second run gives the same bytes
    prep.main(args + [f"--out_dir={tmp_path / 'b'}"])
    for name in ["train.bin", "val.bin", "meta.json"]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_prepare_single_file_splits_text(tmp_path):
    text = "".join(f"line {i} ✓\n" for i in range(100))
    (tmp_path / "book.txt").write_text(text, encoding="utf-8")
    meta = prep.main([f"--input={tmp_path / 'book.txt'}", f"--out_dir={tmp_path / 'out'}", "--block_size=16"])
    meta, train, val = read_bins(tmp_path / "out")
    cut = len(text) - len(text) // 10  # val is the last 10% of the characters
    assert bytes(train.tolist()).decode() == text[:cut] and bytes(val.tolist()).decode() == text[cut:]
    assert meta["source"]["kind"] == "file" and meta["eot_token"] is None


def test_default_out_dir(tmp_path):
    (tmp_path / "book.txt").write_text("x")
    assert prep.default_out_dir("", "bytes") == os.path.join(prep.DATA_DIR, "stdlib_bytes")
    assert prep.default_out_dir(str(tmp_path / "book.txt"), "gpt2") == os.path.join(prep.DATA_DIR, "book_gpt2")
    assert prep.default_out_dir(str(tmp_path) + "/", "bytes") == os.path.join(prep.DATA_DIR, tmp_path.name + "_bytes")


# -----------------------------------------------------------------------------
# bad inputs: each names its flag and problem in one line, and nothing is written
# (tests/test_cli.py checks that the command line turns these into `error: ...` and exit 1)

@pytest.mark.parametrize("case, match", [
    ("missing", r"--input=.*in does not exist"),
    ("empty_folder", r"--input=.* is a folder with no files"),
    ("hidden_only", r"--input=.* is a folder with no files .*hidden"),
    ("empty_files", r"--input=.* has no text \(2 file\(s\), all empty\)"),
    ("empty_file", r"--input=.*a\.txt has no text"),
    ("undecodable", r"--input: .*bad\.txt is not valid UTF-8 at byte offset 6"),
    ("too_little", r"too little data for one block: the val split .* --block_size=128"),
    ("max_files_on_a_file", r"--max_files=3 picks files from a folder"),
])
def test_bad_input(case, match, tmp_path):
    src = tmp_path / "in"
    extra = []
    if case != "missing":
        src.mkdir()
    if case == "hidden_only":
        (src / ".notes").write_text("text")
    if case == "empty_files":
        (src / "a.txt").write_text("")
        (src / "b.txt").write_text("")
    if case in ("empty_file", "max_files_on_a_file"):
        src = src / "a.txt"
        src.write_text("" if case == "empty_file" else "text")
        extra = ["--max_files=3"] if case == "max_files_on_a_file" else []
    if case == "undecodable":
        (src / "a.txt").write_text("fine text\n")
        (src / "bad.txt").write_bytes("héllo".encode("utf-8") + b"\xff more")  # é is 2 bytes: 0xff at offset 6
    if case == "too_little":
        for i in range(12):
            (src / f"{i:02d}.txt").write_text("x" * 100)  # val = one file = 100 tokens < 129
    out = tmp_path / "out"
    with pytest.raises(UserError, match=match) as e:
        prep.main([f"--input={src}", f"--out_dir={out}", *extra])
    assert "\n" not in str(e.value)
    assert not out.exists()


@pytest.mark.parametrize("flags, match", [
    (["--max_files=0"], "--max_files must be .* >= 1, or -1"),
    (["--max_files=-2"], "--max_files must be .* >= 1, or -1"),
    (["--block_size=0"], "--block_size must be >= 1"),
    (["--max_train_tokens=0"], "--max_train_tokens must be a number of tokens >= 1, or -1"),
    (["--gpt2_vocab=x.tiktoken"], "--gpt2_vocab is only read with --tokenizer=gpt2"),
    (["--out_dir=FILE"], "--out_dir=.* exists and is not a folder"),
])
def test_bad_flag_values(flags, match, tmp_path):
    (tmp_path / "FILE").write_text("")
    flags = [f.replace("FILE", str(tmp_path / "FILE")) for f in flags]
    with pytest.raises(UserError, match=match):
        prep.get_args(flags)


# -----------------------------------------------------------------------------
# the default corpus: this Python's stdlib

def test_stdlib_listing_is_deterministic():
    root = sysconfig.get_paths()["stdlib"]
    rels = prep.list_stdlib_files(root)
    assert rels == prep.list_stdlib_files(root) == sorted(rels)
    assert len(rels) > 100 and "os.py" in rels and "json/decoder.py" in rels
    assert all(r.endswith(".py") for r in rels)
    assert not any(set(r.split("/")[:-1]) & set(prep.STDLIB_EXCLUDED_DIRS) for r in rels)


def test_stdlib_subset(tmp_path):
    root = sysconfig.get_paths()["stdlib"]
    args = ["--max_files=20", "--block_size=8"]
    prep.main(args + [f"--out_dir={tmp_path / 'a'}"])
    prep.main(args + [f"--out_dir={tmp_path / 'b'}"])
    meta, train, val = read_bins(tmp_path / "a")
    src = meta["source"]
    assert src["kind"] == "stdlib" and src["files"] + src["skipped_not_utf8"] == 20
    assert meta["train_files"] + meta["val_files"] == src["files"] and meta["val_files"] == 2
    want = b"".join(open(os.path.join(root, r), "rb").read() for r in prep.list_stdlib_files(root)[:20])
    assert len(want) == len(train) + len(val)  # every byte of the 20 files went into one split or the other
    for name in ["train.bin", "val.bin", "meta.json"]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_max_train_tokens_caps_the_train_split_alone(tmp_path):
    args = ["--max_files=20", "--block_size=8"]
    full = prep.main(args + [f"--out_dir={tmp_path / 'full'}"])
    capped = prep.main(args + ["--max_train_tokens=5000", f"--out_dir={tmp_path / 'capped'}"])
    _, train_full, val_full = read_bins(tmp_path / "full")
    _, train, val = read_bins(tmp_path / "capped")
    assert len(train) == capped["train_tokens"] == 5000 and np.array_equal(train, train_full[:5000])
    assert np.array_equal(val, val_full), "the validation split must not shrink with the training split"
    assert capped["uncapped_train_tokens"] == full["train_tokens"] and capped["max_train_tokens"] == 5000
    with pytest.raises(UserError, match="the train split .* has 5 tokens, fewer than --block_size=8 \\+ 1"):
        prep.main(args + ["--max_train_tokens=5", f"--out_dir={tmp_path / 'tiny'}"])
