#!/usr/bin/env bash
# Wheels for running the service, the engine tests and the benches on a GPU host without network that
# already holds a CUDA (or ROCm) PyTorch stack: torch, torchvision, transformers, tokenizers, accelerate,
# numpy, pillow, prometheus-client, tqdm, httpx, anyio, h11, click, pytest and hypothesis, as a PyTorch
# image with transformers does. Everything else the service imports, at the versions in
# docker/constraints.txt, for that host's Python and x86-64 Linux.
#
#   bash bench/offline-wheels.sh DIR [PYTHON_VERSION]        # PYTHON_VERSION: the host's, 3.12 by default
#
# then on the host, from the repository's root:
#   python3 -m pip install --no-index --no-deps --target /tmp/site DIR/*.whl && export PYTHONPATH=/tmp/site
set -euo pipefail
cd "$(dirname "$0")/.."

dir=${1:?usage: bash bench/offline-wheels.sh DIR [PYTHON_VERSION]}
python_version=${2:-3.12}

# Runtime: the web stack, settings, the image pipeline's DICOM decoders, the PACS client, and requests, which
# qwen-vl-utils imports as it loads. Its video decoder (av) is left out: the service only ever hands it
# decoded still images.
RUNTIME="fastapi fastapi-offline starlette annotated-doc opentelemetry-api pydantic pydantic-core
pydantic-settings python-dotenv annotated-types typing-inspection python-multipart uvicorn httptools
qwen-vl-utils pydicom highdicom pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg pylibjpeg-rle pyjpegls
httpx2 httpcore2 truststore requests urllib3 charset-normalizer"
# The engine tests (tests/engine) beside them.
TESTS="pytest-asyncio pytest-timeout asgi-lifespan sniffio"

pinned() {
    # NAME==VERSION from the constraints where they pin it; the newest release otherwise.
    local name=$1 line
    line=$(grep -i -m1 "^${name}==" docker/constraints.txt || true)
    echo "${line:-$name}"
}

requirements=()
for name in $RUNTIME $TESTS; do
    requirements+=("$(pinned "$name")")
done

# pip matches manylinux tags exactly: name every glibc a wheel may be built for, up to the host's (2.39).
platforms=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)
for minor in $(seq 17 39); do
    platforms+=(--platform "manylinux_2_${minor}_x86_64")
done

mkdir -p "$dir"
python3 -m pip download --quiet --no-deps --only-binary=:all: \
    --python-version "$python_version" --implementation cp "${platforms[@]}" \
    -d "$dir" "${requirements[@]}"
echo "$(ls "$dir"/*.whl | wc -l) wheels, $(du -sh "$dir" | cut -f1), in $dir"
