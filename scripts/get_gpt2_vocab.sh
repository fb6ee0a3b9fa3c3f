#!/usr/bin/env bash
# Fetch GPT-2's BPE vocabulary for prepare_data.py --tokenizer=gpt2, without tiktoken's own download.
#
#   bash scripts/get_gpt2_vocab.sh            # writes data/gpt2.tiktoken (data/ is git-ignored)
#   PYTHON=/path/to/python bash scripts/get_gpt2_vocab.sh
#
# tiktoken's GPT-2 encoding (r50k_base) reads a vocabulary file that tiktoken downloads from the
# internet on first use. The same file, byte for byte, ships as whisper/assets/gpt2.tiktoken inside
# the source distribution of the openai-whisper package, so this script fetches that sdist with pip
# (through whatever package index pip is configured to use), extracts the one file and checks its
# sha256. Nothing is installed. pip still prepares the sdist's metadata, which needs setuptools in
# an isolated build environment; if that fails (no build dependencies reachable), the script says
# so and retries with --no-build-isolation, which uses the setuptools of the running environment.
set -euo pipefail

PYTHON="${PYTHON:-$(command -v python || command -v python3)}"
VERSION=20250625
MEMBER="openai_whisper-${VERSION}/whisper/assets/gpt2.tiktoken"
SHA256=306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="$ROOT/data/gpt2.tiktoken"

sha256_of() { "$PYTHON" -c 'import hashlib, sys; print(hashlib.sha256(open(sys.argv[1], "rb").read()).hexdigest())' "$1"; }

if [[ -f "$DEST" && "$(sha256_of "$DEST")" == "$SHA256" ]]; then
    echo "$DEST already present, sha256 ok"
    exit 0
fi

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

PIP=("$PYTHON" -m pip download --no-deps --no-binary :all: "openai-whisper==$VERSION" -d "$TMP")
if ! "${PIP[@]}"; then
    echo "pip download failed; retrying with --no-build-isolation (uses this environment's setuptools)" >&2
    "${PIP[@]}" --no-build-isolation
fi

SDIST="$TMP/openai_whisper-${VERSION}.tar.gz"
[[ -f "$SDIST" ]] || { echo "error: pip did not save $SDIST" >&2; exit 1; }
tar -xzf "$SDIST" -C "$TMP" "$MEMBER"

GOT="$(sha256_of "$TMP/$MEMBER")"
if [[ "$GOT" != "$SHA256" ]]; then
    echo "error: sha256 mismatch for gpt2.tiktoken: got $GOT, expected $SHA256" >&2
    exit 1
fi

mkdir -p "$(dirname "$DEST")"
cp "$TMP/$MEMBER" "$DEST.tmp"
mv "$DEST.tmp" "$DEST"  # atomic: a half-written file never sits at $DEST
echo "wrote $DEST ($(wc -c < "$DEST") bytes, sha256 $SHA256)"
