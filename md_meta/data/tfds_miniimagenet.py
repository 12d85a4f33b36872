"""miniImageNet as a TensorFlow Datasets dataset ('md_meta_mini_imagenet') built from a manual directory
holding either layout of md_meta.data.miniimagenet.

    import md_meta.data.tfds_miniimagenet as mi
    builder = mi.MdMetaMiniImagenet(data_dir='~/tensorflow_datasets', file_format='array_record',
                                    config=None)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=DIR))
    ds = builder.as_data_source('train')      # random access, no TensorFlow needed

Features: image (84, 84, 3) uint8, label (the class name, e.g. a wnid), label_index (int, per split).
Building without TensorFlow works in the array_record file format (``file_format='array_record'``),
given the pure-Python ``importlib_resources`` package (tfds imports it lazily to find the builder's
code) and images handed to tfds as PIL images (tfds encodes numpy arrays with tf.image.encode_png, PIL
images with PIL); reading back with ``as_data_source`` decodes with PIL (or OpenCV). The default
tfrecord format and ``tfds.load``/``as_dataset`` (tf.data) need TensorFlow.
"""
from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

from md_meta.data import miniimagenet


class MdMetaMiniImagenet(tfds.core.GeneratorBasedBuilder):
    """miniImageNet (Vinyals et al. 2016) with Ravi and Larochelle's 64/16/20 class split."""

    VERSION = tfds.core.Version('1.0.0')
    RELEASE_NOTES = {'1.0.0': 'From a manual directory in either layout (CSV + images/, or pickle caches).'}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        'Put miniImageNet in the manual directory (tfds.download.DownloadConfig(manual_dir=...)) as either\n'
        '  (a) images/ + train.csv, val.csv, test.csv ("filename,label", Ravi and Larochelle\'s split), or\n'
        '  (b) mini-imagenet-cache-train.pkl, mini-imagenet-cache-val.pkl, mini-imagenet-cache-test.pkl\n'
        '      (a pickled dict: image_data uint8 (N, 84, 84, 3), class_dict name -> row indices).\n'
        + miniimagenet.WHERE_TO_GET)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                'image': tfds.features.Image(shape=(84, 84, 3)),
                'label': tfds.features.Text(),
                'label_index': np.int64,
            }),
            supervised_keys=('image', 'label_index'),
            homepage='https://github.com/twitter/meta-learning-lstm',
        )

    def _split_generators(self, dl_manager):
        root = str(dl_manager.manual_dir)
        miniimagenet.detect_layout(root)  # DataError naming the folder and both layouts
        return {s: self._generate_examples(root, s) for s in miniimagenet.SPLITS}

    def _generate_examples(self, root, split):
        layout = miniimagenet.detect_layout(root)
        load = miniimagenet.load_split_pickle if layout == 'pickle' else miniimagenet.load_split_csv
        from PIL import Image
        pool = load(root, split)
        for c, name in enumerate(pool.names):
            for j, image in enumerate(pool.class_images(c)):
                # a PIL image, not an array: tfds encodes PIL images to PNG without TensorFlow
                yield f'{name}_{j}', {'image': Image.fromarray(image), 'label': name, 'label_index': c}
