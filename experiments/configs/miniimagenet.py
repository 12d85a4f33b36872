"""miniImageNet 5-way 1-shot (Ravi and Larochelle's 64/16/20 class split), 84x84x3, the paper's
hyperparameters as read from the reference implementation (REFERENCE-NOTES.md): CNN4 (64 channels,
1600 features), 15 query images per class at meta-train, query = shots at meta-val/test, 4 tasks per
meta-batch, K = 5 inner steps, alpha = 0.01; meta-optimizer SGD with Nesterov momentum 0.9, learning
rate 1e-3 divided by 10 every 20000 iterations, weight decay 1e-4 (Adam diverged there for the
reference's authors); 60000 meta-iterations, 1000 test tasks.

Data: $MINIIMAGENET_DIR (default ~/data/miniimagenet) holding images/ + train.csv, val.csv, test.csv,
or mini-imagenet-cache-{train,val,test}.pkl (md_meta.data.miniimagenet).
Any method: --config.method=...; 5-shot: --config.task.shots=5 --config.eval.query=5;
ResNet-12: --config.model.name=resnet12.
"""
import os

from md_meta.config import base_config


def get_config():
    c = base_config()
    c.method = 'md'
    c.task.name = 'miniimagenet'
    c.task.data_dir = os.environ.get('MINIIMAGENET_DIR', os.path.expanduser('~/data/miniimagenet'))
    c.task.ways = 5
    c.task.shots = 1
    c.task.query = 15
    c.model.name = 'cnn4'
    c.model.features = 64
    c.inner.steps = 5
    c.inner.step_size = 0.01
    c.meta.optimizer = 'sgd_nesterov'
    c.meta.lr = 1e-3
    c.meta.lr_decay_every = 20000
    c.meta.weight_decay = 1e-4
    c.meta.batch_size = 4
    c.meta.steps = 60000
    c.eval.num_tasks = 1000
    c.eval.batch_size = 100
    c.eval.query = 1
    c.train.log_every = 100
    c.train.eval_every = 1000
    c.train.checkpoint_every = 1000
    return c
