"""Shared click plumbing for the `jowa-data` and `jowa` command groups.

Expected errors (`JowaError`) print one line naming the file and the problem and exit with 1,
without a traceback; `--debug` (or JOWA_DEBUG=1) shows the traceback. Usage errors exit with 2.
"""

from __future__ import annotations

import errno
import json
import os
import sys
from typing import Any

import click

from jowa_common.errors import JowaError


# What the file system can refuse us: the user's to fix (free space, permissions), not a bug to trace back.
USER_OS_ERRORS = frozenset([errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EFBIG,
                            errno.EMFILE, errno.ENAMETOOLONG])


def os_error_line(e: OSError) -> str:
    """'PATH: No space left on device (ENOSPC)': the path first, as every jowa error."""
    where = e.filename if e.filename is not None else "?"
    name = errno.errorcode.get(e.errno or 0, "")
    return f"{where}: {e.strerror or e}" + (f" ({name})" if name else "") + \
        "; nothing finished was lost: free the space or fix the permission, then run the same command again"


class JowaGroup(click.Group):
    """A click group that turns `JowaError`, and a full disk or a refused permission, into a one-line message and
    exit status 1 (every write is atomic, so a rerun resumes from what was finished)."""

    def invoke(self, ctx: click.Context) -> Any:
        debug = ctx.meta.get("jowa_debug") or os.environ.get("JOWA_DEBUG") == "1"
        try:
            return super().invoke(ctx)
        except JowaError as e:
            if debug:
                raise
            click.echo(f"Error: {e}", err=True)
            ctx.exit(1)
        except OSError as e:
            if debug or e.errno not in USER_OS_ERRORS:
                raise
            click.echo(f"Error: {os_error_line(e)}", err=True)
            ctx.exit(1)


def parse_runs(value: str | None) -> tuple[int, ...] | None:
    """'1,2' -> (1, 2); None stays None (the manifest's runs)."""
    if value is None:
        return None
    try:
        return tuple(int(x) for x in value.replace(" ", "").split(",") if x)
    except ValueError:
        raise click.BadParameter(f"expected comma-separated run numbers like 1,2, got {value!r}")


def parse_range(value: str | None) -> tuple[int, int] | None:
    """'1-50' -> (1, 50), '7' -> (7, 7); None stays None (the manifest's range)."""
    if value is None:
        return None
    try:
        a, _, b = value.partition("-")
        return (int(a), int(b if b else a))
    except ValueError:
        raise click.BadParameter(f"expected A-B (e.g. 1-50), got {value!r}")


def parse_suffixes(value: str | None) -> list[int] | None:
    """Checkpoint suffixes: "1-50", "3,4,6" or "7" -> a list; None stays None (all of them)."""
    if value is None:
        return None
    out: list[int] = []
    try:
        for part in value.replace(" ", "").split(","):
            a, _, b = part.partition("-")
            out.extend(range(int(a), int(b if b else a) + 1))
    except ValueError:
        raise click.BadParameter(f"expected suffixes like 1-50 or 3,4,6, got {value!r}")
    return out


def register_commands(group: click.Group, modules: tuple[str, ...]) -> None:
    """Add the `COMMANDS` of each module to `group`; a module that does not exist yet is skipped."""
    import importlib

    for mod in modules:
        try:
            m = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name == mod:
                continue
            raise
        for cmd in m.COMMANDS:
            group.add_command(cmd)


def debug_option(f):
    def cb(ctx: click.Context, _param, value: bool):
        if value:
            ctx.meta["jowa_debug"] = True
        return value

    return click.option("--debug", is_flag=True, expose_value=False, is_eager=True, callback=cb,
                        help="Show full tracebacks for errors.")(f)


def manifests_option(f):
    """`--manifests DIR` (repeatable): extra/alternative manifest folders."""
    return click.option("--manifests", "manifest_dirs", multiple=True, type=click.Path(file_okay=False),
                        help="Manifest folder(s) to use instead of the shipped manifests/ (repeatable).")(f)


def replay_root_options(f):
    """`--replay ROOT` (required; a folder or an fsspec URL) and `--cache DIR` for commands that read replay."""
    f = cache_option(f)
    return click.option("--replay", "replay_root", required=True,
                        help="DQN-Replay root (<root>/<Game>/<run>/replay_logs): a folder or a URL such as "
                             "gs://atari-replay-datasets/dqn, s3://BUCKET/PATH, https://HOST/PATH (each build "
                             "task streams only its own checkpoints' files).")(f)


def cache_option(f):
    """`--cache DIR`: keep a local copy of each remote replay file read (fsspec filecache); none for local roots."""
    return click.option("--cache", "cache", type=click.Path(file_okay=False), default=None,
                        help="Local cache folder for a remote replay root (URL): each file read is copied there "
                             "whole on first use and read from there afterwards. Default: stream, keep nothing.")(f)


def load_registry(manifest_dirs: tuple[str, ...]):
    from jowa_data.manifest import load_manifests

    return load_manifests(list(manifest_dirs) if manifest_dirs else None)


def echo_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=True, default=_json_default))


def _json_default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def stderr_console():
    """A rich console on stderr: progress and tables for people never pollute --json stdout."""
    from rich.console import Console

    return Console(stderr=True)


def stdout_console():
    from rich.console import Console

    # Wide enough for our tables when piped (rich would fall back to 80 columns).
    return Console(file=sys.stdout, width=None if sys.stdout.isatty() else 200)
