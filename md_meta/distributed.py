"""Scaling out with JAX's own runtime: the task batch sharded over every device of every host.

    mesh        a 1-D ``jax.sharding.Mesh`` over all devices (of all processes), axis ``'tasks'``
    batch       ``NamedSharding(mesh, P('tasks'))``: every leaf of a ``Task`` batch is split on its
                leading (task) axis, so each device adapts to ``batch_size / num_devices`` tasks
    theta, opt  ``NamedSharding(mesh, P())``: meta-parameters and optimizer state are replicated

The meta-step stays one ``jax.jit`` (now with explicit in/out shardings); the mean over tasks in
``meta_loss`` and the meta-gradient of the replicated parameters become cross-device all-reduces that
XLA's SPMD partitioner inserts. Nothing here is a home-made collective.

Multi-host: ``initialize`` wraps ``jax.distributed.initialize`` (automatic on TPU pods, SLURM and Open
MPI; explicit coordinator address, process count and id otherwise; gloo collectives on CPU). Each
process then contributes its own share of every batch:

* host samplers (``TaskSource.sample``): process p of P draws ``batch_size / P`` tasks from the stream
  ``sample(step * P + p, ...)``, i.e. the step index folded with the process index (with one process
  this is exactly ``sample(step, batch_size, ...)``), and the global batch is assembled with
  ``jax.make_array_from_process_local_data``;
* on-device samplers (``TaskSource.device_sample``): every process runs the same jitted program on the
  same key and the sampled global batch is constrained to the task sharding, so each device only
  materialises its own tasks and the batch is identical to the one-device batch.

Only process 0 writes logs, metrics and checkpoints (``is_main_process``). ``make_mesh`` validates the
config's device request and builds the mesh once (``experiment.build`` keeps it in ``Experiment.mesh``);
every helper below takes that mesh, None meaning a single device, where every function here is the
identity and the trainer runs exactly the code it ran before.
"""
from __future__ import annotations

import functools
import os
from typing import Callable, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from md_meta.config import ConfigError

AXIS = 'tasks'


# ----------------------------------------------------------------------------------------------------
# Joining the runtime
# ----------------------------------------------------------------------------------------------------

def _cluster_detected() -> bool:
    """A multi-process launcher that jax.distributed.initialize() can read without flags."""
    env = os.environ

    def count(name):
        try:
            return int(env.get(name, '1') or 1)
        except ValueError:
            return 1

    if 'SLURM_JOB_ID' in env and max(count('SLURM_NTASKS'), count('SLURM_NPROCS')) > 1:
        return True
    if count('OMPI_COMM_WORLD_SIZE') > 1:
        return True
    hosts = env.get('TPU_WORKER_HOSTNAMES', '') or env.get('TPU_PROCESS_ADDRESSES', '')
    return len([h for h in hosts.split(',') if h.strip()]) > 1


def initialize(coordinator_address: str = '', num_processes: int = 1, process_id: int = 0, *,
               heartbeat_timeout_seconds: int = 100, initialization_timeout: int = 300,
               local_device_ids: Optional[Sequence[int]] = None) -> bool:
    """Joins the JAX distributed runtime; returns whether this is (now) a multi-process run.

    coordinator_address:
      ``''``           automatic: ``jax.distributed.initialize()`` without arguments when a SLURM / Open MPI
                       job with several tasks or a multi-host TPU slice is detected, else one process
      ``'auto'``       always ``jax.distributed.initialize()`` without arguments (TPU pod slices, SLURM,
                       Open MPI: the runtime finds the coordinator, process count and id itself)
      ``'off'``        never (one process)
      ``'host:port'``  explicit: process 0 runs the coordinator on that port, ``num_processes`` and
                       ``process_id`` are required (e.g. ``localhost:12345`` for processes on one box)

    ``heartbeat_timeout_seconds``: a process that stops sending heartbeats for that long (killed, lost)
    makes the runtime terminate the other processes with an error instead of letting them hang.
    Must be called before any JAX computation; calling it again is a no-op.
    """
    if jax.distributed.is_initialized():
        return jax.process_count() > 1
    addr = (coordinator_address or '').strip()
    kwargs = dict(initialization_timeout=int(initialization_timeout),
                  heartbeat_timeout_seconds=int(heartbeat_timeout_seconds))
    if addr == 'off':
        return False
    if addr in ('', 'auto'):
        if addr == '' and num_processes > 1:
            raise ConfigError(f'config.dist.coordinator: needed with dist.num_processes={num_processes} '
                              "(e.g. 'host0:12345', or 'auto' on TPU pods / SLURM)")
        if addr == '' and not _cluster_detected():
            return False
        jax.distributed.initialize(local_device_ids=local_device_ids, **kwargs)
        return jax.process_count() > 1
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise ConfigError(f'config.dist.process_id: must be in [0, dist.num_processes={num_processes}), '
                          f'got {process_id}')
    # CPU processes exchange data through gloo (jax's default CPU collectives in 0.10; set it explicitly
    # in case an environment turned them off). The setting only affects the CPU backend.
    if jax.config.jax_cpu_collectives_implementation in (None, '', 'none'):
        jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(addr, int(num_processes), int(process_id), local_device_ids=local_device_ids,
                               **kwargs)
    return jax.process_count() > 1


