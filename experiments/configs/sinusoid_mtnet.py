"""Sinusoid regression with the settings of MT-net's released sinusoid script (Lee & Choi 2018), whose
table is the source of the MAML figures usually quoted (0.686 / 0.435 / 0.228 at 5 / 10 / 20 shots):
meta-batch 4 tasks, 60000 meta-iterations, one inner step alpha = 0.01, Adam 1e-3, 10 query points,
meta-trained 10-shot and evaluated at 5, 10 and 20 shots on 600 new tasks (docs/sinusoid.md).

MT-net's data generator also draws a frequency w ~ U[0.8, 1.2] (Meta-SGD's family); add
``--config.task.frequency='(0.8,1.2)'`` for that family. docs/sinusoid.md compares both.
"""
import os
import runpy

# the config this one builds on, read by path (configs/__init__.py says why)
sinusoid = runpy.run_path(os.path.join(os.path.dirname(__file__), 'sinusoid.py'))


def get_config():
    c = sinusoid['get_config']()
    c.method = 'maml'
    c.task.shots = 10
    c.task.query = 10
    c.meta.batch_size = 4
    c.meta.steps = 60000
    c.eval.shots = (5, 10, 20)
    c.train.steps_per_call = 500
    c.train.log_every = 5000
    return c
