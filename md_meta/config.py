"""The configuration schema (ml_collections) shared by every config file, and its validation.

``validate`` runs before anything compiles and raises ``ConfigError`` with a one-line message that
names the offending field.
"""
from __future__ import annotations

import math

import ml_collections

TASKS = ('sinusoid', 'omniglot', 'miniimagenet', 'tieredimagenet', 'cifar_fs', 'fc100', 'folder')
IMAGE_TASKS = ('omniglot', 'miniimagenet', 'tieredimagenet', 'cifar_fs', 'fc100', 'folder')
OPTIMIZERS = ('adam', 'sgd_nesterov')
MIN_IMAGE_SIZE = {'cnn4': 16, 'resnet12': 16}   # the image networks' 4 halvings (2x2 max pools) leave >= 1 pixel


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


def base_config() -> ml_collections.ConfigDict:
    """Every field with its default. A method's own section (config.md, config.ecml, ...) is its module's
    ``config_section()`` (md_meta.methods)."""
    from md_meta import methods  # noqa: imported here, as in validate: the method modules import this one
    c = ml_collections.ConfigDict()
    c.method = 'md'
    c.seed = 0

    c.task = ml_collections.ConfigDict()
    c.task.name = 'sinusoid'
    c.task.ways = 5            # classification only
    c.task.shots = 5
    c.task.query = 5           # query points per task (per class for classification) at meta-train
    c.task.data_dir = ''
    c.task.split = 'minimal'   # omniglot: 'maml' (1100/100/423), 'minimal' (by character) or 'minimal_alphabet'
    c.task.alphabet_fold = 0   # omniglot 'minimal_alphabet': which alphabets are held out (0-3; data.omniglot)
    c.task.source = 'auto'     # omniglot: 'tfds' | 'zip' | 'auto'
    c.task.same_alphabet = False  # omniglot: each task's classes from one alphabet (the test condition of Lake's runs)
    c.task.augment = False     # omniglot: random affine warps and thicker strokes on meta-train images (data.episodes)
    c.task.frequency = (1.0, 1.0)  # sinusoid: w ~ U[lo, hi] in y = A sin(w x - b); MAML: (1, 1)
    c.task.image_size = 84     # folder: images resized to image_size x image_size
    c.task.channels = 3        # folder: 1 (grey levels) or 3 (RGB)

    c.model = ml_collections.ConfigDict()
    c.model.name = 'mlp'
    c.model.hidden = (40, 40)
    c.model.conv_impl = 'auto'
    c.model.features = 64
    c.model.init = 'xavier'    # cnn4/resnet12: 'xavier' (MAML's code) | 'torch' (PyTorch's defaults, the paper's authors)
    c.model.norm_stats = 'batch'  # query predictions' batch-norm statistics: 'batch' (transductive) | 'support' (inductive)

    c.inner = ml_collections.ConfigDict()
    c.inner.steps = 1
    c.inner.step_size = 0.01
    c.inner.first_order = False
    c.inner.unroll = 1         # inner steps per iteration of the rolled loop (md_meta.inner.InnerConfig)
    c.inner.remat = True       # jax.checkpoint per step of the loop (K >= 2): less memory, and faster on CPU (docs/benchmarks.md)
    c.inner.eval_steps = -1    # -1: same as steps

    c.meta = ml_collections.ConfigDict()
    c.meta.optimizer = 'adam'
    c.meta.lr = 1e-3
    c.meta.batch_size = 25
    c.meta.steps = 70000
    c.meta.task_batching = 'auto'    # 'vmap' | 'map' | 'auto' (strategies.resolve_task_batching)
    c.meta.task_chunk = 2            # at most this many tasks per vmapped chunk under 'map' (a divisor of batch_size)
    c.meta.task_gradients = 'auto'   # 'batched' | 'per_task' | 'auto' (per_task for image tasks on CPU; strategies.resolve_task_gradients)
    c.meta.compute_dtype = 'float32'  # 'bfloat16': bf16 network compute, fp32 params and optimizer state
    c.meta.lr_decay_every = 0  # sgd_nesterov: x0.1 every N steps (0: never)
    c.meta.weight_decay = 0.0

    for name, section in methods.config_sections().items():   # each method's knobs, from its module
        c[name] = section

    c.eval = ml_collections.ConfigDict()
    c.eval.num_tasks = 600
    c.eval.batch_size = 100
    c.eval.query = -1          # -1: same as task.query
    c.eval.shots = ()          # support sizes evaluated after training (): (task.shots,)

    c.train = ml_collections.ConfigDict()
    c.train.log_every = 1000
    c.train.steps_per_call = 100   # meta-steps fused in one jitted scan (on-device samplers only)
    c.train.max_nonfinite = 10     # consecutive skipped (non-finite) updates before training stops
    c.train.checkpoint_every = 1000  # meta-steps between checkpoints (0: only the final one); see md_meta.checkpoint
    c.train.keep = 3               # checkpoints kept: the last `keep` plus the best by meta-validation
    c.train.eval_every = 1000      # meta-steps between meta-validations (0: never)
    c.train.val_tasks = 100        # the fixed set of 'val' tasks used by meta-validation
    c.train.tensorboard = True     # TensorBoard event files in <workdir>/tb

    c.dist = ml_collections.ConfigDict()  # scaling out, see md_meta.distributed
    c.dist.coordinator = ''        # '': auto-detect SLURM/Open MPI/TPU multi-host; 'auto'; 'off'; 'host:port'
    c.dist.num_processes = 1       # with an explicit coordinator address
    c.dist.process_id = 0          # with an explicit coordinator address
    c.dist.devices = 0             # devices the task batch is sharded over: 0 = all (of all processes)
    c.dist.heartbeat_timeout = 100  # seconds without heartbeat before the other processes stop with an error
    return c


