"""Multi-host start-up: `jax.distributed.initialize` from the config or the cluster's environment.

Explicit (any cluster, CPU tests included):
    --config.distributed.coordinator_address=host:port --config.distributed.num_processes=N
    --config.distributed.process_id=I
Automatic (`distributed.auto`, the default): on a TPU pod slice, under SLURM or Open MPI with more than
one task, or with JAX_COORDINATOR_ADDRESS set, JAX finds the coordinator and the process ids itself.
A single machine with none of these runs as one process. Must run before JAX touches a device.
"""
from __future__ import annotations

import os

import jax
import ml_collections


def _cluster_env() -> bool:
  env = os.environ
  if env.get("JAX_COORDINATOR_ADDRESS"):
    return True
  if "," in env.get("TPU_WORKER_HOSTNAMES", ""):
    return True
  for name in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
    if env.get(name, "1").isdigit() and int(env.get(name, "1")) > 1:
      return True
  return False


def initialize(cfg: ml_collections.ConfigDict) -> None:
  """Joins the multi-process job described by `cfg` (config.distributed), or does nothing."""
  if jax.distributed.is_initialized():
    return
  if cfg.coordinator_address:
    if cfg.num_processes < 1 or not 0 <= cfg.process_id < cfg.num_processes:
      raise ValueError(f"distributed.coordinator_address is set, so distributed.num_processes (got "
                       f"{cfg.num_processes}) must be >= 1 and distributed.process_id (got "
                       f"{cfg.process_id}) in [0, num_processes)")
    jax.distributed.initialize(cfg.coordinator_address, num_processes=cfg.num_processes,
                               process_id=cfg.process_id,
                               initialization_timeout=int(cfg.timeout_seconds))
  elif cfg.auto and _cluster_env():
    jax.distributed.initialize(initialization_timeout=int(cfg.timeout_seconds))
