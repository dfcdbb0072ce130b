"""``python -m tdask.gateway``: run the KServe v2 gateway in front of a tdask deployment."""

from __future__ import annotations

from tdask.gateway.cli import main

if __name__ == "__main__":
    main()
