"""A run's workdir: its config (config.json), the lock held while it trains, and the provenance that
every results file carries.

* ``prepare`` writes config.json; a workdir holding a run of another config, a file, or a run already
  past ``meta.steps`` is refused with a ``WorkdirError`` naming what to do.
* ``lock`` takes an exclusive ``flock`` on ``<workdir>/.lock`` for the run's lifetime; the OS releases it
  when the process ends, so a kill -9 never leaves a stale lock. ``holder`` tells another process (e.g.
  experiments.evaluate) whether training is still running there, and its pid.
* ``claim`` does both for a training run: creates the workdir, holds its lock for the run and
  ``prepare``s it.
* ``check_data`` records an image run's split and data fingerprint (split.json) at its first run and
  refuses a changed data set on resume and evaluation.
* ``provenance`` is the header of results.json and evaluation.json: md-meta version, git commit, the
  meta-step, the planned total, which parameters (final/best/last) and the fingerprint of the checkpoint
  they came from (md_meta.checkpoint), so that a result can be checked against the run's current state.
"""
from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import subprocess
from typing import Optional

import ml_collections

from md_meta import __version__
from md_meta import config as config_lib

try:
    import fcntl
except ImportError:  # not POSIX: no locking
    fcntl = None

# Fields that do not change the training computation: a rerun may change them (e.g. more meta.steps to
# continue a run, another final evaluation). Every other field must match the run in the workdir.
NON_COMPUTE_FIELDS = ('meta.steps', 'eval.', 'train.keep', 'train.max_nonfinite', 'train.log_every',
                      'train.tensorboard', 'task.data_dir', 'task.source',
                      'dist.',  # topology: a run may resume on other devices/processes
                      'meta.task_batching', 'meta.task_chunk',  # how tasks are batched: same values up to rounding
                      'md.group_cost_max')  # how g's products are grouped: the same map up to rounding
LOCK_NAME = '.lock'


class WorkdirError(RuntimeError):
    """The workdir cannot be used for this run; the message says why and what to do."""


class WorkdirMismatchError(WorkdirError):
    """The workdir holds a run of another config."""


class WorkdirBusyError(WorkdirError):
    """Another process is training in the workdir."""


def flatten(d: dict, prefix: str = '') -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f'{prefix}{k}.'))
        else:
            out[f'{prefix}{k}'] = v
    return out


# Values of earlier schemas that meant what today's value means: (section, field, old value) -> today's value
RETIRED_VALUES = {('inner', 'unroll', -1): 1,                     # the automatic unroll always resolved to 1
                  ('meta', 'task_batching', 'unroll'): 'vmap'}    # per-task copies: the same values as vmap

# Fields added to the schema after runs were made, with what a config without them computed: (section, field) ->
# that value (where today's default differs, an older run must not silently take it)
ADDED_FIELDS = {('md', 'kronecker'): 'none', ('md', 'start'): 'dual', ('md', 'activation'): 'relu'}


def config_from_dict(d: dict) -> ml_collections.ConfigDict:
    """The schema's defaults (config.base_config) updated with ``d`` (e.g. a workdir's config.json);
    JSON lists become tuples where the schema has tuples; fields unknown to the schema are kept; retired
    values (``RETIRED_VALUES``) become today's equivalent, and fields added later (``ADDED_FIELDS``) take the value
    an older config computed with."""
    d = json.loads(json.dumps(d))
    for (section, field), meant in ADDED_FIELDS.items():
        if isinstance(d.get(section), dict) and field not in d[section]:
            d[section][field] = meant
    for (section, field, old), new in RETIRED_VALUES.items():
        if isinstance(d.get(section), dict) and d[section].get(field) == old:
            d[section][field] = new
    def update(node, d):
        for k, v in d.items():
            if isinstance(v, dict) and k in node and isinstance(node[k], ml_collections.ConfigDict):
                update(node[k], v)
            elif isinstance(v, dict):
                node[k] = ml_collections.ConfigDict(v)
            else:
                if isinstance(v, list) and k in node and isinstance(node[k], tuple):
                    v = tuple(v)
                if k in node and node[k] is not None and v is not None:
                    try:
                        node[k] = v
                    except TypeError:
                        node[k] = type(node[k])(v)
                else:
                    with node.ignore_type():
                        node[k] = v
    c = config_lib.base_config()
    update(c, d)
    return c


