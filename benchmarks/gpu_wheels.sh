#!/usr/bin/env bash
# Builds, HERE (a machine that can reach PyPI), the wheels that benchmarks/gpu_check.py
# needs on the GPU machine: Python 3.12, manylinux x86_64, torch already installed there,
# no package registry reachable there, at most 64 MiB carried per call.
#
#   bash benchmarks/gpu_wheels.sh            # -> .gpu_wheels/a and .gpu_wheels/b
#
# What goes in: ray[tune] (its ~79 MB wheel split in two halves, one per folder),
# gymnasium, ale-py (ships the Atari ROMs since 0.9), dm-tree, tensorboardX, GPUtil
# (built here from its sdist: it has no wheel), and their dependencies, EXCEPT the big
# ones the GPU machine's image already has (numpy, pandas, pyarrow and pandas' own
# deps; torch and CUDA are never pulled). The small dependencies are all included,
# even those the image has: pip keeps an installed version that satisfies a
# requirement, and uses a carried one only where the image lacks it or has one too old.
#
# Each folder stays under ~60 MiB, so that it plus the working tree (~2 MiB) fits the
# run tool's 64 MiB. Both are ignored by git through .git/info/exclude (added here).
# On the GPU machine, benchmarks/gpu_install.sh stores part a (call 1), then
# reassembles the ray wheel and installs everything offline (call 2).
#
# Environment overrides: PY (python used for pip here, default python3),
# RAY_VERSION, GYMNASIUM_VERSION, ALE_VERSION, DMTREE_VERSION, TBX_VERSION.
set -euo pipefail

cd "$(git rev-parse --show-toplevel)"
PY=${PY:-python3}
RAY_VERSION=${RAY_VERSION:-2.60.0}
GYMNASIUM_VERSION=${GYMNASIUM_VERSION:-1.4.0}
ALE_VERSION=${ALE_VERSION:-0.12.1}
DMTREE_VERSION=${DMTREE_VERSION:-0.1.10}
TBX_VERSION=${TBX_VERSION:-2.6.5}
GPUTIL_VERSION=1.4.0
DEST=.gpu_wheels
LIMIT_MIB=60

# Already in the GPU image (see /work/.library/device/KINDS.md) and too big to carry.
EXCLUDE_RE='^(numpy|pandas|pyarrow|tzdata|python_dateutil|six|torch|triton|nvidia_.*)-'

# pip's notes about configured local indexes that do not exist here.
quiet() { grep -v 'is ignored: it is neither a file nor a directory' || true; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/all"

platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 \
         manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux_2_5_x86_64 \
         manylinux1_x86_64; do
  platforms+=(--platform "$p")
done

echo "== downloading wheels for CPython 3.12 manylinux x86_64 (with dependencies)"
"$PY" -m pip download -q --disable-pip-version-check --only-binary=:all: \
  --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
  "${platforms[@]}" -d "$work/all" \
  "ray[tune]==${RAY_VERSION}" "gymnasium==${GYMNASIUM_VERSION}" "ale-py==${ALE_VERSION}" \
  "dm-tree==${DMTREE_VERSION}" "tensorboardX==${TBX_VERSION}" 2> >(quiet >&2)

echo "== building GPUtil ${GPUTIL_VERSION} (sdist only on PyPI; pure Python)"
if ! "$PY" -m pip wheel -q --disable-pip-version-check --no-deps -w "$work/all" \
     "GPUtil==${GPUTIL_VERSION}" 2> >(quiet >&2); then
  echo "   GPUtil wheel failed: skipped (only scripts/train.py's GPU hint uses it)"
fi

ray_whl=$(ls "$work/all"/ray-"${RAY_VERSION}"-cp312-*.whl)
ray_name=$(basename "$ray_whl")
# ale-py since 0.9 carries the ROMs inside the wheel: check that this one does.
listing=$("$PY" -m zipfile -l "$work"/all/ale_py-*.whl)
if [[ ${listing,,} != *roms/breakout.bin* ]]; then
  echo "ale-py wheel has no Breakout ROM: pick ale-py >= 0.9" >&2
  exit 1
fi

rm -rf "$DEST"
mkdir -p "$DEST/a" "$DEST/b"
echo "== splitting $ray_name in two halves"
split -n 2 -d "$ray_whl" "$work/$ray_name.part-"
mv "$work/$ray_name.part-00" "$DEST/a/"
mv "$work/$ray_name.part-01" "$DEST/b/"
(cd "$work/all" && sha256sum "$ray_name") > "$DEST/b/SHA256SUMS"
cp "$DEST/b/SHA256SUMS" "$DEST/a/SHA256SUMS"
rm "$ray_whl"

# Part a: the first half of ray and ale-py (the largest other wheel); part b: the rest.
mv "$work"/all/ale_py-*.whl "$DEST/a/"
for whl in "$work"/all/*.whl; do
  name=$(basename "$whl")
  if [[ "$name" =~ $EXCLUDE_RE ]]; then
    echo "   not carried (in the GPU image): $name"
    continue
  fi
  mv "$whl" "$DEST/b/"
done

cat > "$DEST/b/REQUIREMENTS" <<EOF
ray[tune]==${RAY_VERSION}
gymnasium==${GYMNASIUM_VERSION}
ale-py==${ALE_VERSION}
dm-tree==${DMTREE_VERSION}
tensorboardX==${TBX_VERSION}
EOF
if ls "$DEST"/b/[Gg][Pp][Uu][Tt]il-*.whl >/dev/null 2>&1; then
  echo "GPUtil==${GPUTIL_VERSION}" >> "$DEST/b/REQUIREMENTS"
fi

exclude="$(git rev-parse --git-common-dir)/info/exclude"
mkdir -p "$(dirname "$exclude")"
grep -qxF "/$DEST/" "$exclude" 2>/dev/null || echo "/$DEST/" >> "$exclude"

echo "== sizes"
tree_bytes=$( (git ls-files -z; git ls-files -z --others --exclude-standard) \
              | xargs -0 -r du -cb 2>/dev/null | tail -1 | cut -f1)
status=0
for part in a b; do
  bytes=$(du -cb "$DEST/$part" | tail -1 | cut -f1)
  mib=$((bytes / 1048576))
  total=$(((bytes + tree_bytes) / 1048576))
  echo "   $DEST/$part: $mib MiB ($(ls "$DEST/$part" | wc -l) files); with the working tree:" \
       "$total MiB of the 64 MiB a call may carry"
  if (( mib >= LIMIT_MIB || total >= 64 )); then
    echo "   $DEST/$part is too big" >&2
    status=1
  fi
done
echo "   working tree (tracked + untracked, not ignored): $((tree_bytes / 1024)) KiB"
ls -l "$DEST/a" "$DEST/b"
exit $status
