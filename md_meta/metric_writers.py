"""Metric writers: where a training run's scalars go. One small interface, in the spirit of clu's MetricWriter:

    class MetricWriter(Protocol):
        def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None: ...
        def close(self) -> None: ...

``training.train`` writes every logging step's record (the training scalars averaged over train.log_every
steps, named as in metrics.jsonl: 'meta_loss', 'skipped', ...) and every meta-validation ('val/loss',
'val/accuracy', ...) to each writer: metrics.jsonl (``JsonLines``) and TensorBoard (``TensorBoard``) in a
workdir, and any writer passed as ``training.train(exp, workdir, writers=[...])``, e.g. one for another tracker:

    class MLflowWriter:                      # or Weights & Biases, a database, a plot that updates ...
        def write_scalars(self, step, scalars):
            mlflow.log_metrics({k: v for k, v in scalars.items() if v is not None}, step=step)
        def close(self):
            pass

Values are floats, or None where a value was not finite (NaN, inf), as in metrics.jsonl.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Callable, Mapping, Protocol, Sequence

import numpy as np


class MetricWriter(Protocol):
    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None: ...

    def close(self) -> None: ...


def finite_or_none(scalars: Mapping) -> dict:
    """NaN and inf as None (strict JSON; what every writer receives)."""
    return {k: None if isinstance(v, float) and not np.isfinite(v) else v for k, v in scalars.items()}


class JsonLines:
    """<workdir>/metrics.jsonl, one JSON object per write ({'step': ..., **scalars}). On resume at
    ``start_step`` the records after it are dropped (they will be written again), and a damaged line (not UTF-8
    JSON with a step: a line cut by a kill, a stray byte) is skipped with a warning."""

    def __init__(self, workdir: str, start_step: int, warn: Callable = print):
        from md_meta import workdirs
        path = os.path.join(workdir, 'metrics.jsonl')
        if os.path.exists(path):
            kept, damaged = [], 0
            with open(path, 'rb') as f:   # bytes: a damaged line (not UTF-8, not JSON) is skipped, not fatal
                lines = f.read().splitlines()
            for i, raw in enumerate(lines):
                try:
                    if json.loads(raw.decode('utf-8'))['step'] <= start_step:
                        kept.append(raw.decode('utf-8') + '\n')
                except (ValueError, KeyError, TypeError):
                    damaged += i < len(lines) - 1   # the last line may be one cut by a kill
            if damaged:
                warn(f'warning: {path}: skipped {damaged} damaged line{"s" * (damaged > 1)} (not UTF-8 JSON with '
                     'a step)')
            workdirs.write_atomic(path, ''.join(kept))
        self.file = open(path, 'a')

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        self.file.write(json.dumps({'step': int(step), **scalars}) + '\n')
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class TensorBoard:
    """TensorBoard events in <workdir>/tb (tensorboardX); training scalars under 'train/', others as named.
    Events after ``start_step`` are purged on resume."""

    def __init__(self, workdir: str, start_step: int):
        from tensorboardX import SummaryWriter
        self.writer = SummaryWriter(os.path.join(workdir, 'tb'), purge_step=start_step, flush_secs=30)

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        for k, v in scalars.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                self.writer.add_scalar(k if '/' in k else 'train/' + k, v, step)

    def close(self) -> None:
        self.writer.close()


def for_workdir(workdir: str | None, start_step: int, tensorboard: bool, extra: Sequence = (),
                warn: Callable = print) -> list:
    """The writers of a run: metrics.jsonl and (if asked and installed) TensorBoard in its workdir, then
    ``extra``."""
    writers = []
    if workdir:
        writers.append(JsonLines(workdir, start_step, warn))
        if tensorboard:
            try:
                writers.append(TensorBoard(workdir, start_step))
            except ImportError:
                print("warning: tensorboardX is not installed, so no TensorBoard events (pip install "
                      "'md-meta[tensorboard]'; or --config.train.tensorboard=False)", file=sys.stderr)
    return writers + list(extra)
