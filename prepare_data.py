"""
Turn text into the token files train.py reads: train.bin, val.bin (np.uint16 token ids) and meta.json.

    python prepare_data.py                          # this Python's stdlib source, bytes -> data/stdlib_bytes
    python prepare_data.py --max_files=50           # a quick toy subset of the same corpus
    python prepare_data.py --max_train_tokens=200000 --out_dir=data/stdlib_200k   # small train split, full val
    bash scripts/get_gpt2_vocab.sh                  # once, fetches data/gpt2.tiktoken (no tiktoken download)
    python prepare_data.py --tokenizer=gpt2         # GPT-2 BPE -> data/stdlib_gpt2
    python prepare_data.py --input=my_texts/ --tokenizer=gpt2   # any UTF-8 file or folder -> data/my_texts_gpt2

The default corpus needs no download: the source of the running interpreter's own standard library,
every *.py file under sysconfig's "stdlib" path, in sorted order of relative path. Left out are
third-party code (site-packages, dist-packages) and test suites (every folder named test, tests or
idle_test: CPython's Lib/test, ctypes/test, unittest/test, tkinter/test, distutils/tests, lib2to3/tests
with its data, idlelib/idle_test): test scaffolding, with files that are malformed on purpose.
A file that is not valid UTF-8 is skipped and counted in meta.json. On Python 3.11 that is ~730 files,
~12 MB of text.

--input takes a UTF-8 text file or a folder. A folder contributes every regular file below it, in sorted
order of relative path, except hidden ones (names starting with "."), so a git checkout works.

Train/val split, by file and deterministic: of n sorted files, n // 10 (at least 1) go to val, spread
evenly through the list (the last file of every run of ~10). A single file (or a corpus of one file)
is split by text instead: its last 10% of characters is val. --max_train_tokens keeps only the first N
tokens of the train split and leaves val as it is, so that a small training set repeated for many
epochs is measured on the same validation set as the full one.

Tokenizers:
  bytes  every UTF-8 byte is a token, vocab 256. The default, because it needs nothing provisioned.
         Files are concatenated with nothing between them (source files end with a newline anyway),
         so decoding train.bin gives back the train files' text exactly. No end-of-text token.
  gpt2   GPT-2's BPE (tiktoken's r50k_base), vocab 50257. Every file's tokens are followed by
         <|endoftext|> = 50256, as in nanoGPT. tiktoken would download its vocabulary on first use;
         instead it is built here from a local copy of the same file, looked up in this order:
         --gpt2_vocab, $PARSCALE_GPT2_VOCAB, data/gpt2.tiktoken next to this script
         (bash scripts/get_gpt2_vocab.sh puts it there).
sample.py imports load_tokenizer from here, so data and prompts share one implementation: data is
encoded with .encode (a literal "<|endoftext|>" stays text), a prompt with .encode_prompt (it becomes
the end-of-text token), and .decode drops ids outside the vocabulary (see the comment above ByteTokenizer).

meta.json holds all a decoder needs: {"tokenizer", "vocab_size", "eot_token", "dtype",
"gpt2_encoding" and "gpt2_vocab_sha256" (gpt2 only), "source" (provenance), "train_tokens",
"val_tokens", "train_files", "val_files"}. Outputs are written atomically (temp file + os.replace),
meta.json last. The corpus is held in memory: this is meant for corpora up to a few hundred MB.
A mistake the user can fix (a bad flag value, a missing, empty or non-UTF-8 input, no GPT-2 vocabulary)
ends as one `error: ...` line naming the flag, exit status 1, and nothing written.
"""

import hashlib
import json
import os
import platform
import sysconfig
import time

import numpy as np
import tiktoken
import tiktoken.load
from tiktoken_ext.openai_public import ENDOFTEXT, r50k_pat_str
from tqdm import tqdm

from cli import ArgumentParser, UserError, entry

HERE = os.path.dirname(os.path.abspath(__file__))
DATA_DIR = os.path.join(HERE, "data")

