"""Container health check: exit 0 when MedMO Serve's /readyz answers 200, else 1.

Used by the images' HEALTHCHECK and by docker/compose.yaml. Written in Python because the PyTorch
base images have no curl or wget. The URL is the first argument, else /readyz on 127.0.0.1 and
MEDMO_PROBE_PORT (the images set 8001: probes are answered there even when the public port is full),
or MEDMO_PORT (8000) when no probe port is set. /readyz is open (no API key), and is 200 only once the
model is loaded and requests are taken; 503 while loading, draining on SIGTERM, or after the inference
worker died.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

TIMEOUT_S = 4.0


def default_url() -> str:
    port = os.environ.get("MEDMO_PROBE_PORT") or os.environ.get("MEDMO_PORT", "8000")
    return f"http://127.0.0.1:{port}/readyz"


def main(argv: list[str]) -> int:
    url = argv[1] if len(argv) > 1 else default_url()
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            status = response.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except (OSError, ValueError) as exc:
        # Connection refused is the normal answer while the model loads: the port opens afterwards.
        print(f"{url}: {exc}", file=sys.stderr)
        return 1
    if status != 200:
        print(f"{url}: HTTP {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
