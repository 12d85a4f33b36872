"""Checkpoints of a training run in ``<workdir>/checkpoints/ckpt_<step>``, saved by orbax's
``CheckpointManager``: written atomically (to a temporary directory renamed when complete, so a kill -9
mid-write leaves no ``ckpt_<step>`` behind, and the temporary one is removed later), pruned by its
preservation policies to the last ``keep`` checkpoints plus the best by meta-validation (accuracy if
present, else -loss).

Each checkpoint holds the training state pytree ({'meta', 'opt_state'}) and a small JSON record
({'step', 'consecutive_nonfinite', 'skipped_total', 'val': {metric: mean}, 'checksums', 'fingerprint'}):
the sha256 of every array as saved, verified on restore, so that a file changed after it was written
(a flipped bit, a bad copy) is caught like a truncated one; 'fingerprint' names the state in results
files (md_meta.workdirs.provenance). A checkpoint is never written with a non-finite leaf
(``NonFiniteCheckpointError``), and ``restore_latest`` reports an unreadable, truncated or corrupted
checkpoint with its path, sets it aside as ``*.corrupt`` and falls back to the previous good one. A checkpoint
whose meta-parameters have other paths or shapes than the model, or whose optimizer state has other arrays than
the optimizer's (another md-meta version wrote it) is not damaged: ``CheckpointLayoutError``, one line naming
it, and nothing is set aside.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import re
import shutil
import signal
import sys
import threading
from typing import Any, Callable, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from md_meta.workdirs import WorkdirMismatchError

_NAME = re.compile(r'^ckpt_(\d+)$')


class CheckpointLayoutError(WorkdirMismatchError):
    """A checkpoint whose parameters have another structure or shapes than the model this code builds from
    the workdir's config (written by another md-meta version): reported, never set aside."""


class NonFiniteCheckpointError(ValueError):
    """Refused to write a checkpoint holding NaN or inf."""


def all_finite(tree) -> bool:
    return all(bool(np.all(np.isfinite(np.asarray(x)))) for x in jax.tree_util.tree_leaves(tree)
               if np.issubdtype(np.asarray(x).dtype, np.inexact))


@contextlib.contextmanager
def sigint_deferred():
    """Ctrl-C inside the block is held until the block ends, then raised as KeyboardInterrupt: a save
    is finished, never abandoned half-way with orbax's threads still running."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    received = []
    signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if received:
        raise KeyboardInterrupt


def checksums(tree) -> list:
    """sha256 (hex) of every leaf: its dtype, shape and bytes."""
    out = []
    for x in jax.tree_util.tree_leaves(tree):
        a = np.ascontiguousarray(np.asarray(x))
        h = hashlib.sha256(f'{a.dtype.str}{a.shape}'.encode())
        h.update(a.tobytes())
        out.append(h.hexdigest())
    return out


def fingerprint(sums: list) -> str:
    """A short name of a state: 16 hex digits of the sha256 of its leaves' checksums."""
    return hashlib.sha256(''.join(sums).encode()).hexdigest()[:16]


def val_score(val: Optional[dict]) -> Optional[float]:
    """Higher is better: accuracy if recorded, else -loss; None without a meta-validation record or with a
    NaN one (a NaN score ranks nowhere: it made the oldest checkpoint kept the 'best')."""
    if not val:
        return None
    name, sign = ('accuracy', 1.0) if 'accuracy' in val else ('loss', -1.0) if 'loss' in val else (None, 0.0)
    value = val.get(name) if name else None
    if value is None or not np.isfinite(float(value)):
        return None
    return sign * float(value)


