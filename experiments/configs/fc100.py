"""FC100 5-way few-shot (Oreshkin et al., NeurIPS 2018: CIFAR-100 split by superclass, 12/4/4 superclasses =
60/20/20 fine classes, so meta-test classes share no superclass with meta-train ones; 32x32x3), from the
official CIFAR-100 python archive in $CIFAR100_DIR (default ~/data/cifar100; md_meta.data.cifar100).

The protocol and the argument of experiments/configs/cifar_fs.py: ``fc100.py:5`` (5-shot),
``fc100.py:1,resnet12`` (ResNet-12, the network of the FC100 paper's results).
"""
import os
import runpy

# the config this one builds on, read by path (configs/__init__.py says why)
cifar_fs = runpy.run_path(os.path.join(os.path.dirname(__file__), 'cifar_fs.py'))


def get_config(arg='1'):
    return cifar_fs['make']('fc100', arg)
