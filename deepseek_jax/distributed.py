"""Multi-process (multi-host) JAX: start-up, process roles, and global arrays from per-process data.

Every process of a run calls `initialize(...)` before anything else touches a device; afterwards
`jax.devices()` lists the devices of all processes, a `Mesh` over them spans the cluster, and a jitted step
runs SPMD on every process. Each process feeds only its own rows of a global batch
(`global_batch_from_local`); collectives move whatever else is needed.

Cluster detection (no arguments): `jax.distributed.initialize()` reads SLURM (`SLURM_JOB_ID`,
`SLURM_STEP_NODELIST`, `SLURM_NTASKS`, `SLURM_PROCID`, ...), Open MPI, mpi4py and Kubernetes environments. Where
none is present, the variables COORDINATOR_ADDRESS (or JAX_COORDINATOR_ADDRESS), NUM_PROCESSES and PROCESS_ID
are used; with none of those either, the run is a single process and nothing is started.

CPU: several processes on one machine communicate through the CPU collectives implementation
`jax_cpu_collectives_implementation` ('gloo' by default in jax 0.10; set here explicitly so that a
different default cannot leave cross-process collectives unimplemented).
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding

_ENV_ADDRESS = ("COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS")
_ENV_NUM = ("NUM_PROCESSES", "JAX_NUM_PROCESSES")
_ENV_ID = ("PROCESS_ID", "JAX_PROCESS_ID")


def _env(names):
  for n in names:
    if os.environ.get(n):
      return os.environ[n]
  return None


def _cluster_detected() -> bool:
  if "SLURM_JOB_ID" in os.environ and "SLURM_NTASKS" in os.environ:
    return True
  return any(v in os.environ for v in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "KUBERNETES_SERVICE_HOST",
                                       "TPU_WORKER_HOSTNAMES"))


def initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None,
               local_device_ids: Optional[int | Sequence[int]] = None,
               cpu_collectives: str = "gloo") -> bool:
  """Starts JAX's distributed runtime for a multi-process run (call before any other JAX work).

  Args:
    coordinator_address: 'host:port' of process 0's coordinator; None: from the cluster environment
      (SLURM etc.) or COORDINATOR_ADDRESS.
    num_processes: processes in the run; None: from the environment (NUM_PROCESSES).
    process_id: this process's rank in [0, num_processes); None: from the environment (PROCESS_ID).
    local_device_ids: devices of this machine the process uses (e.g. its GPU under one-process-per-GPU
      launches); None: all visible ones.
    cpu_collectives: cross-process collectives on the CPU backend ('gloo' or 'mpi').
  Returns:
    True when the distributed runtime was started, False for a single-process run (nothing to do).
  Raises:
    ValueError: only some of the explicit arguments given, or an inconsistent rank.
  """
  coordinator_address = coordinator_address or _env(_ENV_ADDRESS)
  if num_processes is None and _env(_ENV_NUM) is not None:
    num_processes = int(_env(_ENV_NUM))
  if process_id is None and _env(_ENV_ID) is not None:
    process_id = int(_env(_ENV_ID))
  explicit = [coordinator_address is not None, num_processes is not None, process_id is not None]
  if any(explicit) and not all(explicit) and not _cluster_detected():
    raise ValueError("distributed.initialize: give coordinator_address, num_processes and process_id "
                     f"together (got {coordinator_address!r}, {num_processes!r}, {process_id!r})")
  if num_processes is not None and process_id is not None and not 0 <= process_id < num_processes:
    raise ValueError(f"process_id={process_id} is outside [0, num_processes={num_processes})")
  if not any(explicit) and not _cluster_detected():
    return False
  if num_processes == 1:
    return False
  if jax.distributed.is_initialized():
    return True
  jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
  jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                             process_id=process_id, local_device_ids=local_device_ids)
  return True


def shutdown() -> None:
  """Stops the distributed runtime (at the end of a run; a no-op when it was not started)."""
  if jax.distributed.is_initialized():
    jax.distributed.shutdown()


def process_index() -> int:
  """This process's rank."""
  return jax.process_index()


def process_count() -> int:
  """Processes in the run."""
  return jax.process_count()


def is_main_process() -> bool:
  """Whether this is process 0 (the one that logs and writes non-sharded files)."""
  return jax.process_index() == 0


def local_batch_slice(global_batch: int, sharding: NamedSharding) -> slice:
  """The rows of a [global_batch, ...] array that this process's devices hold under `sharding`.

  With the batch split over the data axes, a process holds one contiguous block of rows when its devices
  are contiguous along those axes (what `jax.make_mesh` / `sharding.make_mesh` arrange); this is the block
  a data iterator of this process must produce.

  Args:
    global_batch: rows of the global array.
    sharding: the batch sharding (e.g. `sharding.data_sharding(mesh)`).
  Returns:
    slice(start, stop) into the global rows.
  Raises:
    ValueError: when this process's rows are not one contiguous block.
  """
  index_map = sharding.addressable_devices_indices_map((global_batch,))
  rows = set()
  for idx in index_map.values():
    sl = idx[0]
    rows.update(range(*sl.indices(global_batch)))
  rows = sorted(rows)
  start, stop = rows[0], rows[-1] + 1
  if len(rows) != stop - start:
    raise ValueError(f"process {jax.process_index()} holds non-contiguous rows of the batch under "
                     f"{sharding.spec}; order the mesh devices by process")
  return slice(start, stop)


def global_batch_from_local(local_data, sharding: NamedSharding, global_batch: Optional[int] = None):
  """A global jax.Array from this process's rows of a batch (`jax.make_array_from_process_local_data`).

  Args:
    local_data: a numpy array (or pytree of them) holding this process's rows, in order.
    sharding: the global sharding of the batch (leading dim split over the data axes).
    global_batch: rows of the global array; None: local rows x the number of processes that hold distinct
      rows (the usual equal split).
  Returns:
    jax.Array (or pytree) of global shape [global_batch, ...].
  """
  def one(x):
    x = np.asarray(x)
    if global_batch is None:
      shape = None
    else:
      shape = (global_batch,) + x.shape[1:]
    return jax.make_array_from_process_local_data(sharding, x, shape)
  return jax.tree.map(one, local_data)


def local_rows(global_data, sharding: NamedSharding):
  """This process's rows of a host-side global batch (numpy or pytree), for `global_batch_from_local`.

  Args:
    global_data: numpy array(s) [global_batch, ...], the same on every process.
    sharding: the batch sharding.
  Returns:
    the rows `local_batch_slice` names.
  """
  def one(x):
    x = np.asarray(x)
    return x[local_batch_slice(x.shape[0], sharding)]
  return jax.tree.map(one, global_data)


def gather_to_host(x):
  """A fully replicated numpy copy of a (possibly multi-process) global array, on every process."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  if jax.process_count() == 1:
    return np.asarray(x)
  return jax.tree.map(np.asarray, multihost_utils.process_allgather(x, tiled=True))
