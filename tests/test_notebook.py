"""notebooks/explore.ipynb executes top to bottom on CPU without an error and draws its plot (so it never
rots). How long it takes is not a test's business: the notebook prints its own CPU time."""
import os

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
        # timeout: a guard against a hung kernel (per cell), not a speed budget
        client = nbclient.NotebookClient(nb, timeout=1800, kernel_name='python3',
                                         resources={'metadata': {'path': ROOT}})
        client.execute()
    finally:
        if env_before is None:
            os.environ.pop('PYTHONPATH', None)
        else:
            os.environ['PYTHONPATH'] = env_before
    outputs = [o for c in nb.cells if c.cell_type == 'code' for o in c.get('outputs', [])]
    assert not [o for o in outputs if o.get('output_type') == 'error']
    assert any('image/png' in o.get('data', {}) for o in outputs), 'no plot was produced'
