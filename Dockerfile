# dropout-serve: the REST service with the default digits model baked in (see README.md, "Docker").
#
#   docker build -t dropout-serve .
#   docker build -t dropout-serve:gpu --build-arg TENSORFLOW='tensorflow[and-cuda]==2.21.*' .
#   docker run -p 8000:8000 dropout-serve

FROM python:3.11-slim AS build

# Another TensorFlow distribution instead of pyproject's choice (tensorflow-cpu on Linux x86_64).
ARG TENSORFLOW=""

ENV PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/dropout-serve/bin:$PATH
RUN python -m venv /opt/dropout-serve
WORKDIR /src

# Dependencies first, read from pyproject.toml alone, so editing the code does not download
# TensorFlow again. pip applies the platform markers. Both TensorFlow distributions install the
# same `tensorflow` package, so a TENSORFLOW swap removes one before adding the other.
# TensorFlow's C++ headers (~290 MB) only serve compiling custom ops, never serving.
COPY pyproject.toml ./
RUN python -c 'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"], sep="\n")' \
        > /tmp/requirements.txt \
 && pip install --no-cache-dir -r /tmp/requirements.txt \
 && if [ -n "$TENSORFLOW" ]; then \
        pip uninstall -y tensorflow-cpu tensorflow && pip install --no-cache-dir "$TENSORFLOW"; \
    fi \
 && rm -rf /opt/dropout-serve/lib/python3.11/site-packages/tensorflow/include

# The project itself, non-editable. --no-deps: the layer above has them (and a TENSORFLOW
# swap must not be undone by the tensorflow-cpu requirement).
COPY README.md ./
COPY app app
COPY training training
RUN pip install --no-cache-dir --no-deps .

# Models from the build context's artifacts/ if it has a digits version; otherwise train one,
# deterministically. The runtime user must read them, whatever modes the build context had.
COPY artifacts /srv/dropout-serve/artifacts
RUN python -m training --if-missing --seed 0 --artifacts /srv/dropout-serve/artifacts \
 && chmod -R a+rX /srv/dropout-serve/artifacts


FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/dropout-serve/bin:$PATH \
    DROPOUT_SERVE_MODEL_DIR=/srv/dropout-serve/artifacts \
    DROPOUT_SERVE_HOST=0.0.0.0 \
    DROPOUT_SERVE_PORT=8000

RUN useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin dropout-serve
COPY --from=build /opt/dropout-serve /opt/dropout-serve
COPY --from=build /srv/dropout-serve/artifacts /srv/dropout-serve/artifacts

USER 10001
WORKDIR /home/dropout-serve
EXPOSE 8000

# python rather than curl: the slim image has no curl. Fails on 503 (no model loaded yet).
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/health/ready' % os.environ['DROPOUT_SERVE_PORT'], timeout=4)"]

# Exec form: uvicorn is PID 1, so `docker stop`'s SIGTERM reaches it and it shuts down gracefully.
CMD ["python", "-m", "app"]
