"""md-meta's MD, MetaCurvature and Meta-SGD agree with the authors' PyTorch code (experiments/crosscheck_reference.py).

Runs where a checkout of github.com/zhangyilang/MetaMirrorDescent is named by MD_META_REFERENCE_DIR and a
Python with torch and torchmeta by MD_META_REFERENCE_PYTHON (default: this one); skips otherwise (neither is
an md-meta dependency). The set-up is in docs/methods.md, "Cross-check against the authors' code"."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize('steps', [1, 5])   # K = 1 runs without a loop in md-meta (md_meta.inner.adapt)
def test_agrees_with_the_authors_code_in_float64(steps):
    ref = os.environ.get('MD_META_REFERENCE_DIR', '')
    if not ref or not os.path.isfile(os.path.join(ref, 'src', 'meta_mirror_descent.py')):
        pytest.skip('MD_META_REFERENCE_DIR does not name a checkout of the authors\' code')
    python = os.environ.get('MD_META_REFERENCE_PYTHON', sys.executable)
    probe = subprocess.run([python, '-c', 'import torch'], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f'{python} cannot import torch (set MD_META_REFERENCE_PYTHON)')
    out = subprocess.run([python, '-m', 'experiments.crosscheck_reference', f'--reference_dir={ref}',
                          '--dtypes=float64', f'--steps={steps}'], cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0 and 'PASS' in out.stdout, out.stdout[-3000:] + out.stderr[-3000:]
