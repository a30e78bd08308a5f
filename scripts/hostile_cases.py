"""List the hostile-input test cases (`@pytest.mark.hostile("kind")`) by kind, without running them.

    python scripts/hostile_cases.py            # a table: kind, cases
    python scripts/hostile_cases.py --json     # {"total": N, "kinds": {kind: [test ids]}}
    python -m pytest -m hostile                # run them all
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest


class _Collector:
    def __init__(self) -> None:
        self.kinds: dict[str, list[str]] = {}

    def pytest_collection_modifyitems(self, items) -> None:
        for item in items:
            mark = item.get_closest_marker("hostile")
            if mark is not None:
                kind = mark.args[0] if mark.args else "unspecified"
                self.kinds.setdefault(kind, []).append(item.nodeid)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print the case ids as JSON")
    args = ap.parse_args()
    root = Path(__file__).resolve().parent.parent
    collector = _Collector()
    code = pytest.main(["--collect-only", "-p", "no:terminal", str(root / "tests")], plugins=[collector])
    if code not in (0, 5):
        sys.exit(code)
    total = sum(len(v) for v in collector.kinds.values())
    if args.json:
        print(json.dumps({"total": total, "kinds": collector.kinds}, indent=2))
        return
    width = max([len(k) for k in collector.kinds] + [4])
    print(f"{'kind'.ljust(width)}  cases")
    for kind, ids in sorted(collector.kinds.items()):
        print(f"{kind.ljust(width)}  {len(ids)}")
    print(f"{'total'.ljust(width)}  {total}")


if __name__ == "__main__":
    main()
