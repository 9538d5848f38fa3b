#!/usr/bin/env bash
# Set up everything on a fresh machine: Fashion-MNIST (Debian package, where apt is available),
# a virtualenv in .venv with PyTorch and this project (with the dev and wandb-report extras). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "setup: installing Fashion-MNIST (Debian package dataset-fashion-mnist)"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null) \
    || echo "setup: could not install dataset-fashion-mnist; pass --data-dir or set SPURIOUS_DATA"
fi

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
if ! .venv/bin/python -c "import torch, torchvision" >/dev/null 2>&1; then
  echo "setup: installing torch and torchvision"
  .venv/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1
fi
echo "setup: installing rare-spurious-study and its dependencies"
.venv/bin/python -m pip install -q -e ".[dev,wandb-report]"
echo "setup: done (.venv/bin/study --help)"