# tiktoken's r50k_base expects a vocabulary file with exactly this hash; so does ours
GPT2_VOCAB_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
GPT2_VOCAB_ENV = "PARSCALE_GPT2_VOCAB"
STDLIB_EXCLUDED_DIRS = ("site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__")
VAL_FRACTION = 10  # 1 in VAL_FRACTION files (or the last 1/VAL_FRACTION of a single file) is val


# -----------------------------------------------------------------------------
# tokenizers, shared with sample.py. Two encoders on purpose, as nanoGPT: data goes through
# .encode(str) -> list[int], which never produces a special token (a literal "<|endoftext|>" in a
# file is plain text); a prompt goes through .encode_prompt(str), where "<|endoftext|>" is the
# end-of-text token, so a prompt can start a fresh document. .decode(ids) -> str drops ids outside
# [0, vocab_size): they carry no text, and sampling can produce them, because train.py pads the
# model's vocabulary to a multiple of 64 (GPT-2's 50257 -> 50304). sample.py says how many it dropped.

class ByteTokenizer:
    """Every UTF-8 byte is a token. decode drops ids outside [0, 256) and replaces a broken multi-byte
    sequence with U+FFFD; it never raises."""

    name = "bytes"
    vocab_size = 256
    eot_token = None

    def encode(self, text):
        return list(text.encode("utf-8"))

    def encode_prompt(self, text):
        return self.encode(text)  # no special tokens to recognise

    def decode(self, ids):
        return bytes(i for i in ids if 0 <= i < self.vocab_size).decode("utf-8", errors="replace")


class GPT2Tokenizer:
    """GPT-2's BPE, identical to tiktoken.get_encoding("r50k_base"), built from a local file. decode drops
    ids outside [0, 50257) (the model's padding rows) and never raises."""

    name = "gpt2"
    vocab_size = 50257
    eot_token = 50256

    def __init__(self, vocab_path):
        got = file_sha256(vocab_path)
        if got != GPT2_VOCAB_SHA256:
            raise UserError(f"{vocab_path} is not GPT-2's vocabulary (sha256 {got}, expected {GPT2_VOCAB_SHA256}); "
                            "run `bash scripts/get_gpt2_vocab.sh` for a fresh copy, or fix --gpt2_vocab")
        ranks = tiktoken.load.load_tiktoken_bpe(vocab_path, expected_hash=GPT2_VOCAB_SHA256)
        self.enc = tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                                     special_tokens={ENDOFTEXT: self.eot_token}, explicit_n_vocab=self.vocab_size)

    def encode(self, text):
        return self.enc.encode_ordinary(text)

    def encode_prompt(self, text):
        return self.enc.encode(text, allowed_special={ENDOFTEXT})

    def decode(self, ids):
        return self.enc.decode([i for i in ids if 0 <= i < self.vocab_size], errors="replace")


def find_gpt2_vocab(path=None):
    """The GPT-2 vocabulary file: path, else $PARSCALE_GPT2_VOCAB, else data/gpt2.tiktoken next to this script."""
    for named_path, where in [(path, "--gpt2_vocab"), (os.environ.get(GPT2_VOCAB_ENV), f"${GPT2_VOCAB_ENV}")]:
        if named_path:
            if not os.path.isfile(named_path):  # named explicitly: never fall back past it
                raise UserError(f"GPT-2 vocabulary file from {where} does not exist or is not a file: {named_path}; "
                                "run `bash scripts/get_gpt2_vocab.sh` to fetch it, or fix the path")
            return named_path
    default = os.path.join(DATA_DIR, "gpt2.tiktoken")
    if not os.path.isfile(default):
        raise UserError(f"GPT-2 vocabulary file not found (looked at --gpt2_vocab, ${GPT2_VOCAB_ENV}, {default}); "
                        "run `bash scripts/get_gpt2_vocab.sh` to fetch it, or pass --gpt2_vocab=PATH")
    return default


