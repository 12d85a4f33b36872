"""miniImageNet 5-way 1-shot (Ravi and Larochelle's 64/16/20 class split), 84x84x3, the paper's
hyperparameters as read from the reference implementation (REFERENCE-NOTES.md): CNN4 (64 channels,
1600 features), 15 query images per class at meta-train, query = shots at meta-val/test, 4 tasks per
meta-batch, K = 5 inner steps, alpha = 0.01, CNN4 initialised with PyTorch's defaults (model.init='torch');
60000 meta-iterations, validation on 1000 tasks every 2000 iterations (the best is tested), 1000 test tasks.
Meta-optimizer as the authors' code chooses it per method: MD gets SGD with Nesterov momentum 0.9, learning
rate 1e-3 divided by 10 every 20000 iterations, weight decay 1e-4 (Adam diverged there for MD); every other
method Adam 1e-3. The method is the config's argument: ``--config=experiments/configs/miniimagenet.py:maml``
(default md); ``--config.method`` alone keeps MD's optimizer.

Data: $MINIIMAGENET_DIR (default ~/data/miniimagenet) holding images/ + train.csv, val.csv, test.csv,
or mini-imagenet-cache-{train,val,test}.pkl (md_meta.data.miniimagenet).
5-shot: --config.task.shots=5 --config.eval.query=5;
ResNet-12: --config.model.name=resnet12.
"""
import os

from md_meta.config import base_config


def get_config(method='md'):
    c = base_config()
    c.method = method or 'md'
    c.task.name = 'miniimagenet'
    c.task.data_dir = os.environ.get('MINIIMAGENET_DIR', os.path.expanduser('~/data/miniimagenet'))
    c.task.ways = 5
    c.task.shots = 1
    c.task.query = 15
    c.model.name = 'cnn4'
    c.model.features = 64
    c.inner.steps = 5
    c.model.init = 'torch'
    c.inner.step_size = 0.01
    c.meta.lr = 1e-3
    if c.method == 'md':
        c.meta.optimizer = 'sgd_nesterov'
        c.meta.lr_decay_every = 20000
        c.meta.weight_decay = 1e-4
    else:
        c.meta.optimizer = 'adam'
    c.meta.batch_size = 4
    c.meta.steps = 60000
    c.eval.num_tasks = 1000
    c.eval.batch_size = 100
    c.eval.query = 1
    c.train.log_every = 100
    c.train.eval_every = 2000
    c.train.val_tasks = 1000
    c.train.checkpoint_every = 2000
    return c
