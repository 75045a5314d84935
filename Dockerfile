# The ViT model as containers: the Streamlit app (default), the REST API, and a training image.
#
#   make all && docker build -t vit-app .                   # the app, model baked in
#   docker run --rm -p 8501:8501 vit-app                    # http://localhost:8501
#   docker run --rm -p 8501:8501 -v "$PWD/metadata/models:/app/metadata/models:ro" vit-app
#                                                           # another model, mounted over it
#   docker build --target api -t vit-api . && docker run --rm -p 8000:8000 vit-api
#   docker build --target train -t vit-train .              # CUDA PyTorch, for GPU nodes
#   docker build --target api-onnx -t vit-api-onnx .        # the API on ONNX Runtime, no torch
#                                                           # (model.pth exported while building)
#
# The app and API images hold CPU-only PyTorch and requirements-serve.txt (no training,
# tracking or test tools). The model is read from MODEL_PATH (default: the one copied in from
# metadata/models/model.pth, so train before building); mount a folder over
# /app/metadata/models, or set MODEL_PATH, to serve another model with the same image.

# One base for every stage: the Python that CI tests with, Debian slim.
FROM python:3.11-slim-bookworm AS base

# ---- serving dependencies, in a virtual environment copied whole into the final images ----
FROM base AS deps
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /build
COPY requirements-serve.txt .
# torch and torchvision from PyTorch's CPU index: PyPI's Linux wheels bring ~4 GB of CUDA
# libraries that a CPU server never loads. Their version ranges still come from the one file.
RUN grep -E '^torch(vision)?[<>=!~ ]' requirements-serve.txt > torch-cpu.txt \
    && pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu -r torch-cpu.txt \
    && pip install --no-cache-dir -r requirements-serve.txt

# ---- what the app and the API share: code, model, an unprivileged user ---------------------
FROM base AS runtime
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MPLBACKEND=Agg \
    MODEL_PATH=/app/metadata/models/model.pth
# A fixed numeric UID, so Kubernetes' runAsNonRoot can verify it (kubernetes/deployment.yml).
RUN useradd --no-log-init --create-home --uid 10001 --user-group app
COPY --from=deps /opt/venv /opt/venv
WORKDIR /app
COPY source/ source/
COPY metadata/models/model.pth metadata/models/model.pth
USER 10001:10001

# ---- training on a GPU node (kubernetes/jobs/train-job.yml) -------------------------------
# PyPI's torch is the CUDA build, which is what a GPU node needs; all of requirements.txt
# (tracking included). Built only with --target train; data and outputs live on a volume.
FROM base AS train
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    MPLBACKEND=Agg
RUN useradd --no-log-init --create-home --uid 10001 --user-group app
WORKDIR /app
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt
COPY source/ source/
USER 10001:10001
CMD ["python", "source/train.py", "--help"]

# ---- the REST API: docker build --target api ----------------------------------------------
FROM runtime AS api
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
CMD ["python", "source/serve.py", "--host", "0.0.0.0", "--port", "8000"]

# ---- the REST API without torch: docker build --target api-onnx ---------------------------
# The checkpoint is exported to ONNX at build time, in a throw-away stage that has CPU torch
# (deps) and onnxscript, and verified there against PyTorch on the model's test split (the
# embedded digits offline; other data must be reachable from the build, see export.py
# --data). The api-onnx image itself gets only requirements-onnx.txt and model.onnx: no
# torch, no Streamlit (about 200 MB of packages; docs/deployment.md).
FROM deps AS onnx-export
COPY requirements.txt .
RUN grep -E '^onnxscript[<>=!~ ]' requirements.txt > export.txt \
    && pip install --no-cache-dir -r export.txt
COPY source/ source/
COPY metadata/models/model.pth metadata/models/model.pth
RUN python source/export.py --model-path metadata/models/model.pth --out /build/model.onnx

FROM base AS onnx-deps
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /build
COPY requirements-onnx.txt .
RUN pip install --no-cache-dir -r requirements-onnx.txt

FROM base AS api-onnx
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PREDICT_BACKEND=onnx \
    MODEL_PATH=/app/metadata/models/model.onnx
RUN useradd --no-log-init --create-home --uid 10001 --user-group app
COPY --from=onnx-deps /opt/venv /opt/venv
WORKDIR /app
COPY source/ source/
COPY --from=onnx-export /build/model.onnx metadata/models/model.onnx
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
CMD ["python", "source/serve.py", "--host", "0.0.0.0", "--port", "8000"]

# ---- the Streamlit app: the default target (last stage) -----------------------------------
FROM runtime AS app
# No usage statistics sent from a server; no file watcher, the code never changes in here.
ENV STREAMLIT_BROWSER_GATHER_USAGE_STATS=false \
    STREAMLIT_SERVER_FILE_WATCHER_TYPE=none
# The app's settings (10 MB upload limit, headless, no usage statistics), found in the
# working directory as `streamlit run` starts.
COPY .streamlit/config.toml .streamlit/config.toml
EXPOSE 8501
# Streamlit answers "ok" on /_stcore/health once its server is up (also the Kubernetes probes).
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8501/_stcore/health', timeout=4)"]
CMD ["streamlit", "run", "source/app.py", "--server.address=0.0.0.0", "--server.port=8501", "--server.headless=true"]
