"""First-call latency of a fresh process: now the ``first-call`` part of ``bench_host.py``.

This entry point runs that part alone (``--cpu-smoke`` is ``--quick``):

    python benchmarks/bench_first_call.py --out benchmarks/results/h200-first-call.json
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_host import main  # noqa: E402

if __name__ == "__main__":
    args = ["--quick" if arg == "--cpu-smoke" else arg for arg in sys.argv[1:]]
    sys.exit(main(["--parts", "first-call", *args]))
