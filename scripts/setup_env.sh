#!/usr/bin/env bash
# Create or reuse the project's virtual environment with the full, real stack:
# torch + torchvision, the OpenMMLab stack (mmcv 2.1.0 built from source with CPU ops; mmengine,
# mmdet, mmsegmentation and mmpretrain from the package index),
# the test tools, dyrep_fx itself (editable), and the Fashion-MNIST data from Debian.
#
# Idempotent: a stamp file records the inputs it was made from; a second run with the
# same inputs returns in a second. The mmcv wheel is cached in $DYREP_WHEELHOUSE, so a
# new venv on the same machine does not rebuild it (~7.5 min on 2 cores with -g0).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${DYREP_VENV:-$ROOT/.venv}"
WHEELHOUSE="${DYREP_WHEELHOUSE:-$HOME/.cache/dyrep_fx/wheels}"
PY="${PYTHON:-python3}"
TORCH_PIN="${DYREP_TORCH_PIN:-torch==2.14.1 torchvision==0.29.1}"
STAMP="$VENV/.dyrep_fx_stamp"
want_stamp="$(cat "$ROOT/pyproject.toml" "$ROOT/scripts/setup_env.sh" | sha256sum | cut -c1-16) $TORCH_PIN"

log() { echo "[setup $(date +%H:%M:%S)] $*" >&2; }

install_fashion_mnist() {
  local dir=/usr/share/datasets/fashion-mnist
  if [ -f "$dir/train-images-idx3-ubyte.gz" ]; then return 0; fi
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    log "installing Debian package dataset-fashion-mnist"
    apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null; } \
      || log "WARNING: could not install dataset-fashion-mnist; the demo will say how to get it"
  else
    log "WARNING: not root; install Debian's dataset-fashion-mnist (or set DYREP_FASHION_MNIST) for the demo"
  fi
}

build_mmcv_wheel() {
  # mmcv 2.1.0 has no wheel for this torch; build its CPU ops from the PyPI sdist once.
  if ls "$WHEELHOUSE"/mmcv-2.1.0-*.whl >/dev/null 2>&1; then return 0; fi
  mkdir -p "$WHEELHOUSE"
  local src; src="$(mktemp -d)"
  log "building mmcv 2.1.0 with CPU ops from source (about 8 min on 2 cores)"
  "$VENV/bin/pip" download -q --no-deps --no-binary :all: --no-build-isolation mmcv==2.1.0 -d "$src"
  tar xzf "$src/mmcv-2.1.0.tar.gz" -C "$src"
  # torch >= 2.14 headers require C++20; mmcv's setup.py forces C++17.
  sed -i 's/-std=c++17/-std=c++20/g' "$src/mmcv-2.1.0/setup.py"
  # CUDA_VISIBLE_DEVICES="": setup.py builds CUDA ops whenever a GPU is visible.
  CUDA_VISIBLE_DEVICES="" MMCV_WITH_OPS=1 FORCE_CUDA=0 MAX_JOBS="$(nproc)" CFLAGS="-g0" \
    "$VENV/bin/pip" wheel -q --no-build-isolation --no-deps "$src/mmcv-2.1.0" -w "$WHEELHOUSE"
  rm -rf "$src"
}

install_fashion_mnist

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want_stamp" ]; then
  exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV"
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/pip" install -q)
log "installing $TORCH_PIN"
# shellcheck disable=SC2086
"${PIP[@]}" $TORCH_PIN
"${PIP[@]}" "setuptools<81" wheel ninja
"${PIP[@]}" mmengine==0.10.7
build_mmcv_wheel
log "installing the OpenMMLab stack and dyrep_fx"
"${PIP[@]}" --find-links "$WHEELHOUSE" mmcv==2.1.0
"${PIP[@]}" --find-links "$WHEELHOUSE" -e "$ROOT[mm,test,demo]"
# deepforest ships the annotated aerial images the detection tests train on; only its data files are
# read (importing it would need pytorch-lightning), so its dependencies are not installed.
"${PIP[@]}" --no-deps deepforest==2.1.0
"$VENV/bin/python" -c "import mmcv.ops, mmdet.models, mmseg.models, mmpretrain.models, dyrep_fx, dyrep_fx.passes" 2>/dev/null
echo "$want_stamp" > "$STAMP"
log "environment ready: $VENV"
