"""Lake's one-shot challenge, minimal condition: 20-way 1-shot on the two small background sets split by
alphabet (task.split='minimal_alphabet', fold task.alphabet_fold), scored on runs whose 20 characters come
from one held-out alphabet (experiments.evaluate --lake_runs=DIR [--lake_build=20 --lake_within_alphabet]).

The CPU recipe of docs/omniglot.md ("Lake-style development runs"): CNN4-32, 4 tasks per meta-batch of
20 ways x (1 support + 5 query) images, K = 1 inner step at meta-train and 5 at test, alpha = 0.4, Adam 1e-3,
1000 meta-steps, 200 test tasks. The levers measured against it, one at a time (table in docs/omniglot.md):
--config.task.same_alphabet (episodes within one alphabet, the test condition), --config.task.augment
(affine warps and thicker strokes), --config.meta.steps, --config.model.features; K and alpha at test are
flags of experiments.evaluate (--eval_steps, --eval_step_size).

    python -m experiments.train --config=experiments/configs/lake_minimal.py --config.method=md --workdir=W
    python -m experiments.evaluate --workdir=W --lake_runs=DIR --lake_build=20 --lake_within_alphabet

The defaults are that baseline (MD 28.75%, MAML 31.75% error on fold 0's within-alphabet runs, seed 0; MD there is
the map alone, --config.md.kronecker=none). The best measured: --config.task.same_alphabet=True
--config.task.augment=True --config.meta.steps=3000 --config.method=metacurvature, scored with --eval_steps=10:
12.0 and 13.25% (seeds 0 and 1; docs/omniglot.md, "Every geometry on that recipe"), where MAML and the map-alone
MD stay above 20% at 1500 steps. Lake 2015's full-background ConvNet gives 13.5% on the official runs.
"""
import os
import runpy

# the config this one builds on, read by path (configs/__init__.py says why)
omniglot_minimal = runpy.run_path(os.path.join(os.path.dirname(__file__), 'omniglot_minimal.py'))


def get_config():
    c = omniglot_minimal['get_config']()
    c.task.split = 'minimal_alphabet'
    c.task.alphabet_fold = 0
    c.task.ways = 20
    c.task.query = 5
    c.meta.steps = 1000
    c.eval.num_tasks = 200
    return c