def _dist_cfg(config):
    return config.get('dist', None) if config is not None and hasattr(config, 'get') else None


def initialize_from_config(config) -> bool:
    """``initialize`` from config.dist (coordinator, num_processes, process_id, heartbeat_timeout)."""
    d = _dist_cfg(config)
    if d is None:
        return initialize()
    return initialize(d.get('coordinator', ''), d.get('num_processes', 1), d.get('process_id', 0),
                      heartbeat_timeout_seconds=d.get('heartbeat_timeout', 100))


def is_main_process() -> bool:
    """Process 0 writes logs, metrics, results and checkpoints."""
    return jax.process_index() == 0


# ----------------------------------------------------------------------------------------------------
# Mesh and shardings
# ----------------------------------------------------------------------------------------------------

def _requested_devices(config) -> int:
    d = _dist_cfg(config)
    return int(d.get('devices', 0)) if d is not None else 0


@functools.lru_cache(maxsize=None)
def _mesh(num_devices: int) -> Optional[Mesh]:
    if jax.process_count() > 1:
        devices = jax.devices()
    else:
        devices = jax.local_devices()[:num_devices] if num_devices else jax.local_devices()
    if len(devices) <= 1:
        return None
    # Each process's devices form one contiguous block of the task axis, in process order, so that a
    # process's local share of a batch is one contiguous slice of the global batch.
    devices = sorted(devices, key=lambda d: (d.process_index, d.id))
    return Mesh(np.array(devices), (AXIS,))


def make_mesh(config) -> Optional[Mesh]:
    """The 1-D task mesh for this run, or None when it has a single device (nothing to shard), after
    ``validate(config)``.

    ``config.dist.devices``: 0 = every device of every process; N > 0 = the first N local devices
    (single-process runs only)."""
    validate(config)
    return _mesh(_requested_devices(config))


def num_devices(mesh: Optional[Mesh]) -> int:
    """The number of devices the task batch is sharded over (1 for None)."""
    return 1 if mesh is None else mesh.devices.size


def replicated(m: Mesh) -> NamedSharding:
    return NamedSharding(m, PartitionSpec())


def task_sharded(m: Mesh) -> NamedSharding:
    return NamedSharding(m, PartitionSpec(AXIS))


def validate(config) -> None:
    """ConfigError (naming the field) for a device request or global batch the mesh cannot take."""
    n_req = _requested_devices(config)
    if n_req < 0:
        raise ConfigError(f'config.dist.devices: must be 0 (all) or positive, got {n_req}')
    if n_req:
        if jax.process_count() > 1 and n_req != jax.device_count():
            raise ConfigError(f'config.dist.devices: multi-process runs use every device; set 0, got {n_req}')
        if n_req > jax.local_device_count():
            raise ConfigError(f'config.dist.devices: asks for {n_req} devices, this process has '
                              f'{jax.local_device_count()}')
    n = num_devices(_mesh(n_req))
    b = config.meta.batch_size
    if b % n:
        lo, hi = b - b % n, b - b % n + n
        raise ConfigError(f'config.meta.batch_size: the global batch of {b} tasks does not divide by the '
                          f'{n} devices it is sharded over; use a multiple of {n} '
                          f'(e.g. {lo or hi} or {hi}), or config.dist.devices to use fewer devices')


# ----------------------------------------------------------------------------------------------------
# The sharded step and its inputs
# ----------------------------------------------------------------------------------------------------

def jit_step(fn: Callable, mesh: Optional[Mesh], num_args: int, batch_argnum: Optional[int] = None,
             donate_argnums: Sequence[int] = (0, 1)):
    """``jax.jit(fn)`` with the batch argument task-sharded and everything else (inputs and outputs)
    replicated over the mesh; plain ``jax.jit(fn, donate_argnums)`` with one device."""
    if mesh is None:
        return jax.jit(fn, donate_argnums=tuple(donate_argnums))
    rep, tasks = replicated(mesh), task_sharded(mesh)
    in_shardings = tuple(tasks if i == batch_argnum else rep for i in range(num_args))
    return jax.jit(fn, in_shardings=in_shardings, out_shardings=rep, donate_argnums=tuple(donate_argnums))


