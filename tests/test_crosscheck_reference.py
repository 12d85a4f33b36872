"""md-meta's MD, MetaCurvature and Meta-SGD agree with the authors' PyTorch code
(experiments/studies/crosscheck_reference.py).

The comparison's own arithmetic (``rel_error``, ``leaf_errors``) is tested here without torch. The comparison
runs where a checkout of github.com/zhangyilang/MetaMirrorDescent is named by MD_META_REFERENCE_DIR and a
Python with torch and torchmeta by MD_META_REFERENCE_PYTHON (default: this one); skips otherwise (neither is
an md-meta dependency). The set-up is in docs/methods.md, "Cross-check against the authors' code"."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from experiments.studies.crosscheck_reference import (leaf_errors, passes, rel_error, zero_on_both_sides,
                                                      zero_on_one_side)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEEDS = (0, 1, 2)


def _tree(last):
    return {'a': np.ones((2, 3)), 'b': {'kernel': np.full(4, 2.0), 'scale': np.asarray(last, np.float64)}}


@pytest.mark.parametrize('bad', [np.nan, np.inf, -np.inf])
def test_a_nan_or_inf_in_any_leaf_on_either_side_fails(bad):
    good, broken = _tree([1.0, 1.0]), _tree([1.0, bad])  # the bad number in the last leaf, not the first
    assert rel_error(good, good) == 0.0
    for md, ref in ((broken, good), (good, broken), (broken, broken)):
        error = rel_error(md, ref)
        assert not error <= 1e-9 and not passes(error, 1e-9) and not passes(error, math.inf)
        assert leaf_errors(md, ref)["['b']['scale']"]['error'] == math.inf
        assert leaf_errors(md, ref)["['a']"]['error'] == 0.0


def test_errors_are_per_leaf_with_the_scale_floored_and_zero_leaves_flagged():
    md, ref = _tree([0.0, 0.0]), _tree([0.0, 0.0])
    md['a'] = md['a'] + 1e-6
    md['b']['kernel'] = np.asarray([2.0, 2.0, 2.0, 2.0 + 4e-6])
    table = leaf_errors(md, ref)
    assert list(table) == ["['a']", "['b']['kernel']", "['b']['scale']"]
    assert table["['a']"]['error'] == pytest.approx(1e-6)
    assert table["['b']['kernel']"]['error'] == pytest.approx(2e-6)
    assert table["['b']['scale']"] == {'error': 0.0, 'max_abs_md': 0.0, 'max_abs_ref': 0.0}
    assert zero_on_both_sides(table) == ["['b']['scale']"] and zero_on_one_side(table) == []
    assert rel_error(md, ref) == pytest.approx(2e-6)
    md['b']['scale'] = np.asarray([0.0, 1e-5])  # a leaf near 0: its scale is 1e-3 x the largest leaf's (2)
    assert leaf_errors(md, ref)["['b']['scale']"]['error'] == pytest.approx(1e-5 / 2e-3)
    table = leaf_errors(md, ref)
    assert zero_on_both_sides(table) == [] and zero_on_one_side(table) == ["['b']['scale']"]
    with pytest.raises(AssertionError):
        rel_error(md, {'a': ref['a']})


@pytest.mark.parametrize('steps', [1, 5])   # K = 1 runs without a loop in md-meta (md_meta.inner.adapt)
def test_agrees_with_the_authors_code_in_float64(steps, tmp_path):
    ref = os.environ.get('MD_META_REFERENCE_DIR', '')
    if not ref or not os.path.isfile(os.path.join(ref, 'src', 'meta_mirror_descent.py')):
        pytest.skip('MD_META_REFERENCE_DIR does not name a checkout of the authors\' code')
    python = os.environ.get('MD_META_REFERENCE_PYTHON', sys.executable)
    probe = subprocess.run([python, '-c', 'import torch'], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f'{python} cannot import torch (set MD_META_REFERENCE_PYTHON)')
    path = tmp_path / 'crosscheck.json'
    out = subprocess.run([python, '-m', 'experiments.studies.crosscheck_reference', f'--reference_dir={ref}',
                          '--dtypes=float64', f'--steps={steps}', '--seeds=' + ','.join(map(str, SEEDS)),
                          f'--out={path}'], cwd=ROOT, capture_output=True, text=True, timeout=3600)
    assert out.returncode == 0 and 'PASS' in out.stdout, out.stdout[-3000:] + out.stderr[-3000:]
    report = json.loads(path.read_text())
    assert report['pass'] and sorted(report['seeds']) == [str(s) for s in SEEDS]
    assert report['md_meta_commit'] and report['versions']['torch'] and report['versions']['jax']
    folder = os.environ.get('MD_META_CROSSCHECK_OUT', '')  # docs/figures: keeps the figures the docs cite
    if folder:
        name = 'crosscheck_reference.json' if steps == 5 else f'crosscheck_reference_k{steps}.json'
        with open(os.path.join(folder, name), 'w') as f:
            f.write(path.read_text())
    for seed in report['seeds'].values():
        for method in ('md', 'metacurvature', 'metasgd'):
            errors = seed['results'][method]['float64']
            for quantity in ('query_loss', 'phi_K', 'meta_grad_init', 'meta_grad_geom', 'meta_step_loss',
                             'meta_step_grad_init', 'meta_step_grad_geom'):  # the training path is compared too
                assert errors[quantity] <= 1e-9, (method, quantity, errors[quantity])