def load_tokenizer(meta, gpt2_vocab=None):
    """The tokenizer a meta.json describes (only its "tokenizer" key is needed); see find_gpt2_vocab."""
    kind = meta.get("tokenizer")
    if kind == "bytes":
        return ByteTokenizer()
    if kind == "gpt2":
        if meta.get("gpt2_vocab_sha256", GPT2_VOCAB_SHA256) != GPT2_VOCAB_SHA256:
            raise UserError(f"meta.json wants GPT-2 vocabulary sha256 {meta['gpt2_vocab_sha256']}, "
                            f"this code knows only {GPT2_VOCAB_SHA256}")
        return GPT2Tokenizer(find_gpt2_vocab(gpt2_vocab))
    raise UserError(f"unknown tokenizer {kind!r} in meta.json; expected 'bytes' or 'gpt2' (rerun prepare_data.py)")


# -----------------------------------------------------------------------------
# corpora: a list of (relative path, text) documents, sorted, plus a provenance dict

def file_sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def update_corpus_hash(h, rel, data):
    # path and length first, so no two different corpora hash the same stream
    h.update(f"{rel}\0{len(data)}\0".encode("utf-8"))
    h.update(data)


def list_stdlib_files(stdlib_dir):
    """Relative paths (with /) of the stdlib's *.py files, sorted, without third-party code or test suites."""
    rels = []
    for dirpath, dirnames, filenames in os.walk(stdlib_dir):
        dirnames[:] = [d for d in dirnames if d not in STDLIB_EXCLUDED_DIRS]  # prune the walk
        rels += [os.path.relpath(os.path.join(dirpath, f), stdlib_dir) for f in filenames if f.endswith(".py")]
    return sorted(r.replace(os.sep, "/") for r in rels)


def list_folder_files(root):
    """Relative paths (with /) of every regular, non-hidden file below root, sorted."""
    rels = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rels += [os.path.relpath(os.path.join(dirpath, f), root) for f in filenames
                 if not f.startswith(".") and os.path.isfile(os.path.join(dirpath, f))]
    return sorted(r.replace(os.sep, "/") for r in rels)


def read_bytes(path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise UserError(f"--input: cannot read {path} ({e.strerror}); fix its permissions or leave it out") from None


def decode_utf8(data, path):
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"--input: {path} is not valid UTF-8 at byte offset {e.start} ({e.reason}: "
                        f"{data[e.start:e.start + 4]!r}); convert it to UTF-8 (iconv -t UTF-8) or remove it") from None


def read_stdlib_corpus(max_files=-1):
    """The default corpus: this interpreter's standard library source. Undecodable files are skipped and counted."""
    root = sysconfig.get_paths()["stdlib"]
    rels = list_stdlib_files(root)
    if max_files >= 0:
        rels = rels[:max_files]
    docs, skipped, h = [], [], hashlib.sha256()
    for rel in rels:
        with open(os.path.join(root, rel), "rb") as f:
            data = f.read()
        try:
            docs.append((rel, data.decode("utf-8")))
        except UnicodeDecodeError:
            skipped.append(rel)
            continue
        update_corpus_hash(h, rel, data)
    source = {"kind": "stdlib", "python": platform.python_version(), "implementation": platform.python_implementation(),
              "path": root, "excluded_dirs": list(STDLIB_EXCLUDED_DIRS), "max_files": max_files,
              "files": len(docs), "skipped_not_utf8": len(skipped), "skipped_files": skipped, "sha256": h.hexdigest()}
    return docs, source


def read_input_corpus(path, max_files=-1):
    """A UTF-8 text file, or every regular file in a folder. A missing path, a folder without files, an
    unreadable or undecodable file raise UserError naming it, before anything is tokenized."""
    if os.path.isdir(path):
        root, rels, kind = path, list_folder_files(path), "folder"
        if not rels:
            raise UserError(f"--input={path} is a folder with no files in it (hidden ones, named '.*', are skipped); "
                            "point it at a text file or a folder of them")
        if max_files >= 0:
            rels = rels[:max_files]
    elif os.path.isfile(path):
        if max_files != -1:
            raise UserError(f"--max_files={max_files} picks files from a folder, but "
                            f"--input={path} is a single file; drop --max_files")
        root, rels, kind = os.path.dirname(path), [os.path.basename(path)], "file"
    elif os.path.exists(path):
        raise UserError(f"--input={path} is neither a regular file nor a folder; give a UTF-8 text "
                        "file or a folder of them")
    else:
        raise UserError(f"--input={path} does not exist; give a UTF-8 text file or a folder of them")
    docs, h = [], hashlib.sha256()
    for rel in rels:
        full = os.path.join(root, rel)
        data = read_bytes(full)
        docs.append((rel, decode_utf8(data, full)))  # fail here, before any tokenizing
        update_corpus_hash(h, rel, data)
    source = {"kind": kind, "path": os.path.abspath(path), "max_files": max_files,
              "files": len(docs), "sha256": h.hexdigest()}
    return docs, source