def batch_constraint(mesh: Optional[Mesh]) -> Callable:
    """Inside a jitted function: pins a batch sampled on device to the task sharding (identity with
    one device)."""
    if mesh is None:
        return lambda batch: batch
    sharding = task_sharded(mesh)
    return lambda batch: jax.lax.with_sharding_constraint(batch, sharding)


def _global_replicated(x, sharding: NamedSharding):
    if isinstance(x, jax.Array) and x.sharding == sharding:
        return x
    value = np.asarray(x)  # a process-local (or fully replicated) value, identical on every process
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def replicate(tree, mesh: Optional[Mesh]):
    """Meta-parameters / optimizer state -> global arrays replicated on every device (no-op with one
    device). Every process must pass the same values (same seed, or the same checkpoint)."""
    if mesh is None:
        return tree
    sharding = replicated(mesh)
    if jax.process_count() > 1:
        # Every process must start from the same values (a process that restored another checkpoint, or
        # none, would silently diverge): compare a checksum across processes.
        from jax.experimental import multihost_utils
        leaves = [np.asarray(x, np.float64) for x in jax.tree_util.tree_leaves(tree)]
        checksum = np.array([sum(float(np.sum(x)) for x in leaves), sum(float(np.sum(np.abs(x))) for x in leaves)],
                            np.float32)  # float32: what the all-gather carries without x64
        multihost_utils.assert_equal(checksum, 'md_meta.distributed.replicate: the processes hold different '
                                     'meta-parameters / optimizer states (different checkpoints or seeds?)')
    return jax.tree_util.tree_map(lambda x: _global_replicated(x, sharding), tree)


def to_local(tree):
    """Replicated global arrays -> this process's copy on one local device (for evaluation, saving).
    Leaves anything else unchanged."""
    def local(x):
        if isinstance(x, jax.Array) and len(x.sharding.device_set) > 1 and x.is_fully_replicated:
            return x.addressable_data(0)
        return x
    return jax.tree_util.tree_map(local, tree)


def local_share(mesh: Optional[Mesh], num_tasks: int) -> tuple[int, int]:
    """(start, size) of this process's contiguous slice of a global batch of ``num_tasks`` tasks."""
    if mesh is None or jax.process_count() == 1:
        return 0, num_tasks
    devices = list(mesh.devices.flat)
    per_device = num_tasks // len(devices)
    mine = [i for i, d in enumerate(devices) if d.process_index == jax.process_index()]
    return mine[0] * per_device, len(mine) * per_device


def sample_share(source, step: int, num_tasks: int, split: str, query: int, process_index: int,
                 process_count: int):
    """Process ``process_index``'s share of the global host-sampled batch of step ``step``: ``num_tasks /
    process_count`` tasks from the stream ``step * process_count + process_index`` (one process: exactly
    ``source.sample(step, num_tasks, ...)``)."""
    if process_count == 1:
        return source.sample(step, num_tasks, split, query)
    return source.sample(step * process_count + process_index, num_tasks // process_count, split, query)


def host_batch(source, step: int, num_tasks: int, split: str, query: int, mesh: Optional[Mesh]):
    """The global training batch of a host sampler, task-sharded over the mesh: each process samples only
    its own share (``sample_share``) and ``jax.make_array_from_process_local_data`` assembles the global
    array. One device: ``source.sample(step, num_tasks, split, query)`` unchanged."""
    if mesh is None:
        return source.sample(step, num_tasks, split, query)
    p, n_proc = jax.process_index(), jax.process_count()
    _, size = local_share(mesh, num_tasks)
    if n_proc > 1 and size * n_proc != num_tasks:
        raise ConfigError(f'config.meta.batch_size: {num_tasks} tasks cannot be split evenly over '
                          f'{n_proc} processes with {size} tasks each')
    local = sample_share(source, step, num_tasks, split, query, p, n_proc)
    sharding = task_sharded(mesh)
    return jax.tree_util.tree_map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x),
                                                         (num_tasks,) + np.shape(x)[1:]), local)


def step_scalar(step: int, mesh: Optional[Mesh]):
    """The int32 step index as a replicated input of a sharded step."""
    value = np.asarray(step, np.int32)
    if mesh is None:
        return jax.numpy.asarray(value)
    return _global_replicated(value, replicated(mesh))


def describe(mesh: Optional[Mesh]) -> str:
    """', sharded over N devices in P processes' for a log line ('' with one device)."""
    n = num_devices(mesh)
    if n == 1 and jax.process_count() == 1:
        return ''
    return f', task batch sharded over {n} devices in {jax.process_count()} process(es)'
