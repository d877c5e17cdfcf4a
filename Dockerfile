# mmoe-ds training image (see docs/docker.md).
#
# GPU (default): CUDA torch comes from the pinned base image; everything else is pinned by
# requirements/constraints.txt. The devel flavour carries nvcc, which DeepSpeed needs to JIT-build
# its ops into TORCH_EXTENSIONS_DIR.
#   docker build -t mmoe-ds:gpu .
# CPU variant: any Python 3.10+ base plus a pinned CPU torch, e.g.
#   docker build -t mmoe-ds:cpu --build-arg BASE_IMAGE=python:3.11-slim-bookworm \
#     --build-arg TORCH_SPEC=torch==2.13.0 --build-arg PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu .
ARG BASE_IMAGE=pytorch/pytorch:2.9.1-cuda12.8-cudnn9-devel

# ---- builder: the mmoe-ds wheel, nothing else -------------------------------------------------
FROM ${BASE_IMAGE} AS builder
# Empty by default: pip uses its own configuration. Set them to build behind a mirror or offline.
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_CERT
WORKDIR /src
COPY pyproject.toml README.md ./
COPY mmoe_ds ./mmoe_ds
RUN python -m pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# ---- runtime -----------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS runtime
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_CERT
# A torch to install first (CPU variant); empty keeps the base image's torch.
ARG TORCH_SPEC=""
# The unprivileged user the image runs as (bind-mounted data/ and runs/ should be writable by it).
ARG APP_UID=1000

# TOKENIZERS_PARALLELISM is no secret (hadolint DL3064 matches the substring "TOKEN").
# hadolint ignore=DL3064
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    OMP_NUM_THREADS=8 \
    TOKENIZERS_PARALLELISM=false \
    HF_HOME=/cache/huggingface \
    TORCH_EXTENSIONS_DIR=/cache/torch_extensions \
    TRITON_CACHE_DIR=/cache/triton \
    MPLCONFIGDIR=/cache/matplotlib

# uid 1000 may already exist (Ubuntu 24.04 bases ship "ubuntu"); reuse it, else create "mmoe".
RUN if ! getent passwd "${APP_UID}" >/dev/null; then \
      useradd --uid "${APP_UID}" --user-group --create-home --shell /bin/bash mmoe; \
    fi \
 && mkdir -p "${HF_HOME}" "${TORCH_EXTENSIONS_DIR}" "${TRITON_CACHE_DIR}" "${MPLCONFIGDIR}" \
      /workspace/data /workspace/runs \
 && chown -R "${APP_UID}:$(id -g "${APP_UID}")" /cache /workspace

COPY requirements/constraints.txt /tmp/constraints.txt
COPY --from=builder /wheels /tmp/wheels
# TORCH_SPEC carries its own pin (torch==X); the wheel's dependencies are pinned by the constraints.
# hadolint ignore=DL3013
RUN if [ -n "${TORCH_SPEC}" ]; then python -m pip install --no-cache-dir "${TORCH_SPEC}"; fi \
 && wheel="$(ls /tmp/wheels/mmoe_ds-*.whl)" \
 && python -m pip install --no-cache-dir -c /tmp/constraints.txt "${wheel}[train]" \
 && rm -rf /tmp/wheels /tmp/constraints.txt

WORKDIR /workspace
COPY recipes ./recipes
COPY ds_configs ./ds_configs
COPY launch ./launch

USER ${APP_UID}

# Build-time smoke, as the runtime user: the package and DeepSpeed's MoE import, the CLI starts,
# and the CMD's recipe + DeepSpeed config pass the trainer's check (no data in the image: the
# recipe prepares it on first run).
RUN python -c "import mmoe_ds, deepspeed.moe.layer" \
 && mmoe-ds --help >/dev/null \
 && python -m mmoe_ds.train --check --recipe recipes/gpu_node.json \
      --deepspeed_config ds_configs/zero1_bf16.json --world_size 8

CMD ["deepspeed", "--num_gpus", "8", "--module", "mmoe_ds.train", "--recipe", "recipes/gpu_node.json", "--deepspeed_config", "ds_configs/zero1_bf16.json"]