def split_docs(docs):
    """(train_docs, val_docs): 1 in VAL_FRACTION files to val, spread evenly; a lone file splits its text."""
    n = len(docs)
    if n == 1:
        rel, text = docs[0]
        cut = len(text) - len(text) // VAL_FRACTION
        return [(rel, text[:cut])], [(rel, text[cut:])]
    n_val = max(1, n // VAL_FRACTION)
    # file i is val when i closes one of n_val equal runs of the list
    is_val = [(i + 1) * n_val // n > i * n_val // n for i in range(n)]
    return [d for d, v in zip(docs, is_val) if not v], [d for d, v in zip(docs, is_val) if v]


# -----------------------------------------------------------------------------
# tokenize, check, write

def encode_doc(tok, text):
    """(n,) uint16 ids of one document, followed by the end-of-text token if the tokenizer has one."""
    if not text:
        return np.zeros(0, dtype=np.uint16)  # an empty file adds nothing, not even a separator
    ids = tok.encode(text)
    if tok.eot_token is not None:
        ids.append(tok.eot_token)
    return np.array(ids, dtype=np.uint16)


def write_atomic(path, payload):
    """Write bytes or a contiguous array via a temp file + os.replace: a reader never sees half a file."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(payload)
        os.replace(tmp, path)
    except OSError as e:  # a full disk, a read-only folder: the user's to fix
        raise UserError(f"--out_dir: cannot write {path} ({e.strerror}); free some space or choose "
                        "another --out_dir") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def default_out_dir(input_path, tokenizer):
    if not input_path:
        return os.path.join(DATA_DIR, f"stdlib_{tokenizer}")
    name = os.path.basename(os.path.normpath(input_path))
    if os.path.isfile(input_path):
        name = os.path.splitext(name)[0] or name
    return os.path.join(DATA_DIR, f"{name}_{tokenizer}")


def get_args(argv=None):
    parser = ArgumentParser(description="Tokenize a corpus into train.bin / val.bin / meta.json.")
    # data
    parser.add_argument("--input", type=str, default="",
                        help="UTF-8 text file or folder; '' = this Python's stdlib source")
    parser.add_argument("--max_files", type=int, default=-1,
                        help="use only the first N files in sorted order (a folder or the stdlib); -1 = all")
    parser.add_argument("--max_train_tokens", type=int, default=-1,
                        help="keep only the first N tokens of the train split (val unchanged); -1 = all")
    parser.add_argument("--out_dir", type=str, default="",
                        help="'' = data/stdlib_<tokenizer> or data/<input name>_<tokenizer>, next to this script")
    # tokenizer
    parser.add_argument("--tokenizer", type=str, default="bytes", choices=["bytes", "gpt2"],
                        help="bytes (vocab 256, needs nothing) or gpt2 (BPE, vocab 50257)")
    parser.add_argument("--gpt2_vocab", type=str, default="",
                        help=f"gpt2.tiktoken file, for --tokenizer=gpt2; '' = ${GPT2_VOCAB_ENV}, "
                        "else data/gpt2.tiktoken")
    # checks
    parser.add_argument("--block_size", type=int, default=128,
                        help="each split must hold one block: at least block_size + 1 tokens")
    args = parser.parse_args(argv)
    # values argparse cannot check: one `error:` line each, naming the flag
    if args.max_files == 0 or args.max_files < -1:
        raise UserError(f"--max_files must be a number of files >= 1, or -1 for all; got {args.max_files}")
    if args.max_train_tokens == 0 or args.max_train_tokens < -1:
        raise UserError("--max_train_tokens must be a number of tokens >= 1, or -1 for all; got "
                        f"{args.max_train_tokens}")
    if args.block_size < 1:
        raise UserError(f"--block_size must be >= 1 (use train.py's --block_size), got {args.block_size}")
    if args.gpt2_vocab and args.tokenizer != "gpt2":
        raise UserError(f"--gpt2_vocab is only read with --tokenizer=gpt2 (this run: --tokenizer={args.tokenizer}); "
                        "add --tokenizer=gpt2 or drop --gpt2_vocab")
    if args.out_dir and os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
        raise UserError(f"--out_dir={args.out_dir} exists and is not a folder; choose another --out_dir")
    return args


def main(argv=None):
    args = get_args(argv)
    t0 = time.time()
    tok = load_tokenizer({"tokenizer": args.tokenizer}, args.gpt2_vocab or None)  # a missing vocab fails first
    if args.input:
        docs, source = read_input_corpus(args.input, args.max_files)
    else:
        docs, source = read_stdlib_corpus(args.max_files)
    where = f"--input={args.input}" if args.input else f"the Python {source['python']} stdlib at {source['path']}"
    if not any(text for _, text in docs):
        raise UserError(f"{where} has no text ({len(docs)} file(s), all empty); "
                        f"{'give it' if args.input else 'pass --input= with'} a file or folder that holds some")
    skipped = f", {source['skipped_not_utf8']} skipped (not UTF-8)" if "skipped_not_utf8" in source else ""
    print(f"corpus: {args.input or where}, {len(docs)} files{skipped}; tokenizer: {tok.name} (vocab {tok.vocab_size})")

    train_docs, val_docs = split_docs(docs)
    # disable=None: a bar on a terminal only, so a redirected log stays plain lines
    docs_bar = tqdm(train_docs + val_docs, desc="tokenize", unit="file", disable=None)
    arrays = [encode_doc(tok, text) for _, text in docs_bar]
    train = np.concatenate(arrays[: len(train_docs)])
    val = np.concatenate(arrays[len(train_docs):])
    train_cap = None
    if args.max_train_tokens != -1 and args.max_train_tokens < len(train):
        train_cap = dict(max_train_tokens=args.max_train_tokens, uncapped_train_tokens=len(train))
        train = train[:args.max_train_tokens]  # the first N tokens, in file order; val is left whole
    for split, ids in [("train", train), ("val", val)]:
        if len(ids) < args.block_size + 1:
            raise UserError(f"too little data for one block: the {split} split of {where} has {len(ids)} tokens, "
                            f"fewer than --block_size={args.block_size} + 1 (a block plus its next-token target); "
                            f"give more text or a smaller --block_size")

    meta = {"tokenizer": tok.name, "vocab_size": tok.vocab_size, "eot_token": tok.eot_token, "dtype": "uint16"}
    if tok.name == "gpt2":
        meta.update(gpt2_encoding="r50k_base", gpt2_vocab_sha256=GPT2_VOCAB_SHA256)
    meta.update(source=source, train_tokens=len(train), val_tokens=len(val),
                train_files=len(train_docs), val_files=len(val_docs))
    if train_cap:
        meta.update(train_cap)
    out_dir = args.out_dir or default_out_dir(args.input, args.tokenizer)
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out_dir: cannot create {out_dir} ({e.strerror}); choose another --out_dir") from None
    write_atomic(os.path.join(out_dir, "train.bin"), train)
    write_atomic(os.path.join(out_dir, "val.bin"), val)
    # meta.json last, after the bins it describes
    write_atomic(os.path.join(out_dir, "meta.json"), (json.dumps(meta, indent=2) + "\n").encode("utf-8"))

    n_chars = sum(len(text) for _, text in docs)
    print(f"wrote {out_dir} in {time.time() - t0:.1f}s: {n_chars / 1e6:.2f}M chars -> "
          f"train {len(train):,} tokens ({len(train_docs)} files, {train.nbytes / 1e6:.1f} MB"
          + (f", capped from {train_cap['uncapped_train_tokens']:,} by --max_train_tokens" if train_cap else "") + "), "
          f"val {len(val):,} tokens ({len(val_docs)} files, {val.nbytes / 1e6:.1f} MB)")
    return meta


if __name__ == "__main__":
    entry(main)
