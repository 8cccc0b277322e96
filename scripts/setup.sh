#!/usr/bin/env bash
# Create .venv with everything embedpipe and its tests need. Safe to re-run.
#   - torch first, so pip never pulls a multi-GB CUDA build on a machine without a GPU:
#     TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu picks the CPU build where the default index
#     would not (on our CI machines `pip install torch==2.13.0` takes a local CPU wheel).
#   - every other package at the version constraints.txt pins (scripts/lock.py writes it), as in the
#     images (Dockerfile): CI tests what ships.
#   - with --system, also the system packages the tests start (redis-server), via apt-get as root.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}

if [[ "${1:-}" == "--system" ]]; then
  # The tests start their own redis-server and prometheus (promtool checks configs and alert rules),
  # render the Kubernetes manifests with kubectl's kustomize and validate the compose file.
  missing=()
  command -v redis-server >/dev/null || missing+=(redis-server)
  command -v promtool >/dev/null || missing+=(prometheus)
  command -v docker-compose >/dev/null || missing+=(docker-compose)
  if (( ${#missing[@]} )); then
    if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
      echo "setup: installing ${missing[*]} (apt-get)"
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    else
      echo "setup: the tests need ${missing[*]} (Debian/Ubuntu: sudo apt-get install ${missing[*]})" >&2
      exit 1
    fi
  fi
  # kubectl renders deploy/ with its built-in kustomize. Debian's own archive has no current kubectl:
  # where none can be installed, the test validates the manifests unrendered and says so.
  if ! command -v kubectl >/dev/null && [[ $(id -u) == 0 ]]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq kubectl >/dev/null 2>&1 \
      || echo "setup: kubectl not installable here: the Kubernetes manifests are validated without rendering"
  fi
fi

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "setup: embedpipe needs Python >= 3.11 ($PYTHON is $("$PYTHON" --version 2>&1)); set PYTHON=python3.11" >&2
  exit 1
fi
[[ -x "$VENV/bin/python" ]] || { echo "setup: creating $VENV"; "$PYTHON" -m venv "$VENV"; }
if [[ "$VENV/.installed" -nt pyproject.toml && "$VENV/.installed" -nt constraints.txt ]]; then exit 0; fi  # up to date
pip=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  echo "setup: installing torch $TORCH_VERSION"
  "${pip[@]}" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==$TORCH_VERSION"
fi
echo "setup: installing embedpipe and its dependencies"
"${pip[@]}" -c constraints.txt -e ".[dev,onnx,office]"  # onnx: ONNX Runtime for EMBEDPIPE_BACKEND=onnx-int8 (CPU); office: DOCX/PPTX/XLSX
touch "$VENV/.installed"
