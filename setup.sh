#!/usr/bin/env bash
# Set up visual-memory on a fresh Debian/Ubuntu machine (Python 3.10+, CPU only).
# Idempotent: re-running only installs what is missing.
#   - a virtualenv in .venv with the CPU build of PyTorch (never a multi-GB CUDA build)
#   - the package with every extra: pip install -e '.[all]'
#   - Debian's dataset-fashion-mnist (demo data) and chromium (browser tests), when run as root
# Env: PYTHON (default python3); TORCH_INDEX_URL (PyTorch's CPU wheel index, where plain
#      `pip install torch` would fetch a CUDA build; not needed where a CPU wheel is local).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1

if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  need=()
  [ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || need+=(dataset-fashion-mnist)
  command -v chromium >/dev/null 2>&1 || need+=(chromium)
  if [ ${#need[@]} -gt 0 ]; then
    echo "setup: apt-get install ${need[*]}"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  fi
else
  echo "setup: not root or no apt-get; install dataset-fashion-mnist and chromium yourself for the demo and browser tests" >&2
fi

[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
if ! python -c "import torch" 2>/dev/null; then
  echo "setup: installing the CPU build of torch"
  pip install -q torch==2.13.0 ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} 2>&1 | grep -v "is ignored" || true
fi
echo "setup: installing visual-memory[all]"
pip install -q -e '.[all]' 2>&1 | grep -v "is ignored" || true
python -c "import torch, visual_memory; assert not torch.version.cuda, 'a CUDA build of torch was installed'; print('setup: ok (torch', torch.__version__ + ')')"