def load_config(workdir: str) -> ml_collections.ConfigDict:
    """The workdir's config.json; FileNotFoundError without one, WorkdirError (one line) for a damaged one
    (truncated, empty, not a JSON object)."""
    path = os.path.join(workdir, 'config.json')
    if not os.path.exists(path):
        raise FileNotFoundError(f'{path} not found: {workdir} is not a md-meta workdir')
    try:
        with open(path, 'rb') as f:
            d = json.loads(f.read().decode('utf-8'))
    except (UnicodeDecodeError, ValueError) as e:
        raise WorkdirError(f'{path} is damaged (not JSON: {_first_line(e)})') from None
    if not isinstance(d, dict):
        raise WorkdirError(f'{path} is damaged (a JSON {type(d).__name__}, not the object of a config)')
    try:
        return config_from_dict(d)
    except (TypeError, ValueError, AttributeError, KeyError) as e:
        raise WorkdirError(f'{path} is damaged ({type(e).__name__}: {_first_line(e)})') from None


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0][:200] if lines else type(e).__name__


def config_differences(stored, config) -> list:
    """Dotted names of the computation-relevant fields where two configs differ. A field of the stored
    config that today's schema no longer has (a removed knob) cannot change today's computation."""
    a = flatten(json.loads(stored.to_json()))
    b = flatten(json.loads(config.to_json()))
    schema = flatten(json.loads(config_lib.base_config().to_json()))
    out = []
    for k in sorted(set(a) | set(b)):
        if k not in schema and k not in b:
            continue
        if any(k == f or (f.endswith('.') and k.startswith(f)) for f in NON_COMPUTE_FIELDS):
            continue
        if a.get(k, None) != b.get(k, None):
            out.append(k)
    return out


def write_atomic(path: str, text: str) -> None:
    """Writes ``text`` to ``path`` through a temporary file and a rename; the temporary file is removed
    if writing fails (e.g. a full disk), so nothing half-written is left behind."""
    tmp = f'{path}.tmp{os.getpid()}'
    try:
        with open(tmp, 'w') as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise


def make(workdir: str) -> None:
    """Creates the workdir; WorkdirError (one line) when it is a file or cannot be created."""
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise WorkdirError(f'{workdir} is a file, not a directory; pass a directory as --workdir')
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as e:
        raise WorkdirError(f'cannot create the workdir {workdir} ({e.strerror}); pass another --workdir') from e
    if not os.access(workdir, os.W_OK):
        raise WorkdirError(f'{workdir} is not writable; pass a writable --workdir')


def prepare(config, workdir: str, last_step: int = 0) -> None:
    """Creates the workdir and writes config.json; refuses (WorkdirMismatchError) a workdir holding a run
    of a config that differs in a field that changes the computation (all but NON_COMPUTE_FIELDS), a
    workdir holding checkpoints without a config, or (``last_step``: its newest checkpoint) a run that is
    already past ``config.meta.steps``."""
    make(workdir)
    path = os.path.join(workdir, 'config.json')
    if os.path.exists(path):
        try:
            stored = load_config(workdir)
        except WorkdirError as e:
            raise WorkdirMismatchError(f'{e}; refusing to overwrite the run in {workdir}') from None
        except Exception as e:  # noqa: BLE001
            raise WorkdirMismatchError(f'{path} is unreadable ({e}); refusing to overwrite the run in {workdir}')
        diff = config_differences(stored, config)
        if diff:
            a = flatten(json.loads(stored.to_json()))
            b = flatten(json.loads(config.to_json()))
            shown = ', '.join(f'{k}: {a.get(k)!r} in the workdir, {b.get(k)!r} now' for k in diff[:5])
            more = f' (and {len(diff) - 5} more)' if len(diff) > 5 else ''
            raise WorkdirMismatchError(
                f'{workdir} holds a run of another config ({shown}{more}); refusing to overwrite it. '
                'Use another --workdir, or delete this one to start over.')
    elif last_step:
        raise WorkdirMismatchError(f'{workdir} holds checkpoints but no config.json; refusing to use it')
    if last_step > config.meta.steps:
        raise WorkdirMismatchError(
            f'{workdir} is already at meta-step {last_step}, past config.meta.steps={config.meta.steps}; pass '
            f'--config.meta.steps={last_step} or more to continue it, evaluate it with experiments.evaluate, '
            'or use another --workdir')
    write_atomic(path, config.to_json(indent=2) + '\n')


