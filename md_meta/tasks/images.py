"""Few-shot image classification tasks (Omniglot, mini- and tieredImageNet, CIFAR-FS, FC100, a folder of class folders) as a host
``TaskSource``.

N-way K-shot episodes (config.task.ways / shots; config.task.query query images per class at
meta-train, config.eval.query at meta-val/test) from md_meta.data, class-disjoint splits, sampled on
the host deterministically from (config.seed, split, step) and prefetched on a background thread
(``sample.close()`` stops it). Inputs are float32 NHWC in [0, 1]; labels int32, permuted per task.
Every data problem raises md_meta.data.DataError here, before any training starts.
"""
from __future__ import annotations

import numpy as np

from md_meta.data import DataError
from md_meta.data.episodes import EpisodeSampler, Prefetcher, split_record

PREFETCH_DEPTH = 2


def load_pools(config):
    t = config.task
    if t.name == 'omniglot':
        from md_meta.data import omniglot
        return omniglot.load_splits(t.data_dir, t.split, t.source, alphabet_fold=t.alphabet_fold)
    if t.name == 'miniimagenet':
        from md_meta.data import miniimagenet
        return miniimagenet.load_splits(t.data_dir)
    if t.name == 'tieredimagenet':
        from md_meta.data import tieredimagenet
        return tieredimagenet.load_splits(t.data_dir)
    if t.name in ('cifar_fs', 'fc100'):
        from md_meta.data import cifar100
        return cifar100.load_splits(t.data_dir, t.name)
    if t.name == 'folder':
        from md_meta.data import folder
        return folder.load_splits(t.data_dir, t.image_size, t.channels)
    raise DataError(f'config.task.name: not an image task: {t.name!r}')


def make_source(config, pools=None, prefetch: int = PREFETCH_DEPTH):
    from md_meta.tasks import TaskSource
    t = config.task
    pools = pools if pools is not None else load_pools(config)
    sampler = EpisodeSampler(pools, t.ways, t.shots, config.seed, same_alphabet=t.same_alphabet, augment=t.augment)
    eval_query = config.eval.query if config.eval.query > 0 else t.query
    hint = f'(config.task.data_dir={t.data_dir!r})'
    sampler.check('train', t.query, hint)
    for split in ('val', 'test'):
        sampler.check(split, eval_query, hint)
    field = f'config.eval.shots={tuple(config.eval.shots)}'
    for shots in config.eval.shots:   # evaluated after training (a source rebuilt with them): refused now, not then
        for split, query in (('train', t.query), ('val', eval_query), ('test', eval_query)):
            sampler.check(split, query, hint, shots=shots, shots_field=field)
    sample = Prefetcher(sampler.sample, prefetch)
    shape = pools['train'].images.shape[1:]
    example_x = np.zeros((t.ways * t.shots,) + shape, np.float32)
    record = lambda: dict(split_record(pools), data_dir=t.data_dir)   # computed when a workdir asks for it
    return TaskSource(t.name, 'xent', example_x, sample, None, t.ways, record)
