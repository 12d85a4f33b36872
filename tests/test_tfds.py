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

import pytest

from conftest import OMNIGLOT_DIR

SMALL = ('images_background_small1.zip', 'images_background_small2.zip')


def used_ids():
    """The character ids (file-name prefixes) of the minimal sets."""
    ids = set()
    for f in SMALL:
        for n in zipfile.ZipFile(os.path.join(OMNIGLOT_DIR, f)).namelist():
            if n.endswith('.png'):
                ids.add(int(os.path.basename(n).split('_')[0]))
    return ids


def fake_sets(served):
    """images_background.zip and images_evaluation.zip in Omniglot's layout, holding what tfds' builder
    insists on beside the minimal sets (50 alphabets, 1623 character ids in all): 42 made-up alphabets over
    the 1381 ids the minimal sets do not use, one drawing each (md-meta reads only the minimal sets)."""
    from PIL import Image
    buf = io.BytesIO()
    Image.new('1', (105, 105), 1).save(buf, 'PNG')
    png = buf.getvalue()
    free = sorted(set(range(1, 1624)) - used_ids())
    for s, name in enumerate(('images_background', 'images_evaluation')):
        with zipfile.ZipFile(served / f'{name}.zip', 'w') as z:
            for a in range(21):
                alphabet = 21 * s + a
                for c, ident in enumerate(free[alphabet::42]):
                    z.writestr(f'{name}/Made_up_{alphabet:02d}/character{c + 1:02d}/{ident:04d}_01.png', png)


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
    fake_sets(served)
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
