"""Omniglot 5-way 1-shot, MAML's split (all 1623 characters shuffled with a fixed seed: 1100 meta-train
with rotations as new classes, 100 meta-val, 423 meta-test), the paper's hyperparameters as read from
the reference implementation (REFERENCE-NOTES.md): CNN4 (64 channels), 15 query images per class at
meta-train, query = shots at meta-val/test, 4 tasks per meta-batch, K = 5 inner steps (train and test),
inner step size alpha = 0.01 (the reference's default; MAML's own Omniglot runs used 0.4),
Adam with meta step size 1e-3, 60000 meta-iterations, 1000 test tasks.

Data: the full background and evaluation sets (images_background.zip, images_evaluation.zip) in
$OMNIGLOT_DIR (default ~/data/omniglot), or --config.task.source=tfds on a machine with a network.
Any method: --config.method=maml|md|...; 5-shot: --config.task.shots=5 --config.eval.query=5.
"""
import os

from md_meta.config import base_config


def get_config():
    c = base_config()
    c.method = 'md'
    c.task.name = 'omniglot'
    c.task.data_dir = os.environ.get('OMNIGLOT_DIR', os.path.expanduser('~/data/omniglot'))
    c.task.split = 'maml'
    c.task.source = 'auto'
    c.task.ways = 5
    c.task.shots = 1
    c.task.query = 15
    c.model.name = 'cnn4'
    c.model.features = 64
    c.inner.steps = 5
    c.inner.step_size = 0.01
    c.meta.optimizer = 'adam'
    c.meta.lr = 1e-3
    c.meta.batch_size = 4
    c.meta.steps = 60000
    c.eval.num_tasks = 1000
    c.eval.batch_size = 100
    c.eval.query = 1
    c.train.log_every = 100
    c.train.eval_every = 1000
    c.train.checkpoint_every = 1000
    return c
