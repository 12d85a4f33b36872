"""The entry point python -m experiments.train: invalid configs refused before compiling, a run end to end."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest


def run_cli(args, root, timeout=300):
    env = dict(os.environ, PYTHONPATH=root)
    return subprocess.run([sys.executable, '-m', 'experiments.train', *args], cwd=root, env=env,
                          capture_output=True, text=True, timeout=timeout)


FOLDER_CNN4 = ('--config.task.name=folder', '--config.model.name=cnn4', '--config.task.data_dir=/nonexistent')


@pytest.mark.parametrize('flags,field', [
    (('--config.method=nope',), 'config.method'),
    (('--config.task.shots=0',), 'config.task.shots'),
    (('--config.inner.steps=-1',), 'config.inner.steps'),
    (('--config.inner.step_size=-0.1',), 'config.inner.step_size'),
    (('--config.model.features=0',), 'config.model.features'),   # was a JAX traceback from the network
    (FOLDER_CNN4 + ('--config.task.image_size=8',), 'config.task.image_size'),   # was a ZeroDivisionError
])
def test_cli_rejects_invalid_config_before_compiling(flags, field, root, tmp_path):
    r = run_cli([*flags, f'--workdir={tmp_path}/w'], root, timeout=120)
    assert r.returncode == 2, r.stderr
    err = [l for l in r.stderr.splitlines() if l.startswith('error:')]
    assert len(err) == 1 and field in err[0], r.stderr
    assert not os.path.exists(os.path.join(tmp_path, 'w', 'metrics.jsonl'))


def test_cli_runs_end_to_end(root, tmp_path):
    wd = str(tmp_path / 'run')
    r = run_cli(['--config.meta.steps=30', '--config.train.log_every=10', '--config.train.steps_per_call=10', '--config.eval.num_tasks=50',
                 '--config.eval.batch_size=50', f'--workdir={wd}'], root)
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'ETA' in r.stdout and '| md | 10 | loss |' in r.stdout
    res = json.load(open(os.path.join(wd, 'results.json')))['results'][0]
    assert res['shots'] == 10 and res['metrics']['loss']['n'] == 50 and np.isfinite(res['metrics']['loss']['mean'])
    assert os.path.exists(os.path.join(wd, 'config.json'))
