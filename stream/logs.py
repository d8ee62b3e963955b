"""Logging of `python -m stream`: one format, `--log-level` for the server's own loggers, and
no secret in any line.

What the server logs: start-up, the drain, warnings, tracebacks of its own faults, and per
image request one access line (`stream.watch`: request id, model, size, steps, n, outcome,
timings) beside uvicorn's line per HTTP request (client, method, path, status). Never a
prompt, an image, an API key or a webhook secret or url:
- uvicorn prints each path with its query string, where a browser's `EventSource` carries
  `?api_key=`; that value is replaced by `***`;
- `--log-level debug` applies to the server's loggers and uvicorn's only: other libraries
  stay at info, since at debug sse-starlette logs every frame it sends (prompts, images).
"""

from __future__ import annotations

import logging
import re

OWN_LOGGERS = ("stream", "pipeline", "fluxstream")
QUERY_SECRET = re.compile(r"([?&]api_key=)[^&\s]*")
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(level: str) -> None:
    """`level` (debug, info, warning, error) for our loggers; at most info for the rest."""
    numeric = logging.getLevelNamesMapping()[level.upper()]
    logging.basicConfig(level=max(numeric, logging.INFO), format=FORMAT)
    for name in OWN_LOGGERS:
        logging.getLogger(name).setLevel(numeric)


class RedactQuerySecrets(logging.Filter):
    """Put on `uvicorn.access`, whose records carry the path (and query) as an argument
    that its formatter unpacks: each argument is redacted in place, keeping their shape."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(
                QUERY_SECRET.sub(r"\1***", arg) if isinstance(arg, str) else arg
                for arg in record.args
            )
        return True
