# fluxstream's image, one for GPU hosts: PyPI's torch is the CUDA build, whose wheels carry
# the CUDA libraries, so the base needs no CUDA (the host's driver comes in through the
# NVIDIA container toolkit). The CPU build of torch instead:
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu -t fluxstream:cpu .
# Every setting is a FLUXSTREAM_* variable or a flag after the image name; docs/deploying.md.
FROM debian:bookworm-slim

# wget: KubeRay's default probes of Ray pods run it.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv wget \
    && rm -rf /var/lib/apt/lists/*

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1
# KubeRay starts Ray through `bash -l`, whose /etc/profile resets PATH; profile.d puts the
# virtualenv back in front (the `$PATH` is meant literally, for the login shell).
# hadolint ignore=SC2016
RUN python3 -m venv /opt/venv \
    && echo 'PATH=/opt/venv/bin:$PATH' > /etc/profile.d/fluxstream-venv.sh \
    && useradd --create-home --uid 1000 --user-group fluxstream \
    && mkdir /models /cache \
    && chown fluxstream /cache

# torch first and alone: it is the largest layer and changes least.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://pypi.org/simple
RUN pip install --no-cache-dir --index-url "$TORCH_INDEX_URL" "torch==$TORCH_VERSION"

# Then the dependencies alone, read from pyproject.toml (the cluster extra too: Ray Serve
# and the Redis client), so that a change to the code reuses this layer.
WORKDIR /app
COPY pyproject.toml ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
print('\n'.join(p['dependencies'] + p['optional-dependencies']['cluster']))" \
        > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# The code, with the embedded model's weights (package data), installed in place: the
# demo page is served from web/ beside the packages. COPY keeps the files' modes, and a
# checkout's may be owner-only (a umask of 077, weights saved 0600): make them readable.
COPY README.md ./
COPY web web
COPY pipeline pipeline
COPY stream stream
RUN chmod -R a+rX /app \
    && pip install --no-cache-dir --no-deps --editable .

# The compile cache, fitted preview maps and url results live in /cache; hub ids resolve
# in its huggingface/ folder. Model folders are mounted under /models.
ENV FLUXSTREAM_HOST=0.0.0.0 \
    FLUXSTREAM_PORT=8000 \
    FLUXSTREAM_CACHE_DIR=/cache \
    FLUXSTREAM_DATA_DIR=/cache/images \
    HF_HOME=/cache/huggingface
# Numeric, so that Kubernetes' runAsNonRoot can check it.
USER 1000:1000
VOLUME ["/models", "/cache"]
EXPOSE 8000
# /health answers 503 while the model loads and warms up (minutes on a GPU with compile);
# failures within the start period count as "starting", not as "unhealthy".
HEALTHCHECK --interval=15s --timeout=5s --start-period=10m --retries=3 \
    CMD ["python", "-m", "stream.healthcheck"]
ENTRYPOINT ["fluxstream"]
