"""Run the micro-benchmarks: ``python -m benchmarks.micro [--quick] [--json PATH]``.

Each section times one Rust tier next to the tool a user would otherwise pick,
single-threaded, on the same inputs in the same run, and prints a table of
medians and ratios. Targets come from the foundation issue; a missed target is
printed as NO, never hidden.
"""

from __future__ import annotations

import os

# Single-threaded, for tiergate and every baseline alike: BLAS (numpy's matrix
# products) and rayon read these when they start, so set them before any import.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "RAYON_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from benchmarks.micro.harness import Row, make_inputs, markdown_table  # noqa: E402

SECTIONS = ["rules", "hashing", "ann"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.micro",
        description="Micro-benchmarks of tiergate's Rust tiers against their usual baselines.",
    )
    parser.add_argument("--quick", action="store_true", help="smaller inputs; whole run < 60 s")
    parser.add_argument("--json", type=Path, help="also write the results as JSON to this path")
    parser.add_argument(
        "--only", choices=SECTIONS, action="append", help="run only this section (repeatable)"
    )
    args = parser.parse_args(argv)

    inputs = make_inputs(quick=args.quick)
    print(f"inputs: {inputs.source} texts ({len(inputs.texts)}), quick={args.quick}", flush=True)
    rows: list[Row] = []
    started = time.perf_counter()
    for name in args.only or SECTIONS:
        module = importlib.import_module(f"benchmarks.micro.{name}")
        print(f"[{time.perf_counter() - started:6.1f}s] {name} ...", flush=True)
        section_rows = module.run(inputs)
        rows.extend(section_rows)
        print(markdown_table(section_rows), flush=True)

    print(f"\nAll sections ({time.perf_counter() - started:.1f}s):\n")
    print(markdown_table(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "machine": {"python": sys.version.split()[0], "platform": platform.platform()},
            "quick": args.quick,
            "inputs": inputs.source,
            "rows": [r.as_dict() for r in rows],
        }
        args.json.write_text(json.dumps(payload, indent=2), encoding="utf-8")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
