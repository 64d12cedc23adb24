"""Run a jowa command and SIGKILL it at an exact moment: just before the Nth rename whose source matches a regex,
i.e. while that temp file is complete on disk under its temp name and the final name does not exist yet.

    python -m tests.killpoint REGEX N jowa_data.cli|pipelines.cli ARGS...

Every file jowa publishes goes through `os.replace(temp, final)` (jowa_common.io.atomic_path, the zarr task
folder), so this reaches every temp-file window without touching jowa's code: only `os.replace` of this child
process is wrapped, and the kill is a real SIGKILL from the kernel.
"""

from __future__ import annotations

import importlib
import os
import re
import signal
import sys


def main() -> None:
    pattern, nth, module, *args = sys.argv[1:]
    rx, left = re.compile(pattern), [int(nth)]
    real_replace = os.replace

    def replace(src, dst, *a, **kw):
        if rx.search(os.fspath(src)):
            left[0] -= 1
            if left[0] == 0:
                os.kill(os.getpid(), signal.SIGKILL)
        return real_replace(src, dst, *a, **kw)

    os.replace = replace
    sys.argv = [module, *args]
    importlib.import_module(module).main()


if __name__ == "__main__":
    main()


def run_killed(pattern: str, nth: int, module: str, args: list[str], timeout: int = 300):
    """Run `module ARGS` (jowa_data.cli or pipelines.cli) in a child that is SIGKILLed just before the `nth` rename
    of a temp file matching `pattern`; returns the CompletedProcess (returncode -SIGKILL when the kill happened)."""
    import subprocess
    from pathlib import Path

    return subprocess.run([sys.executable, "-m", "tests.killpoint", pattern, str(nth), module, *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, cwd=Path(__file__).resolve().parents[1],
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
