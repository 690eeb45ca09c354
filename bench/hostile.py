"""The hostile-input suite's table (issue #16): cases tried / handled cleanly / data lost /
partial outputs left / crashes / hangs / tracebacks, per category.

Runs ``tests/test_hostile.py`` with ``NAPARI_UNET_HOSTILE_REPORT`` set, so every case
records its outcome, then prints the table and writes ``bench/results/hostile.json``
(the cases and the table).

    python bench/hostile.py [-k EXPR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from napari_unet.models.summary import align_columns

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "hostile.json"
CATEGORIES = ("checkpoints", "images", "outputs", "dask", "API", "GUI close")
COLUMNS = ("data_lost", "partial_left", "crash", "hang", "traceback")


def table(cases: list[dict]) -> list[dict]:
    rows = []
    for cat in CATEGORIES:
        mine = [c for c in cases if c["category"] == cat]
        row = {"category": cat, "tried": len(mine), "clean": sum(c["clean"] for c in mine)}
        row.update({col: sum(bool(c.get(col)) for c in mine) for col in COLUMNS})
        rows.append(row)
    total = {"category": "total", "tried": sum(r["tried"] for r in rows)}
    total.update({k: sum(r[k] for r in rows) for k in ("clean", *COLUMNS)})
    return [*rows, total]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-k", default=None, help="pytest -k expression (a subset)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "cases.json"
        env = {**os.environ, "NAPARI_UNET_HOSTILE_REPORT": str(report), "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
               str(ROOT / "tests" / "test_hostile.py")] + (["-k", args.k] if args.k else [])  # fmt: skip
        rc = subprocess.call(cmd, cwd=ROOT, env=env)
        cases = json.loads(report.read_text()) if report.exists() else []
    rows = table(cases)
    head = ["category", "tried", "handled cleanly", "data lost", "partial left", "crashes",
            "hangs", "tracebacks"]  # fmt: skip
    body = [[r["category"], r["tried"], r["clean"], *(r[c] for c in COLUMNS)] for r in rows]
    print(align_columns(tuple(head), [tuple(str(v) for v in b) for b in body]))
    if not args.k:
        RESULTS.write_text(
            json.dumps({"pytest_exit_code": rc, "table": rows, "cases": cases}, indent=1)
        )
        print(f"wrote {RESULTS.relative_to(ROOT)}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
