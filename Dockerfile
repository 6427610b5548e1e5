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
WORKDIR /app

# Dependencies first, for layer caching: the package metadata alone.
COPY pyproject.toml README.md ./
RUN mkdir -p service workers && touch service/__init__.py workers/__init__.py \
    && pip install ".[vision,nlp,postgres,peft]" \
    && pip uninstall -y trainplan

COPY service ./service
COPY workers ./workers
COPY migrations ./migrations
COPY alembic.ini ./
RUN pip install --no-deps .

USER trainplan
ENV TRAINPLAN_HOST=0.0.0.0 \
    TRAINPLAN_PORT=8000
EXPOSE 8000

HEALTHCHECK --interval=15s --timeout=3s --start-period=30s --retries=3 \
    CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2).status == 200 else 1)"

# The API (no embedded worker in production: workers are their own containers).
CMD ["trainplan", "serve", "--no-worker"]
