# syntax=docker/dockerfile:1
# The Runpod serverless worker on the official vLLM image.
#
# vLLM, CUDA and the GPU kernels come from the vLLM project's image (its own Python,
# untouched); the worker runs from a virtual environment of its own in /opt/worker and
# starts vLLM with the image's interpreter (VLLM_PYTHON). Weights come from the network
# volume (HF_HOME) or the hub, or are baked in with BAKE_MODEL.
#
# Build and push (tests/test_deploy.py checks these lines against this file):
#   docker build --platform linux/amd64 -t <user>/vllm-worker:0.32.0 .
#   docker push <user>/vllm-worker:0.32.0
# With a model baked in (HF_TOKEN only for gated models, passed as a build secret):
#   docker build --platform linux/amd64 --build-arg BAKE_MODEL=openai/gpt-oss-20b --secret id=hf_token,env=HF_TOKEN -t <user>/vllm-worker:gpt-oss-20b .
#   docker push <user>/vllm-worker:gpt-oss-20b

# The vLLM release this worker is tested with (the Makefile's VLLM_VERSION).
ARG VLLM_IMAGE_TAG=v0.32.0
FROM vllm/vllm-openai:${VLLM_IMAGE_TAG}

# The image's interpreter that imports vLLM.
ARG VLLM_PYTHON=/usr/bin/python3
# A hub repo id to download into the image at build time ("" = none: weights come at run time).
ARG BAKE_MODEL=""
ARG BAKE_REVISION=main

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
WORKDIR /app

# The worker's own environment: nothing installed here can change what vLLM runs on.
COPY requirements.txt ./
RUN "${VLLM_PYTHON}" -c "import importlib.metadata as m; print('vLLM', m.version('vllm'))" \
    && "${VLLM_PYTHON}" -m venv /opt/worker \
    && /opt/worker/bin/pip install --no-cache-dir --disable-pip-version-check -r requirements.txt

# Baked weights go to a plain folder served through MODEL_PATH; this layer comes before the
# code so that editing the worker does not download the model again. The token is read from
# the secret's file and never stored in a layer.
RUN --mount=type=secret,id=hf_token,required=false \
    if [ -n "${BAKE_MODEL}" ]; then \
        HF_TOKEN_PATH=/run/secrets/hf_token HF_HUB_DISABLE_UPDATE_CHECK=1 \
        /opt/worker/bin/hf download "${BAKE_MODEL}" --revision "${BAKE_REVISION}" \
            --local-dir /models/baked --exclude "original/*" --exclude "metal/*" \
        && rm -rf /models/baked/.cache; \
    fi

COPY *.py ./
COPY worker ./worker

# Set here: HF_HOME (read by vLLM and huggingface_hub too, not only by the worker), the
# interpreter that has vLLM, and where a baked model is. Unbaked, MODEL_NAME, MODEL_PATH and
# HF_HUB_OFFLINE stay empty, which the worker reads as unset. Every other setting keeps the
# code's default (settings.DEFAULTS): restating one would turn "unset" into "set", which is
# not always the same (an explicit MAX_MODEL_LEN, for one). tests/test_deploy.py loads this
# environment with settings.load and compares.
ENV HF_HOME=/runpod-volume/huggingface \
    VLLM_PYTHON=${VLLM_PYTHON} \
    MODEL_NAME=${BAKE_MODEL} \
    MODEL_PATH=${BAKE_MODEL:+/models/baked} \
    HF_HUB_OFFLINE=${BAKE_MODEL:+1} \
    PYTHONUNBUFFERED=1

# A baked model must be one the worker accepts (complete, not GGUF): fail the build otherwise.
# (The check makes the worker's link to the weights: in a scratch HF_HOME, not in the image.)
RUN if [ -n "${BAKE_MODEL}" ]; then \
        HF_HOME=/tmp/bake-check /opt/worker/bin/python test_vllm_command.py --locate-only \
        && rm -rf /tmp/bake-check; \
    fi

# The base image's entrypoint (`vllm serve`) is cleared: the worker starts vLLM itself.
ENTRYPOINT []
CMD ["/opt/worker/bin/python", "handler.py"]
