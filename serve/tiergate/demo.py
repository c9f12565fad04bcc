"""A short demo of the Rust tiers; `make serve` runs it until the server lands."""

from __future__ import annotations

import tiergate


def main() -> None:
    print(f"tiergate {tiergate.__version__}: Rust tiers loaded from tiergate._core")


if __name__ == "__main__":
    main()
