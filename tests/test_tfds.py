"""The TFDS route (config.task.source='tfds', the [tfds] extra): tensorflow-datasets' omniglot builder,
pointed at a local HTTP server, prepares the data and md-meta reads the same minimal characters as from
the zips. Skips where TensorFlow (which that builder needs) is not installed."""
import functools
import http.server
import io
import os
import shutil
import threading
import zipfile

import numpy as np
import pytest

from conftest import OMNIGLOT_DIR

SMALL = ('images_background_small1.zip', 'images_background_small2.zip')


def fake_set(path, name, alphabets=2, characters=2):
    """A zip in Omniglot's layout with 20 drawings (random 105x105 one-bit PNGs) per character."""
    from PIL import Image
    rng = np.random.default_rng(len(name))
    with zipfile.ZipFile(path, 'w') as z:
        for a in range(alphabets):
            for c in range(characters):
                for d in range(20):
                    im = Image.fromarray(rng.random((105, 105)) > 0.1).convert('1')
                    buf = io.BytesIO()
                    im.save(buf, 'PNG')
                    z.writestr(f'{name}/{name[7:]}_alphabet{a}/character{c + 1:02d}/{100 * a + c + 1:04d}_{d + 1:02d}.png',
                               buf.getvalue())


def test_tfds_omniglot_route_matches_the_zips(tmp_path, monkeypatch):
    pytest.importorskip('tensorflow', reason="the [tfds] extra is not installed: tensorflow-datasets' omniglot "
                                             'builder needs TensorFlow (pip install -e ".[tfds]")')
    if not all(os.path.exists(os.path.join(OMNIGLOT_DIR, f)) for f in SMALL):
        pytest.skip(f'the minimal Omniglot zips are not in {OMNIGLOT_DIR}')
    import tensorflow_datasets.image_classification.omniglot as tfds_omniglot
    from md_meta.data import omniglot
    served = tmp_path / 'served'
    served.mkdir()
    for f in SMALL:
        shutil.copy(os.path.join(OMNIGLOT_DIR, f), served / f)
    fake_set(served / 'images_background.zip', 'images_background')
    fake_set(served / 'images_evaluation.zip', 'images_evaluation')
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a: None
    httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f'http://127.0.0.1:{httpd.server_address[1]}/'
        monkeypatch.setattr(tfds_omniglot, '_DL_URLS', {
            'train': url + 'images_background.zip', 'eval': url + 'images_evaluation.zip',
            'small1': url + SMALL[0], 'small2': url + SMALL[1]})
        images, names = omniglot.load_characters_tfds('minimal', 28, download=True, data_dir=str(tmp_path / 'tfds'))
    finally:
        httpd.shutdown()
    ref_images, ref_names = omniglot.load_characters_local(OMNIGLOT_DIR, 'minimal', 28)
    assert names == ref_names and images.shape == ref_images.shape == (242, 20, 28, 28)
    # the same drawings in the same order (tfds lists files in directory order: compare as sets per character)
    for c in range(0, 242, 11):
        a = sorted(x.tobytes() for x in images[c])
        b = sorted(x.tobytes() for x in ref_images[c])
        assert a == b, names[c]
