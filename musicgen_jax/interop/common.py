"""What every importer shares: take a weight from a state dict with its shape checked, place it in a tree."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np


def take_weight(state_dict: Mapping[str, Any], key: str, shape: tuple[int, ...], what: str,
                config_name: str = "the config") -> np.ndarray:
  """state_dict[key] as float32 numpy, or ValueError naming the key and the expected/actual shapes."""
  if key not in state_dict:
    raise ValueError(f"missing key {key!r} in the {what} checkpoint (expected shape {shape}); check the "
                     f"prefix and that {config_name} matches the checkpoint")
  w = np.asarray(state_dict[key])
  if tuple(w.shape) != tuple(shape):
    raise ValueError(f"weight {key!r}: expected shape {tuple(shape)} from {config_name}, "
                     f"got {tuple(w.shape)}")
  return w.astype(np.float32)


def set_path(tree: dict, path: Sequence[str], value: Any) -> None:
  """tree[path[0]][path[1]]...[path[-1]] = value, creating the intermediate dicts."""
  node = tree
  for name in path[:-1]:
    node = node.setdefault(name, {})
  node[path[-1]] = value
