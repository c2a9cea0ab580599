"""Run every paper reproduction, one process each, and collect their results.json into one file.

    python examples/papers/run_all.py [--quick]

Each example writes its figures and results.json under ``examples/papers/out/<name>/``; this
script also writes ``examples/papers/out/results.json`` with all of them and the wall time of each.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

#: The examples in the order README quotes them.
EXAMPLES = ("batch_size", "skip_connections", "swa", "mode_connectivity", "basin_volume")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the reduced settings the tests use")
    parser.add_argument("--out", type=Path, default=HERE / "out", help="where every example's folder goes")
    parser.add_argument("--only", nargs="*", choices=EXAMPLES, default=list(EXAMPLES), help="run only these")
    args = parser.parse_args(argv)
    collected, failed = {}, []
    for name in args.only:
        started = time.time()
        command = [sys.executable, str(HERE / f"{name}.py"), "--out", str(args.out / name)]
        print(f"=== {name}: {' '.join(command[1:])}{' --quick' if args.quick else ''}", flush=True)
        done = subprocess.run(command + (["--quick"] if args.quick else []), check=False)
        if done.returncode != 0:
            failed.append(name)
            continue
        collected[name] = json.loads((args.out / name / "results.json").read_text())
        collected[name]["wall_seconds"] = round(time.time() - started, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(collected, indent=2, sort_keys=True))
    print(f"wrote {args.out / 'results.json'}" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
