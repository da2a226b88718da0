"""torch-internal helpers of its own distributed-checkpoint file reader (torch 2.11); ``None`` where a torch lacks them,
and callers then use the library's reader."""

from __future__ import annotations

try:
    from torch.distributed._shard._utils import narrow_tensor_by_index
    from torch.distributed.checkpoint.utils import _create_file_view as create_file_view
except ImportError:  # pragma: no cover - another torch
    narrow_tensor_by_index = create_file_view = None

__all__ = ["create_file_view", "narrow_tensor_by_index"]