def _require(cond, field, msg):
    if not cond:
        raise ConfigError(f'config.{field}: {msg}')


def _pos_int(c, field):
    v = c
    for part in field.split('.'):
        v = v[part]
    _require(isinstance(v, int) and not isinstance(v, bool) and v > 0, field, f'must be a positive integer, got {v!r}')


def validate(c: ml_collections.ConfigDict, own_source: bool = False, own_model: bool = False) -> None:
    """Raises ConfigError naming the first invalid field. ``own_source`` / ``own_model``: the task source
    or the network are given to ``experiment.build`` directly, so config.task.name / config.model are not
    checked against md-meta's own."""
    from md_meta import methods, networks, strategies  # noqa: the lists of valid values live with their owners
    _require(c.method in methods.names(), 'method', f'unknown method {c.method!r}; choose from {methods.names()}')
    if not own_source:
        _require(c.task.name in TASKS, 'task.name', f'unknown task {c.task.name!r}; choose from {TASKS}')
    for f in ('task.shots', 'task.query', 'task.ways', 'inner.steps', 'meta.batch_size', 'meta.steps',
              'eval.num_tasks', 'eval.batch_size', 'train.log_every', 'train.steps_per_call',
              'train.max_nonfinite', 'inner.unroll', 'train.keep', 'train.val_tasks'):
        _pos_int(c, f)
    _require(c.meta.compute_dtype in ('float32', 'bfloat16', 'float16'), 'meta.compute_dtype',
             f"must be 'float32', 'bfloat16' or 'float16', got {c.meta.compute_dtype!r}")
    for f in ('checkpoint_every', 'eval_every'):
        v = c.train[f]
        _require(isinstance(v, int) and not isinstance(v, bool) and v >= 0, f'train.{f}',
                 f'must be a non-negative integer (0: never), got {v!r}')
    _require(math.isfinite(c.inner.step_size) and c.inner.step_size >= 0, 'inner.step_size',
             f'must be finite and non-negative, got {c.inner.step_size}')
    _require(math.isfinite(c.meta.lr) and c.meta.lr > 0, 'meta.lr', f'must be finite and positive, got {c.meta.lr}')
    _require(math.isfinite(c.meta.weight_decay) and c.meta.weight_decay >= 0, 'meta.weight_decay',
             f'must be finite and non-negative, got {c.meta.weight_decay}')
    if c.task.name != 'sinusoid':
        _require(c.task.ways >= 2, 'task.ways', f'classification needs at least 2 classes per task, got {c.task.ways}')
    hidden = tuple(c.model.hidden)
    _require(len(hidden) > 0 and all(isinstance(h, int) and not isinstance(h, bool) and h > 0 for h in hidden),
             'model.hidden', f'must be positive integers, got {hidden}')
    _require(c.meta.optimizer in OPTIMIZERS, 'meta.optimizer', f'must be one of {OPTIMIZERS}, got {c.meta.optimizer!r}')
    _require(c.meta.task_batching in strategies.TASK_BATCHING, 'meta.task_batching',
             f'must be one of {strategies.TASK_BATCHING}, got {c.meta.task_batching!r}')
    _pos_int(c, 'meta.task_chunk')
    _require(c.meta.task_gradients in strategies.TASK_GRADIENTS, 'meta.task_gradients',
             f'must be one of {strategies.TASK_GRADIENTS}, got {c.meta.task_gradients!r}')
    _require(c.inner.eval_steps == -1 or c.inner.eval_steps > 0, 'inner.eval_steps',
             f'must be -1 (same as inner.steps) or positive, got {c.inner.eval_steps}')
    _require(c.eval.query == -1 or c.eval.query > 0, 'eval.query', f'must be -1 or positive, got {c.eval.query}')
    if not own_model:
        _require(c.model.name in networks.MODELS, 'model.name',
                 f'must be one of {networks.MODELS}, got {c.model.name!r}')
    if c.task.name in IMAGE_TASKS and not own_model and not own_source:
        _require(c.model.name in ('cnn4', 'resnet12'), 'model.name',
                 f"image tasks need 'cnn4' or 'resnet12', got {c.model.name!r}")
    if c.task.name == 'omniglot' and not own_source:
        f = c.task.alphabet_fold
        _require(isinstance(f, int) and not isinstance(f, bool) and f >= 0, 'task.alphabet_fold',
                 f'must be a non-negative integer, got {f!r}')
        _require(f == 0 or c.task.split == 'minimal_alphabet', 'task.alphabet_fold',
                 f"only applies to task.split='minimal_alphabet' (got split {c.task.split!r}, fold {f})")
    for f in ('same_alphabet', 'augment'):   # booleans by the schema's types
        _require(not c.task[f] or c.task.name == 'omniglot' or own_source, f'task.{f}',
                 f'is for Omniglot (alphabets; bright strokes on a dark background), got task.name={c.task.name!r}')
    if not own_model:
        _pos_int(c, 'model.features')
    if c.task.name == 'folder' and not own_source:
        least = 4 if own_model else MIN_IMAGE_SIZE.get(c.model.name, 4)
        _require(isinstance(c.task.image_size, int) and not isinstance(c.task.image_size, bool)
                 and c.task.image_size >= least, 'task.image_size',
                 f'must be an integer >= {least}'
                 + (f' for model.name={c.model.name!r} (4 halvings by 2x2 max pools)' if least > 4 else '')
                 + f', got {c.task.image_size!r}')
        _require(c.task.channels in (1, 3), 'task.channels', f'must be 1 (grey) or 3 (RGB), got {c.task.channels!r}')
    _require(c.model.init in networks.INITS, 'model.init', f'must be one of {networks.INITS}, got {c.model.init!r}')
    _require(c.model.init == 'xavier' or c.model.name in ('cnn4', 'resnet12'), 'model.init',
             f"'torch' is for the image networks (cnn4, resnet12), got model.name={c.model.name!r}")
    _require(c.model.norm_stats in networks.NORM_STATS, 'model.norm_stats',
             f'must be one of {networks.NORM_STATS}, got {c.model.norm_stats!r}')
    _require(c.model.norm_stats == 'batch' or not own_model, 'model.norm_stats',
             "'support' needs md-meta's networks (config.model): they take batch norm's statistics from given rows")
    _require(c.model.conv_impl in networks.CONV_IMPLS, 'model.conv_impl',
             f'must be one of {networks.CONV_IMPLS}, got {c.model.conv_impl!r}')
    _require(c.eval.num_tasks % c.eval.batch_size == 0 or c.eval.num_tasks < c.eval.batch_size,
             'eval.batch_size', f'must divide eval.num_tasks={c.eval.num_tasks}, got {c.eval.batch_size}')
    methods.validate(c, _require)
    for s in c.eval.shots:
        _require(isinstance(s, int) and s > 0, 'eval.shots', f'must be positive integers, got {tuple(c.eval.shots)}')
    if c.task.name == 'sinusoid' and not own_source:
        _require(own_model or c.model.name == 'mlp', 'model.name', "the sinusoid task needs model.name='mlp'")
        f = tuple(c.task.frequency)
        _require(len(f) == 2 and 0 < f[0] <= f[1], 'task.frequency', f'must be (lo, hi) with 0 < lo <= hi, got {f}')
