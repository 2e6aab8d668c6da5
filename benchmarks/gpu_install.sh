#!/usr/bin/env bash
# Runs ON THE GPU MACHINE: installs, offline, the wheels that benchmarks/gpu_wheels.sh
# built (ray, gymnasium, ale-py, dm-tree, tensorboardX, GPUtil and missing deps), then
# flowrl itself (editable, no deps).
#
#   bash benchmarks/gpu_install.sh store     # call 1 (carry .gpu_wheels/a): keep part a
#   bash benchmarks/gpu_install.sh install   # call 2 (carry .gpu_wheels/b): reassemble, install
#
# Parts are kept in $GPU_WHEEL_STORE (default /tmp/gpu_wheels), outside the repo, so that
# the next call's working-tree sync cannot touch them. The two calls must reach the same
# warm machine (the next call within its ~30 s idle window); on a fresh machine part a
# is missing and `install` says so.
#
# Installs into the python3 that holds torch (PY overrides). If pip cannot resolve the
# set against that environment, it falls back to installing, without dependency
# resolution, the carried wheels of the distributions that are missing there into
# /tmp/gpu_site; put that on PYTHONPATH in any case (harmless when empty):
#   export PYTHONPATH=$PWD:/tmp/gpu_site
set -euo pipefail

cd "$(dirname "$0")/.."
mode=${1:-install}
PY=${PY:-python3}
STORE=${GPU_WHEEL_STORE:-/tmp/gpu_wheels}
SITE=/tmp/gpu_site
mkdir -p "$STORE"

for part in a b; do
  if [[ -d .gpu_wheels/$part ]]; then
    cp -f .gpu_wheels/$part/* "$STORE/"
    echo "stored .gpu_wheels/$part in $STORE"
  fi
done

if [[ $mode == store ]]; then
  ls -l "$STORE"
  exit 0
fi

ray_name=$(cut -d' ' -f3 < "$STORE/SHA256SUMS" 2>/dev/null || true)
if [[ -z $ray_name || ! -f $STORE/$ray_name.part-00 || ! -f $STORE/$ray_name.part-01 ]]; then
  echo "gpu_install: a part of the ray wheel is missing in $STORE:" >&2
  ls -l "$STORE" >&2
  echo "(part a comes with call 1, part b with call 2: make both calls back to back on" \
       "the same warm machine)" >&2
  exit 2
fi
if [[ ! -f $STORE/$ray_name ]]; then
  cat "$STORE/$ray_name.part-00" "$STORE/$ray_name.part-01" > "$STORE/$ray_name"
fi
(cd "$STORE" && sha256sum -c SHA256SUMS)

mapfile -t reqs < "$STORE/REQUIREMENTS"
echo "installing offline: ${reqs[*]}"
start=$SECONDS
if ! "$PY" -m pip install -q --disable-pip-version-check --no-index --no-cache-dir \
     --find-links "$STORE" "${reqs[@]}"; then
  echo "gpu_install: pip could not resolve against this environment; installing the" \
       "missing distributions without dependency resolution into $SITE" >&2
  missing=$("$PY" - "$STORE" <<'EOF'
import glob, os, re, sys
from importlib import metadata
store = sys.argv[1]
for path in sorted(glob.glob(os.path.join(store, "*.whl"))):
    name = re.split(r"-\d", os.path.basename(path), maxsplit=1)[0]
    try:
        metadata.version(name.replace("_", "-"))
    except metadata.PackageNotFoundError:
        print(path)
EOF
)
  # shellcheck disable=SC2086
  "$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-cache-dir \
    --no-compile --target "$SITE" $missing
fi
echo "installed in $((SECONDS - start)) s"

# flowrl itself: editable, no deps (PYTHONPATH=$PWD does the same if this fails).
"$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps \
  --no-build-isolation -e . \
  || echo "gpu_install: editable install of flowrl failed; use PYTHONPATH=$PWD" >&2

PYTHONPATH=$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH} "$PY" - <<'EOF'
import gymnasium as gym, ray, torch, tree, tensorboardX, cv2, ale_py
import flowrl.envs.atari  # noqa: F401 (registers the ALE ids)
env = gym.make("ALE/Breakout-v5")
env.reset(seed=0)
print(f"ok: ray {ray.__version__}, gymnasium {gym.__version__}, ale-py {ale_py.__version__},"
      f" torch {torch.__version__}, cuda {torch.cuda.is_available()}"
      f" ({torch.cuda.get_device_name(0) if torch.cuda.is_available() else '-'}),"
      f" flowrl from {flowrl.__file__}")
EOF
