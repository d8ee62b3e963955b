"""`python -m stream.healthcheck`: the container image's HEALTHCHECK; exit 0 when /health
answers 200.

/health answers 503 while the model loads and warms up, while draining on shutdown and
after the engine failed; each of those exits 1, and says the status, which `docker inspect`
shows. The image gives warming its due through HEALTHCHECK's start period, during which
Docker counts a failure as "starting", not "unhealthy". This runs beside the server, not in
it, so it finds the server through FLUXSTREAM_HOST and FLUXSTREAM_PORT (a `--port` flag
given to the server is not seen here).
"""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request

TIMEOUT_S = 4
# A server listening on every interface is reached through loopback.
ANY_ADDRESS = frozenset({"", "0.0.0.0", "::"})


def health_url(environ: dict[str, str]) -> str:
    host = environ.get("FLUXSTREAM_HOST", "127.0.0.1")
    port = environ.get("FLUXSTREAM_PORT", "8000")
    return f"http://{'127.0.0.1' if host in ANY_ADDRESS else host}:{port}/health"


def check(url: str) -> str | None:
    """None when the server is healthy, else why not in one line."""
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S):
            return None
    except urllib.error.HTTPError as error:
        try:
            status = json.loads(error.read()).get("status")
        except (ValueError, AttributeError):
            status = None
        return f"{url} answered {error.code}" + (f" ({status})" if status else "")
    except OSError as error:
        return f"{url}: {getattr(error, 'reason', error)}"


def main() -> int:
    problem = check(health_url(dict(os.environ)))
    if problem is not None:
        print(problem, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
