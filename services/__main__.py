"""Shared plumbing commands.

python -m services doctor [--check broker,redis]   # what the mesh sees on this host
"""

from __future__ import annotations

import sys


def main() -> int:
    if sys.argv[1:2] == ["doctor"]:
        from services.doctor import main as doctor

        return doctor(sys.argv[2:])
    print(__doc__.strip(), file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
