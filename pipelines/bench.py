"""``make bench-train``: training wall time, local engine vs the Prefect flow, in one run.

Both engines run the same five steps on the same data in a fresh state dir, as a user runs them
(``driftloop train`` in a new process, imports included). A warm-up run first makes a champion, so every
measured run does the same work (including re-scoring the champion). Prints medians and the ratio.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time

ENGINES = ("local", "prefect")


def _driftloop(env: dict[str, str], *args: str) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "driftloop", *args], env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return time.perf_counter() - t0


def main(repeats: int = 3) -> None:
    with tempfile.TemporaryDirectory(prefix="driftloop-bench-") as state:
        env = {**os.environ, "DRIFTLOOP_STATE_DIR": state}
        print(f"preparing default-size data in {state} ...", flush=True)
        for args in (("data", "generate"), ("features", "apply"), ("features", "materialize"), ("train",)):
            _driftloop(env, *args)
        times: dict[str, list[float]] = {e: [] for e in ENGINES}
        for i in range(repeats):
            for engine in ENGINES if i % 2 == 0 else reversed(ENGINES):
                seconds = _driftloop(env, "train", "--engine", engine)
                times[engine].append(seconds)
                print(f"  run {i + 1}/{repeats} {engine:<8} {seconds:6.1f} s", flush=True)
    median = {e: statistics.median(t) for e, t in times.items()}
    print(f"\ndriftloop train, default data, median of {repeats} (same run, same data):")
    for engine in ENGINES:
        print(f"  --engine {engine:<8} {median[engine]:6.1f} s")
    print(f"  orchestration overhead: prefect / local = {median['prefect'] / median['local']:.2f}x "
          f"(+{median['prefect'] - median['local']:.1f} s)")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 3)
