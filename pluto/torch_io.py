"""``torch.save`` / ``torch.load`` of what ``save_checkpoint`` accepts.

Modules, optimizers, LR schedulers and anything else with a ``state_dict()`` are saved
as their state dicts, so loading needs no pickled classes and works with
``weights_only=True`` (the safe default of ``torch.load``): what comes back is the
state dicts, ready for ``model.load_state_dict(...)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

#: The file ``save_checkpoint`` writes inside its checkpoint.
CHECKPOINT_FILE = "checkpoint.pt"


def _torch() -> Any:
    try:
        import torch
    except ImportError:
        raise ImportError("save_checkpoint/load_checkpoint need torch: pip install torch") from None
    return torch


def saveable(obj: Any) -> Any:
    """State dicts in place of stateful objects, recursively through dicts."""
    state_dict = getattr(obj, "state_dict", None)
    if callable(state_dict) and not isinstance(obj, Mapping):
        return state_dict()
    if isinstance(obj, Mapping):
        return {key: saveable(value) for key, value in obj.items()}
    return obj


def save(obj: Any, path: Path) -> None:
    _torch().save(saveable(obj), path)


def load(path: Path, map_location: Any = None, weights_only: bool = True) -> Any:
    torch = _torch()
    try:
        return torch.load(path, map_location=map_location, weights_only=weights_only)
    except Exception as exc:
        if weights_only and "weights_only" in str(exc):
            raise ValueError(
                f"{path} holds objects that torch.load refuses to unpickle with "
                "weights_only=True; if you trust who saved it, pass weights_only=False"
            ) from exc
        raise