# ----------------------------------------------------------------------------- the data a run was trained on
SPLIT_NAME = 'split.json'


def data_changes(stored: dict, now: dict) -> list:
    """What differs between two split records (md_meta.data.episodes.split_record): classes moved between
    splits, removed, added, or holding other images; each item a short phrase with an example."""
    where = lambda r: {name: split for split, classes in r.get('splits', {}).items() for name in classes}
    prints = lambda r: {name: fp for classes in r.get('splits', {}).values() for name, fp in classes.items()}
    old, new, old_fp, new_fp = where(stored), where(now), prints(stored), prints(now)
    moved = sorted(n for n in new if n in old and old[n] != new[n])
    removed, added = sorted(set(old) - set(new)), sorted(set(new) - set(old))
    changed = sorted(n for n in new if n in old and old[n] == new[n] and old_fp[n] != new_fp[n])
    count = lambda xs, what: f'{len(xs)} class{"es" * (len(xs) > 1)} {what}'
    out = []
    if moved:
        out.append(count(moved, 'moved between splits') + f' (e.g. {moved[0]!r}: {old[moved[0]]} -> {new[moved[0]]})')
    if removed:
        out.append(count(removed, 'removed') + f' (e.g. {removed[0]!r} of {old[removed[0]]})')
    if added:
        out.append(count(added, 'added') + f' (e.g. {added[0]!r} in {new[added[0]]})')
    if changed:
        out.append(count(changed, 'with other images') + f' (e.g. {changed[0]!r}: {new_fp[changed[0]].split()[0]} '
                   f'images now, {old_fp[changed[0]].split()[0]} recorded)')
    return out


def check_data(workdir: str, record: dict, write: bool = True) -> None:
    """Records the run's split and data fingerprint in ``<workdir>/split.json`` at its first run (``write``),
    and refuses (WorkdirMismatchError, one line naming what changed) a data set that differs from the recorded
    one: a changed folder moves a seeded split, and test classes would leak into meta-training."""
    path = os.path.join(workdir, SPLIT_NAME)
    if not os.path.exists(path):
        if write:
            write_atomic(path, strict_json(record))
        return
    try:
        with open(path, 'rb') as f:
            stored = json.loads(f.read().decode('utf-8'))
        if not isinstance(stored, dict):
            raise ValueError(f'a JSON {type(stored).__name__}')
    except (OSError, ValueError) as e:
        raise WorkdirMismatchError(f'{path} is damaged ({_first_line(e)}); it records the data this run was '
                                   'trained on: restore it, or use another --workdir') from None
    changes = data_changes(stored, record)
    if changes:
        raise WorkdirMismatchError(
            f'{workdir} was trained on other data than config.task.data_dir={record.get("data_dir", "")!r} holds '
            f'now ({path}): {"; ".join(changes)}; restore the data set, or use another --workdir')


# ----------------------------------------------------------------------------- locking
_HELD: dict = {}   # realpath of a lock file -> [file object, count]: this process's locks (re-entrant)


