# dropout-serve: the REST service with the default digits model baked in (see README.md, "Docker").
#
#   docker build -t dropout-serve .
#   docker build -t dropout-serve:gpu --build-arg TENSORFLOW='tensorflow[and-cuda]==2.21.*' .
#   docker run -p 8000:8000 -p 8001:8001 dropout-serve
#
# Three stages: `serve` installs what the server imports (pyproject's dependencies) into a venv;
# `train` adds training's packages (the [train] extra) on top of it and trains the digits model;
# the runtime image copies the venv from `serve` and the model from `train`, so scikit-learn,
# SciPy and matplotlib never reach it.

FROM python:3.11-slim AS serve

# Another TensorFlow distribution instead of pyproject's choice (tensorflow-cpu on Linux x86_64).
ARG TENSORFLOW=""

ENV PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/dropout-serve/bin:$PATH
# binutils for strip, in this stage only.
RUN apt-get update -qq \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends binutils >/dev/null \
 && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/dropout-serve
WORKDIR /src

# Dependencies first, read from pyproject.toml alone, so editing the code does not download
# TensorFlow again. pip applies the platform markers. Both TensorFlow distributions install the
# same `tensorflow` package, so a TENSORFLOW swap removes one before adding the other. Packages
# that pyproject's [tool.dropout-serve] no-deps lists go in without their requirements (as the
# Makefile does; pyproject says why). Then what serving never uses goes:
# TensorFlow's C++ headers (~290 MB, for compiling custom ops), libclang (64 MB, a TensorFlow
# dependency for generating code), the packages' own test suites (~18 MB, numpy's nearly all) and
# the debug symbols of the shared libraries (~290 MB; `strip --strip-unneeded` keeps the dynamic
# symbols that loading needs). Libraries that auditwheel grafted into `*.libs/` folders are left
# as they are.
COPY pyproject.toml ./
RUN python -c 'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"], sep="\n")' \
        > /tmp/requirements.txt \
 && python -c 'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb")).get("tool", {}).get("dropout-serve", {}).get("no-deps", []), sep="\n")' \
        > /tmp/no-deps.txt \
 && pip install --no-cache-dir -r /tmp/requirements.txt \
 && if grep -q . /tmp/no-deps.txt; then pip install --no-cache-dir --no-deps -r /tmp/no-deps.txt; fi \
 && if [ -n "$TENSORFLOW" ]; then \
        pip uninstall -y tensorflow-cpu tensorflow && pip install --no-cache-dir "$TENSORFLOW"; \
    fi \
 && pip uninstall -y libclang \
 && cd /opt/dropout-serve/lib/python3.11/site-packages \
 && rm -rf tensorflow/include \
 && find . -type d -name tests -prune -exec rm -rf {} + \
 && find . -name '*.so*' -type f -not -path '*.libs/*' -exec strip --strip-unneeded {} +

# The project itself, non-editable. --no-deps: the layer above has them (and a TENSORFLOW
# swap must not be undone by the tensorflow-cpu requirement).
COPY README.md LICENSE ./
COPY app app
COPY training training
RUN pip install --no-cache-dir --no-deps .


FROM serve AS train

# Training's packages, on top of the serving venv (this stage only).
RUN python -c 'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["train"], sep="\n")' \
        > /tmp/train-requirements.txt \
 && pip install --no-cache-dir -r /tmp/train-requirements.txt

# Models from the build context's artifacts/ if it has a digits version; otherwise train one,
# deterministically. The runtime user must read them, whatever modes the build context had.
COPY artifacts /srv/dropout-serve/artifacts
RUN TF_CPP_MIN_LOG_LEVEL=1 python -m training --if-missing --seed 0 --artifacts /srv/dropout-serve/artifacts \
        >/tmp/training.log \
 && tail -12 /tmp/training.log \
 && chmod -R a+rX /srv/dropout-serve/artifacts


FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/dropout-serve/bin:$PATH \
    DROPOUT_SERVE_MODEL_DIR=/srv/dropout-serve/artifacts \
    DROPOUT_SERVE_HOST=0.0.0.0 \
    DROPOUT_SERVE_PORT=8000 \
    DROPOUT_SERVE_GRPC_PORT=8001

RUN useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin dropout-serve
COPY --from=serve /opt/dropout-serve /opt/dropout-serve
COPY --from=train /srv/dropout-serve/artifacts /srv/dropout-serve/artifacts

USER 10001
WORKDIR /home/dropout-serve
# HTTP (REST: native, TF Serving, Open Inference Protocol v2) and gRPC (Open Inference Protocol v2).
EXPOSE 8000 8001

# python rather than curl: the slim image has no curl. Fails on 503 (no model loaded yet).
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/health/ready' % os.environ['DROPOUT_SERVE_PORT'], timeout=4)"]

# Exec form: uvicorn is PID 1, so `docker stop`'s SIGTERM reaches it and it shuts down gracefully.
# `docker run IMAGE python -m app --help` lists the options, each also a DROPOUT_SERVE_* variable (-e).
CMD ["python", "-m", "app"]
