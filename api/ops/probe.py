"""`python -m api.ops.probe /readyz`: a container health check that needs nothing but Python (no curl).

Exits 0 when the worker on this host (CHAT_PORT) answers the path with 200, else 1.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    path = args[0] if args else "/healthz"
    url = f"http://127.0.0.1:{os.environ.get('CHAT_PORT', '8000')}{path}"
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return 0 if response.status == 200 else 1
    except (urllib.error.URLError, OSError) as exc:
        print(f"{url}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