class Checkpointer:
    """md-meta's guarantees as thin layers over orbax's ``CheckpointManager`` (which saves, names steps
    ``ckpt_<step>``, keeps the last ``keep`` plus the best by meta-validation with its preservation
    policies, and removes temporary directories left by a kill): no non-finite state is saved, every
    array's checksum is stored and verified, and a bad checkpoint is set aside with a message."""

    def __init__(self, workdir: str, keep: int = 3, warn: Callable[[str], Any] = None):
        self.directory = os.path.abspath(os.path.join(workdir, 'checkpoints'))
        self.keep = keep
        self.warn = warn or (lambda s: print(s, file=sys.stderr, flush=True))
        self._manager_: Optional[ocp.CheckpointManager] = None
        self._records: dict = {}

    @property
    def _manager(self) -> ocp.CheckpointManager:
        """Created on first use (reading a workdir creates nothing in it)."""
        if self._manager_ is None:
            keep_best = ocp.checkpoint_managers.BestN(get_metric_fn=lambda m: m['score'], reverse=False, n=1,
                                                      keep_checkpoints_without_metrics=False)  # highest score
            options = ocp.CheckpointManagerOptions(
                step_prefix='ckpt', step_format_fixed_length=9, enable_async_checkpointing=False,
                cleanup_tmp_directories=True, create=True,
                preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(
                    [ocp.checkpoint_managers.LatestN(n=self.keep), keep_best]))
            self._manager_ = ocp.CheckpointManager(self.directory, options=options, item_names=('state', 'record'))
        return self._manager_

    # ----------------------------------------------------------------- listing
    def path(self, step: int) -> str:
        return os.path.join(self.directory, f'ckpt_{step:09d}')

    def steps(self) -> list:
        if not os.path.isdir(self.directory):
            return []
        out = []
        for name in os.listdir(self.directory):
            m = _NAME.match(name)
            if m and os.path.isdir(os.path.join(self.directory, name)):
                out.append(int(m.group(1)))
        return sorted(out)

    def record(self, step: int) -> Optional[dict]:
        """The JSON record of a checkpoint (None if unreadable)."""
        if step not in self._records:
            try:
                r = ocp.Checkpointer(ocp.CompositeCheckpointHandler()).restore(
                    self.path(step), args=ocp.args.Composite(record=ocp.args.JsonRestore()))
                self._records[step] = dict(r['record'])
            except Exception:  # noqa: BLE001 - any unreadable record
                return None
        return self._records[step]

    def best_step(self) -> Optional[int]:
        """The checkpoint with the best finite meta-validation score (the latest among equals, as orbax's
        BestN); None when none has one."""
        best, best_score = None, None
        for s in self.steps():
            r = self.record(s)
            score = val_score(r.get('val')) if r else None
            if score is not None and (best_score is None or score >= best_score):
                best, best_score = s, score
        return best

    def step_of(self, which: str) -> Optional[int]:
        """The checkpoint 'best' or 'last' names: the best by meta-validation, or the newest where no checkpoint
        has a finite score (every validation NaN, or none run); None without checkpoints."""
        steps = self.steps()
        best = self.best_step() if which == 'best' else None
        return best if best is not None else (steps[-1] if steps else None)

    def no_score_note(self) -> str:
        """Why 'best' is the newest checkpoint, where some checkpoint was validated but none has a finite
        score; '' otherwise."""
        if self.best_step() is not None:
            return ''
        validated = [s for s in self.steps() if (self.record(s) or {}).get('val')]
        return (f'every meta-validation of the {len(validated)} checkpoints validated was NaN, so there is no best '
                "checkpoint; 'best' is the last one") if validated else ''

    # ----------------------------------------------------------------- saving
    def save(self, step: int, state: Any, record: dict) -> str:
        """Writes ckpt_<step> (replacing one left by an earlier attempt); the manager then prunes to the
        last ``keep`` plus the best. Ctrl-C during the save takes effect when it is complete."""
        state = jax.device_get(state)
        if not all_finite(state):
            raise NonFiniteCheckpointError(f'refusing to write checkpoint {self.path(step)}: the state holds '
                                           'NaN or inf')
        sums = checksums(state)
        record = dict(record, step=int(step), checksums=sums, fingerprint=fingerprint(sums))
        score = val_score(record.get('val'))
        path = self.path(step)
        with sigint_deferred():
            if os.path.exists(path):
                shutil.rmtree(path)
                self._manager.reload()
            try:
                self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                                 record=ocp.args.JsonSave(record)),
                                   metrics=None if score is None else {'score': score}, force=True)
                self._manager.wait_until_finished()
            except Exception as e:  # noqa: BLE001 - orbax/tensorstore report a full disk as ValueError
                if 'No space left on device' in str(e) and not isinstance(e, OSError):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path) from e
                raise
            self._records[step] = record
        for s in list(self._records):
            if s not in self.steps():
                self._records.pop(s)
        return path

    # ----------------------------------------------------------------- restoring
    def restore(self, step: int, template: Any):
        """(state, record) of ckpt_<step>; ``template`` gives the pytree structure, shapes and dtypes.
        Raises on an unreadable, truncated, mismatched, changed (checksum) or non-finite checkpoint."""
        abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype),
                                          template)
        self._check_layout(step, abstract)
        r = ocp.Checkpointer(ocp.CompositeCheckpointHandler()).restore(
            self.path(step), args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                     record=ocp.args.JsonRestore()))
        record = dict(r['record'])
        leaves, treedef = jax.tree_util.tree_flatten(abstract)
        got = jax.tree_util.tree_leaves(r['state'])
        if len(got) != len(leaves):
            raise ValueError(f'it holds {len(got)} arrays, the model has {len(leaves)}')
        # orbax restores named tuples (optax states) as tuples: put the template's structure back
        state = jax.tree_util.tree_unflatten(treedef, got)
        for a, b in zip(got, leaves):
            if a.shape != b.shape or a.dtype != b.dtype:
                raise CheckpointLayoutError(self._layout_message(
                    step, f'an array of shape {a.shape} {a.dtype} where the model has {b.shape} {b.dtype}'))
        if 'checksums' in record:  # checkpoints written before checksums were stored have none
            got_sums = checksums(state)
            if len(got_sums) != len(record['checksums']):
                raise ValueError(f"its record lists {len(record['checksums'])} checksums for {len(got_sums)} arrays")
            paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(abstract)[0]]
            for p, a, b in zip(paths, got_sums, record['checksums']):
                if a != b:
                    raise ValueError(f'checksum mismatch in {p}: the file changed after it was written')
        if not all_finite(state):
            raise ValueError('the checkpoint holds NaN or inf')
        if int(record.get('step', -1)) != step:
            raise ValueError(f"its record names step {record.get('step')}")
        return state, record

    def _layout_message(self, step: int, what: str) -> str:
        return (f'{self.path(step)} was written with another parameter layout than this md-meta builds for its '
                f'config ({what}): another md-meta version wrote it (CHANGELOG.md, "Interface changes"); '
                'evaluate or resume it with that version, or use another --workdir')

    def _check_layout(self, step: int, abstract: Any) -> None:
        """Raises CheckpointLayoutError when the stored meta-parameters' tree paths differ from the model's, or
        the optimizer state's array shapes from the optimizer's (read from the checkpoint's metadata, before
        any array is read)."""
        absl_logger = logging.getLogger('absl')   # orbax warns that the item has no metadata file of its own
        level = absl_logger.level
        absl_logger.setLevel(logging.ERROR)
        try:
            meta = ocp.PyTreeCheckpointer().metadata(os.path.join(self.path(step), 'state'))
        except Exception:  # noqa: BLE001 - no readable metadata: restore reports the file itself
            return
        finally:
            absl_logger.setLevel(level)
        tree = getattr(getattr(meta, 'item_metadata', meta), 'tree', getattr(meta, 'item_metadata', meta))
        paths = lambda t: {jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(t)[0]}
        try:
            stored, model = paths(tree['meta']), paths(abstract['meta'])
        except (KeyError, TypeError):
            return
        if stored != model:
            extra, missing = sorted(stored - model), sorted(model - stored)
            example = (f"it holds {extra[0]}" if extra else '') + (', ' if extra and missing else '') + \
                (f"the model has {missing[0]}" if missing else '')
            raise CheckpointLayoutError(self._layout_message(
                step, f"{len(extra)} stored and {len(missing)} model arrays unmatched under ['meta'], e.g. {example}"))
        # the optimizer state: orbax names its named tuples' fields otherwise, so compare the arrays' shapes
        shapes = lambda t: sorted(tuple(getattr(x, 'shape', np.shape(x))) for x in jax.tree_util.tree_leaves(t))
        try:
            stored, model = shapes(tree['opt_state']), shapes(abstract['opt_state'])
        except (KeyError, TypeError):
            return
        if stored != model:
            raise CheckpointLayoutError(self._layout_message(
                step, f"an optimizer state of {len(stored)} arrays where the model's has {len(model)}"
                      + (f', shapes {stored[:3]}... against {model[:3]}...' if len(stored) == len(model) else '')))

    def restore_latest(self, template: Any, which: str = 'last'):
        """(step, state, record) of the newest good checkpoint (``which='best'``: the best one first),
        or None if there is none. Bad ones are reported with their path and set aside as ``*.corrupt``; a checkpoint
        of another parameter layout raises CheckpointLayoutError (one line naming the path) and stays."""
        order = sorted(self.steps(), reverse=True)
        if which == 'best':
            best = self.best_step()
            if best is not None:
                order = [best] + [s for s in order if s != best]
            elif self.no_score_note():
                self.warn(f'warning: {self.directory}: {self.no_score_note()}')
        for step in order:
            try:
                state, record = self.restore(step, template)
            except CheckpointLayoutError:
                raise   # not damage: every checkpoint of the run has that layout
            except Exception as e:  # noqa: BLE001 - report and fall back to the previous one
                path = self.path(step)
                msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                self.warn(f'warning: checkpoint {path} is unreadable, truncated or corrupted ({type(e).__name__}: '
                          f'{msg[:300]}); setting it aside as {os.path.basename(path)}.corrupt and using the '
                          'previous one')
                self._set_aside(path)
                self._records.pop(step, None)
                continue
            return step, state, record
        return None

    def _set_aside(self, path: str) -> None:
        if jax.process_index() != 0:
            return  # multi-process runs (md_meta.distributed): only process 0 changes the workdir
        dest = path + '.corrupt'
        if os.path.exists(dest):
            shutil.rmtree(dest, ignore_errors=True)
        try:
            os.replace(path, dest)
        except OSError:
            shutil.rmtree(path, ignore_errors=True)
        if self._manager_ is not None:
            self._manager_.reload()
