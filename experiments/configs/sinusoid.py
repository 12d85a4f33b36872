"""Sinusoid regression, MAML's protocol (Finn et al. 2017): 1-40-40-1 ReLU MLP, one inner step with
alpha = 0.01, meta-batch 25, Adam 1e-3, 70000 meta-iterations, MSE on 600 new tasks.

The default main job runs a short budget (config.meta.steps below); pass --config.meta.steps=70000
for the published protocol. Method: mirror descent (``--config.method=maml`` etc. to switch).
"""
from md_meta.config import base_config


def get_config():
    c = base_config()
    c.method = 'md'
    c.task.name = 'sinusoid'
    c.task.shots = 10
    c.task.query = 10
    c.model.name = 'mlp'
    c.model.hidden = (40, 40)
    c.inner.steps = 1
    c.inner.step_size = 0.01
    c.meta.optimizer = 'adam'
    c.meta.lr = 1e-3
    c.meta.batch_size = 25
    c.meta.steps = 5000
    c.eval.num_tasks = 600
    c.eval.batch_size = 600
    c.train.log_every = 500
    return c
