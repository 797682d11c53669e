from __future__ import annotations

from api.cli import main

main()
