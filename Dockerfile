# metapeft serve on Linux, CPU: an OpenAI-compatible server of many LoRA adapters.
#
#   docker build -t metapeft-serve .
#   docker run --rm -p 127.0.0.1:8000:8000 -v "$PWD/models:/models:ro" metapeft-serve \
#       --model /models/base --lora-modules support=/models/support --api-key "$KEY"
#
# The first stage builds the wheel (the C++ extension needs a compiler); the second
# installs it with the serve extra, as `pip install ".[serve]"` does from a clone.
FROM python:3.11-slim AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:3.11-slim
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir "$(ls /wheels/metapeft-*.whl)[serve]" && rm -rf /wheels \
    && useradd --create-home metapeft
USER metapeft
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health')"
# Inside a container the server binds every interface so that the published port
# reaches it; publish it on the host's loopback (as above) or set --api-key.
ENTRYPOINT ["metapeft", "serve", "--host", "0.0.0.0", "--port", "8000"]
