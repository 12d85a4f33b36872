"""tieredImageNet 5-way 1-shot (Ren et al. 2018: 351/97/160 classes from 20/6/8 high-level ImageNet categories;
84x84x3) with miniImageNet's settings (experiments/configs/miniimagenet.py: CNN4, K = 5, alpha = 0.01, 4 tasks
per meta-batch, the meta-optimizer per method as the paper's authors choose it). The method is the config's
argument: ``--config=experiments/configs/tieredimagenet.py:maml`` (default md).

Data: $TIEREDIMAGENET_DIR (default ~/data/tieredimagenet) holding train/, val/, test/ class folders or
{split}_labels.pkl with {split}_images_png.pkl or {split}_images.npz (md_meta.data.tieredimagenet;
``python -m experiments.download tieredimagenet`` says where to get it).
5-shot: --config.task.shots=5 --config.eval.query=5; ResNet-12: --config.model.name=resnet12.
"""
import os
import runpy

# the config this one builds on, read by path (configs/__init__.py says why)
miniimagenet = runpy.run_path(os.path.join(os.path.dirname(__file__), 'miniimagenet.py'))


def get_config(method='md'):
    c = miniimagenet['get_config'](method)
    c.task.name = 'tieredimagenet'
    c.task.data_dir = os.environ.get('TIEREDIMAGENET_DIR', os.path.expanduser('~/data/tieredimagenet'))
    return c
