"""CIFAR-FS 5-way few-shot (Bertinetto et al., ICLR 2019: CIFAR-100's fine classes split 64/16/20; 32x32x3),
from the official CIFAR-100 python archive in $CIFAR100_DIR (default ~/data/cifar100;
``python -m experiments.download cifar100 --dest=DIR``; md_meta.data.cifar100).

The argument is the shots and optionally the network: ``--config=experiments/configs/cifar_fs.py:5`` (5-shot),
``cifar_fs.py:1,resnet12`` (ResNet-12, 64-160-320-640); default ``1`` (1-shot, CNN4). CNN4 with 64 channels at
32x32 (2x2x64 = 256 features into the classifier), 15 query images per class at meta-train and 15 at
meta-val/test, 4 tasks per meta-batch, K = 5 inner steps (10 at test), alpha = 0.01, Adam 1e-3, 60000
meta-steps, validation on 1000 tasks every 2000 steps (the best is tested on 1000 tasks): MAML's
miniImageNet settings, which CIFAR-FS papers reuse. Any method: --config.method=maml|anil|md|...
"""
import os

from md_meta.config import base_config

MODELS = ('cnn4', 'resnet12')


def parse(arg: str) -> tuple:
    """'SHOTS[,MODEL]' -> (shots, model); ValueError naming the accepted forms."""
    parts = [p.strip() for p in str(arg or '1').split(',')]
    if len(parts) > 2 or not parts[0].isdigit() or int(parts[0]) < 1 or (len(parts) == 2 and parts[1] not in MODELS):
        raise ValueError(f"config argument must be 'SHOTS' or 'SHOTS,MODEL' with MODEL in {MODELS}, got {arg!r}")
    return int(parts[0]), parts[1] if len(parts) == 2 else 'cnn4'


def make(task: str, arg: str):
    """The config of ``task`` ('cifar_fs' | 'fc100'; the same protocol) for the argument 'SHOTS[,MODEL]'."""
    shots, model = parse(arg)
    c = base_config()
    c.task.name = task
    c.task.data_dir = os.environ.get('CIFAR100_DIR', os.path.expanduser('~/data/cifar100'))
    c.task.ways = 5
    c.task.shots = shots
    c.task.query = 15
    c.model.name = model
    c.model.features = 64
    c.inner.steps = 5
    c.inner.eval_steps = 10
    c.inner.step_size = 0.01
    c.meta.optimizer = 'adam'
    c.meta.lr = 1e-3
    c.meta.batch_size = 4
    c.meta.steps = 60000
    c.eval.num_tasks = 1000
    c.eval.batch_size = 100
    c.eval.query = 15
    c.train.log_every = 100
    c.train.eval_every = 2000
    c.train.val_tasks = 1000
    c.train.checkpoint_every = 2000
    return c


def get_config(arg='1'):
    return make('cifar_fs', arg)
