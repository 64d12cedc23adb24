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
