"""Process helpers shared by the tests that start real servers and launchers (dask, torchrun)."""

from __future__ import annotations

import contextlib
import subprocess

import psutil


def kill_tree(p: subprocess.Popen) -> None:
    """SIGKILL a process and every process below it (a `dask worker` is a nanny plus its worker process; torchrun
    starts its workers in sessions of their own), then reap it."""
    if p.poll() is not None:  # exited and reaped: its pid may be another process's by now
        return
    with contextlib.suppress(psutil.NoSuchProcess):
        top = psutil.Process(p.pid)
        tree = [top, *top.children(recursive=True)]
        for q in tree:  # the parent first, so that it cannot start a replacement; psutil checks pid reuse
            with contextlib.suppress(psutil.NoSuchProcess):
                q.kill()
    p.wait(timeout=30)
