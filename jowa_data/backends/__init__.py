"""Storage backends of a built dataset: `zarr` (v3, sharded, zstd) and `wds` (webdataset tars).

Both write one build task's arrays (`TaskArrays`) as a unit under a temporary name and rename it into
place, and both read a task back. `get_backend(name)` imports the backend lazily.
"""

from __future__ import annotations

from jowa_data.backends.base import Backend, TaskArrays
from jowa_common.errors import DatasetError


def get_backend(name: str) -> Backend:
    if name == "zarr":
        from jowa_data.backends.zarr_backend import ZarrBackend

        return ZarrBackend()
    if name == "wds":
        from jowa_data.backends.wds_backend import WdsBackend

        return WdsBackend()
    raise DatasetError(f"unknown dataset format '{name}' (known: zarr, wds)")


__all__ = ["Backend", "TaskArrays", "get_backend"]
