"""Download MEDMO_MODEL (at MEDMO_REVISION) into the Hugging Face cache (HF_HOME), then exit.

Run before the server, with the server's own image and cache volume: docker/compose.yaml's
`medmo-download` service and the Kubernetes Deployment's `fetch-weights` init container. The first
start then loads from disk instead of downloading about 17 GB under a health check's or a startup
probe's deadline, and the server can run with HF_HUB_OFFLINE=1.

Safe to run again: files already in the cache are not downloaded twice, and an interrupted download
resumes. A MEDMO_MODEL that is a local folder needs nothing and is left alone. With HF_HUB_OFFLINE=1
it only checks that the cache already holds the model (for clusters without internet access, whose
cache was filled another way), and fails if it does not.
"""

from __future__ import annotations

import os
import sys

DEFAULT_MODEL = "MBZUAI/MedMO-8B-Next"  # app/settings.py's default


def main() -> int:
    model = os.environ.get("MEDMO_MODEL") or DEFAULT_MODEL
    revision = os.environ.get("MEDMO_REVISION") or None
    if os.path.isdir(model):
        print(f"fetch-weights: {model} is a local folder; nothing to download")
        return 0

    # Imported here so that the local-folder case works without the hub client's start-up cost.
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(repo_id=model, revision=revision)
    except Exception as exc:  # any failure is reported as one line and a non-zero exit
        print(f"fetch-weights: could not fetch {model}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(f"fetch-weights: {model} is in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
