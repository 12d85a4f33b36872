"""Omniglot 5-way 1-shot on the two "minimal" background sets (../shared/data/omniglot: the union of
images_background_small1/2 counted once, 242 characters, split by character with a fixed seed into
162 meta-train (x4 with rotations), 40 meta-val and 40 held-out meta-test characters from which
Omniglot one-shot challenge runs can be built: md_meta.data.lake.build_runs).

A CPU budget: CNN4 with 32 channels, 4 tasks per meta-batch, 15 query images per class at meta-train,
query = shots at meta-val/test, K = 1 inner step at meta-train (5 at evaluation time is
--config.inner.eval_steps=5), alpha = 0.4 (MAML's Omniglot step size: with one step, alpha = 0.01 barely
moves), Adam 1e-3, 1500 meta-steps. The paper's protocol (K = 5, alpha = 0.01, 64 channels, 60000
steps) is experiments/configs/omniglot.py. Any method: --config.method=maml|md|...
"""
import os
import runpy

# the config this one builds on, read by path (configs/__init__.py says why)
omniglot = runpy.run_path(os.path.join(os.path.dirname(__file__), 'omniglot.py'))


def get_config():
    c = omniglot['get_config']()
    here = os.path.dirname(os.path.abspath(__file__))
    c.task.data_dir = os.environ.get('OMNIGLOT_DIR', os.path.normpath(
        os.path.join(here, '..', '..', '..', 'shared', 'data', 'omniglot')))
    c.task.split = 'minimal'
    c.task.source = 'zip'
    c.model.features = 32
    c.inner.steps = 1
    c.inner.eval_steps = 5
    c.inner.step_size = 0.4
    c.meta.steps = 1500
    c.eval.num_tasks = 600
    c.eval.batch_size = 100
    c.train.log_every = 100
    c.train.eval_every = 500
    c.train.checkpoint_every = 500
    c.train.val_tasks = 200
    return c