class lock:
    """``with workdirs.lock(workdir): ...``: an exclusive lock on the workdir, re-entrant within one
    process; WorkdirBusyError naming the holder's pid when another process holds it."""

    def __init__(self, workdir: str):
        self.path = os.path.realpath(os.path.join(workdir, LOCK_NAME))

    def __enter__(self):
        if fcntl is None:
            return self
        held = _HELD.get(self.path)
        if held is not None:
            held[1] += 1
            return self
        f = open(self.path, 'a+')
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            f.close()
            if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                pid = _read_pid(self.path)
                raise WorkdirBusyError(
                    f'{os.path.dirname(self.path)} is in use by another training process'
                    f'{f" (pid {pid})" if pid else ""}; wait for it to finish, stop it, or use another '
                    '--workdir') from None
            raise
        f.seek(0)
        f.truncate()
        f.write(f'{os.getpid()}\n')
        f.flush()
        _HELD[self.path] = [f, 1]
        return self

    def __exit__(self, *exc):
        held = _HELD.get(self.path)
        if held is None:
            return False
        held[1] -= 1
        if held[1] == 0:
            del _HELD[self.path]
            held[0].close()   # releases the flock
        return False


@contextlib.contextmanager
def claim(config, workdir: str):
    """``with workdirs.claim(config, workdir): ...``: creates the workdir (``make``), holds its lock for the
    block and writes config.json (``prepare``, checked against the step of its newest checkpoint)."""
    from md_meta import checkpoint as checkpoint_lib  # imported here: reading a workdir needs no orbax
    make(workdir)
    with lock(workdir):
        steps = checkpoint_lib.Checkpointer(workdir).steps()
        prepare(config, workdir, last_step=steps[-1] if steps else 0)
        yield


def _read_pid(path: str) -> Optional[int]:
    try:
        with open(path) as f:
            return int(f.read().strip() or 0) or None
    except (OSError, ValueError):
        return None


def holder(workdir: str) -> Optional[int]:
    """The pid of the process training in ``workdir`` (-1 if unknown), or None when nobody holds its lock
    (or this process does)."""
    path = os.path.realpath(os.path.join(workdir, LOCK_NAME))
    if fcntl is None or not os.path.exists(path) or path in _HELD:
        return None
    try:
        with open(path) as f:
            try:
                fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError:
                return _read_pid(path) or -1
            fcntl.flock(f, fcntl.LOCK_UN)
    except OSError:
        return None
    return None


# ----------------------------------------------------------------------------- provenance
def git_commit() -> Optional[str]:
    """The commit of the md-meta checkout (with '+dirty' for uncommitted changes), or None."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(['git', '-C', here, 'rev-parse', 'HEAD'], capture_output=True, text=True,
                              timeout=10)
        if head.returncode:
            return None
        dirty = subprocess.run(['git', '-C', here, 'status', '--porcelain', '--untracked-files=no'],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head.stdout.strip() + ('+dirty' if dirty else '')
    except (OSError, subprocess.SubprocessError):
        return None


def provenance(config, step: int, parameters: str, fingerprint: Optional[str],
               trained_to: Optional[int] = None) -> dict:
    """The header of every results file: where its numbers come from. ``trained_to``: the step the run has
    reached (its newest checkpoint; default ``step``): a finished run's best checkpoint may be an earlier one,
    and the run is still finished."""
    reached = int(step if trained_to is None else trained_to)
    return {'md_meta_version': __version__, 'git_commit': git_commit(), 'method': config.method,
            'task': config.task.name, 'ways': config.task.ways, 'train_shots': config.task.shots,
            'norm_stats': config.model.norm_stats, 'seed': config.seed, 'step': int(step),
            'planned_steps': int(config.meta.steps),
            'finished': reached >= int(config.meta.steps), 'parameters': parameters,
            'checkpoint_fingerprint': fingerprint, 'config': json.loads(config.to_json())}


def strict_json(obj) -> str:
    """JSON text of a results file with NaN and inf written as null (bare NaN is not JSON: strict readers,
    jq and JavaScript refuse the file), indented."""
    def finite(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: finite(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [finite(v) for v in x]
        return x
    return json.dumps(finite(obj), indent=2, allow_nan=False) + '\n'
