# trainplan: one image for the API and the GPU worker.
# torch 2.14.1 from PyPI is the CUDA 13 build (it bundles the CUDA runtime, cuBLAS and cuDNN as
# nvidia-* wheels), so this image runs on any node with an NVIDIA driver recent enough for CUDA 13
# and the NVIDIA container toolkit; without a GPU the worker plans on the simulated device.
FROM python:3.11-slim AS base

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN useradd --create-home --uid 10001 trainplan

# Dependencies first, for layer caching: the exact versions of the serving lock file
# (requirements/serve.txt: serving and planning, no test tools).
COPY requirements/serve.txt /tmp/requirements/serve.txt
RUN pip install -r /tmp/requirements/serve.txt

# The package itself, installed as a wheel would be: migrations travel inside it
# (service.store.migrations), so nothing runs from the source tree, which is removed.
COPY pyproject.toml setup.py README.md /tmp/src/
COPY service /tmp/src/service
COPY workers /tmp/src/workers
COPY migrations /tmp/src/migrations
RUN pip install --no-deps /tmp/src && rm -rf /tmp/src /tmp/requirements

USER trainplan
WORKDIR /home/trainplan
ENV TRAINPLAN_HOST=0.0.0.0 \
    TRAINPLAN_PORT=8000
EXPOSE 8000

HEALTHCHECK --interval=15s --timeout=3s --start-period=30s --retries=3 \
    CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2).status == 200 else 1)"

# The API (no embedded worker in production: workers are their own containers).
CMD ["trainplan", "serve", "--no-worker"]
