"""notebooks/explore.ipynb executes top to bottom on CPU in under a minute (so it never rots).

The minute is checked on the kernel's own CPU time (its last cell prints it), which other processes on a
shared machine do not inflate; the wall-clock limit is looser (MD_META_NOTEBOOK_WALL_S, default 240 s)."""
import re
import os
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_explore_notebook_runs(tmp_path):
    nbformat = pytest.importorskip('nbformat')
    nbclient = pytest.importorskip('nbclient')
    nb = nbformat.read(os.path.join(ROOT, 'notebooks', 'explore.ipynb'), as_version=4)
    env_before = os.environ.get('PYTHONPATH')
    os.environ['PYTHONPATH'] = ROOT + (os.pathsep + env_before if env_before else '')
    os.environ.setdefault('JAX_PLATFORMS', 'cpu')
    try:
        t0 = time.time()
        client = nbclient.NotebookClient(nb, timeout=120, kernel_name='python3',
                                         resources={'metadata': {'path': ROOT}})
        client.execute()
        elapsed = time.time() - t0
    finally:
        if env_before is None:
            os.environ.pop('PYTHONPATH', None)
        else:
            os.environ['PYTHONPATH'] = env_before
    outputs = [o for c in nb.cells if c.cell_type == 'code' for o in c.get('outputs', [])]
    assert not [o for o in outputs if o.get('output_type') == 'error']
    assert any('image/png' in o.get('data', {}) for o in outputs), 'no plot was produced'
    text = ''.join(o.get('text', '') for o in outputs if o.get('output_type') == 'stream')
    cpu = float(re.search(r'kernel CPU time: ([0-9.]+) s', text).group(1))
    assert cpu < 60, f'the notebook used {cpu:.0f} s of CPU time (wall {elapsed:.0f} s)'
    assert elapsed < float(os.environ.get('MD_META_NOTEBOOK_WALL_S', 240)), f'wall time {elapsed:.0f} s'
