"""The trainer and its workdir (md_meta.training, md_meta.workdirs, md_meta.checkpoint), the experiment it
trains (md_meta.experiment), its evaluation (md_meta.evaluation) and the entry points around it: resumable
training (kill -9 and rerun, bitwise), checkpoints without NaN and with checksums, the non-finite counter and
stop, evaluation against a hand computation and its confidence interval, refusing a workdir of another config
or a second process (one claim per run), one-line errors, reports of stale results."""
import glob
import json
import os
import random
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments.harness import compilation_cache_dir
from md_meta import checkpoint as checkpoint_lib
from md_meta import evaluation, experiment, methods, training, workdirs
from md_meta.config import ConfigError
from tests.helpers import nan_build, random_like, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# a tiny sinusoid run for the CLI (the default config file is experiments/configs/sinusoid.py)
TINY_FLAGS = ['--config.method=maml', '--config.task.shots=4', '--config.task.query=4',
              '--config.model.hidden=(8,8)', '--config.meta.batch_size=3', '--config.meta.steps=300',
              '--config.eval.num_tasks=20', '--config.eval.batch_size=10', '--config.train.log_every=5',
              '--config.train.steps_per_call=5', '--config.train.checkpoint_every=50',
              '--config.train.eval_every=50', '--config.train.val_tasks=10', '--config.train.keep=2']


def _cli_cmd(workdir, extra=()):
    return [sys.executable, '-m', 'experiments.train', *TINY_FLAGS, *extra, f'--workdir={workdir}']


def _env():
    return dict(os.environ, PYTHONUNBUFFERED='1', JAX_PLATFORMS='cpu')


def _leaves_equal(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


def _last_state(workdir):
    exp = experiment.build(workdirs.load_config(workdir))
    meta, opt = experiment.init_state(exp)
    step, state, record = checkpoint_lib.Checkpointer(workdir).restore_latest({'meta': meta, 'opt_state': opt})
    return step, state, record


def test_kill_9_and_rerun_resumes_bitwise(tmp_path):
    ref, run = str(tmp_path / 'ref'), str(tmp_path / 'run')
    # the uninterrupted reference runs alongside
    ref_p = subprocess.Popen(_cli_cmd(ref), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    target = random.Random(os.getpid()).randint(60, 200)   # after the first checkpoint (step 50)
    p = subprocess.Popen(_cli_cmd(run), cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, text=True)
    seen = -1
    for line in p.stdout:
        if line.startswith('[maml] step '):
            seen = int(line.split()[2].split('/')[0])
            if seen >= target:
                p.send_signal(signal.SIGKILL)
                break
    p.wait(timeout=60)
    assert p.returncode == -signal.SIGKILL, f'the run ended before the kill at step {target} (last seen {seen})'
    assert not os.path.exists(os.path.join(run, 'results.json'))
    assert checkpoint_lib.Checkpointer(run).steps(), 'no checkpoint before the kill'

    r2 = subprocess.run(_cli_cmd(run), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert r2.returncode == 0, r2.stderr[-2000:]
    assert 'resuming from' in r2.stdout, r2.stdout[-2000:]
    _, ref_err = ref_p.communicate(timeout=300)
    assert ref_p.returncode == 0, ref_err[-2000:]
    s1, a, _ = _last_state(ref)
    s2, b, _ = _last_state(run)
    assert s1 == s2 == 300
    assert _leaves_equal(a['meta'], b['meta']), 'resumed meta-parameters differ from the uninterrupted run'
    assert _leaves_equal(a['opt_state'], b['opt_state'])
    # the JSON-lines log holds each step once after the resume
    steps = [json.loads(l)['step'] for l in open(os.path.join(run, 'metrics.jsonl')) if 'meta_loss' in l]
    assert steps == list(range(5, 301, 5))
    assert glob.glob(os.path.join(run, 'tb', 'events.out.tfevents.*'))
    # keep=2 last + best
    assert 2 <= len(checkpoint_lib.Checkpointer(run).steps()) <= 3


def test_checkpoint_during_nan_updates_holds_no_nan_and_counts(tmp_path):
    wd = str(tmp_path / 'w')
    # updates at steps 9..12 (0-based 8..11) are non-finite; a checkpoint lands at step 10 in the middle
    c = tiny_config('maml', **{'meta.steps': 20, 'train.checkpoint_every': 10, 'train.eval_every': 10,
                               'train.val_tasks': 10, 'train.max_nonfinite': 10})
    workdirs.prepare(c, wd)
    exp = nan_build(c, 8, 4)
    _, _, hist = training.train(exp, wd, log=lambda s: None)
    ck = checkpoint_lib.Checkpointer(wd)
    meta, opt = experiment.init_state(exp)
    state, record = ck.restore(10, {'meta': meta, 'opt_state': opt})
    assert checkpoint_lib.all_finite(state)
    assert record['consecutive_nonfinite'] == 2 and record['skipped_total'] == 2
    assert hist[-1]['skipped_total'] == 4
    # the skipped updates left the parameters at step 8's: same as a clean 8-step run
    c8 = tiny_config('maml', **{'meta.steps': 8})
    meta8, _, _ = training.train(nan_build(c8, 0, 0), None, log=lambda s: None)
    assert _leaves_equal(state['meta'], meta8)
    # the writer itself refuses NaN
    bad = jax.tree_util.tree_map(lambda x: x * jnp.nan, meta)
    with pytest.raises(checkpoint_lib.NonFiniteCheckpointError):
        ck.save(30, {'meta': bad, 'opt_state': opt}, {})
    assert 30 not in ck.steps()


def test_consecutive_nonfinite_stop_names_step_and_method(tmp_path):
    c = tiny_config('maml', **{'meta.steps': 20, 'train.max_nonfinite': 4, 'train.checkpoint_every': 5})
    wd = str(tmp_path / 'w')
    workdirs.prepare(c, wd)
    with pytest.raises(training.NonFiniteError, match=r'method maml: 4 consecutive .* up to step 7'):
        training.train(nan_build(c, 3, 100), wd, log=lambda s: None)
    stopped = json.load(open(os.path.join(wd, training.STOPPED)))   # the stop, recorded in the workdir
    assert stopped['step'] == 7 and stopped['reason'] == 'non-finite meta-updates'
    # the checkpoint at step 5 was written mid-streak and is finite
    step, state, record = _last_state(wd)
    assert step == 5 and checkpoint_lib.all_finite(state) and record['consecutive_nonfinite'] == 2
    training.train(nan_build(c, 0, 0), wd, log=lambda s: None)   # started again (and finished): no stale record
    assert not os.path.exists(os.path.join(wd, training.STOPPED))


def test_evaluate_ci_matches_hand_computation(tmp_path):
    from experiments.evaluate import evaluate_workdir
    # a fixed fake model: all-zero MLP (predicts 0) and no adaptation (alpha = 0): per-task loss = mean y_q^2
    c = tiny_config('maml', **{'inner.step_size': 0.0})
    wd = str(tmp_path / 'w')
    workdirs.prepare(c, wd)
    exp = experiment.build(c)
    meta, opt = experiment.init_state(exp)
    zero = jax.tree_util.tree_map(jnp.zeros_like, meta)
    checkpoint_lib.Checkpointer(wd).save(10, {'meta': zero, 'opt_state': opt}, {})
    n = 30
    r = evaluate_workdir(wd, num_tasks=n, which='last', log=lambda s: None)
    # the evaluation's fixed test tasks: sample(10_000_000 + i, batch, 'test', query), batch = eval.batch_size
    bs = c.eval.batch_size
    ys = [np.asarray(exp.source.sample(10_000_000 + i, bs, 'test', c.task.query).query_y) for i in range(-(-n // bs))]
    per_task = np.concatenate(ys)[:n].reshape(n, -1).astype(np.float64)
    per_task = (per_task ** 2).mean(1)
    mean = per_task.sum() / n
    ci = 1.96 * np.sqrt(((per_task - mean) ** 2).sum() / n) / np.sqrt(n)
    got = json.load(open(os.path.join(wd, 'evaluation.json')))
    assert got == json.loads(json.dumps(r))
    assert got['metrics']['loss']['n'] == n and got['step'] == 10
    np.testing.assert_allclose(got['metrics']['loss']['mean'], mean, rtol=1e-5)
    np.testing.assert_allclose(got['metrics']['loss']['ci'], ci, rtol=1e-4)
    # the inner loop at test may differ from training's (K, alpha), and is recorded
    moved = evaluate_workdir(wd, num_tasks=n, which='last', log=lambda s: None,
                             overrides={'inner.eval_steps': 3, 'inner.step_size': 0.1})
    assert moved['eval_inner_steps'] == 3 and moved['eval_step_size'] == 0.1 and r['eval_step_size'] == 0.0
    assert abs(moved['metrics']['loss']['mean'] - mean) > 1e-3, 'alpha > 0 at test adapts the zero model'
    with pytest.raises(ValueError, match=r'meta.lr: not a field evaluation may override'):
        evaluation.load_run(wd, 'last', overrides={'meta.lr': 0.1})


@pytest.mark.parametrize('method,extra', [('metasgd', {}), ('ecml', {'ecml.preconditioner': 'metasgd'})])
def test_alpha_at_test_is_refused_where_step_sizes_are_learned(tmp_path, method, extra):
    """Meta-SGD's exp(w) (and ECML's with that preconditioner) do not depend on inner.step_size once
    trained, so an override would be recorded but change nothing: load_run refuses it in one line."""
    wd = str(tmp_path / method)
    workdirs.prepare(tiny_config(method, **extra), wd)
    with pytest.raises(ConfigError, match=rf'inner.step_size: {method} learns its inner step sizes'):
        evaluation.load_run(wd, 'last', overrides={'inner.step_size': 0.1})
    assert not methods.learns_step_sizes(tiny_config('ecml'))


def test_workdir_of_another_config_is_refused(tmp_path):
    from experiments.configs.sinusoid import get_config
    wd = str(tmp_path / 'w')
    c = get_config()
    workdirs.prepare(c, wd)
    before = open(os.path.join(wd, 'config.json')).read()
    r = subprocess.run([sys.executable, '-m', 'experiments.train', '--config.method=maml', f'--workdir={wd}'],
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    err = [l for l in r.stderr.splitlines() if l.startswith('error:')]
    assert len(err) == 1 and 'method' in err[0] and 'refusing' in err[0], r.stderr[-2000:]
    assert open(os.path.join(wd, 'config.json')).read() == before
    assert not os.path.exists(os.path.join(wd, 'metrics.jsonl'))
    # other shapes are refused too; fields that do not change the computation are not
    c2 = get_config()
    c2.model.hidden = (40, 20)
    with pytest.raises(workdirs.WorkdirMismatchError, match='model.hidden'):
        workdirs.prepare(c2, wd)
    c3 = get_config()
    c3.meta.steps, c3.eval.num_tasks, c3.train.log_every = 9000, 100, 10
    c3.md.group_cost_max = 3.0   # how g's products are grouped: the same map, so the same run
    workdirs.prepare(c3, wd)


def test_a_workdir_written_with_retired_values_still_loads_and_resumes(tmp_path):
    """config.json of an earlier schema (inner.unroll=-1, the automatic unroll that always meant 1;
    meta.task_batching='unroll') reads as today's equivalent, validates, and is the same run as today's config."""
    from experiments.configs.sinusoid import get_config
    wd = tmp_path / 'w'
    wd.mkdir()
    old = json.loads(get_config().to_json())
    old['inner']['unroll'], old['meta']['task_batching'] = -1, 'unroll'
    (wd / 'config.json').write_text(json.dumps(old))
    stored = workdirs.load_config(str(wd))
    assert (stored.inner.unroll, stored.meta.task_batching) == (1, 'vmap')
    from md_meta import config as config_lib
    config_lib.validate(stored)
    workdirs.prepare(get_config(), str(wd))   # no mismatch: the same computation


def test_a_workdir_made_before_the_kronecker_default_stays_the_map_alone(tmp_path):
    """An MD run made before md.kronecker / md.start / md.activation existed computed the map alone with a dual start
    and ReLU codes: it reads back as that run (not today's default), and today's command without the override is
    refused on it in one line naming md.kronecker."""
    from experiments.configs.sinusoid import get_config
    wd = tmp_path / 'w'
    wd.mkdir()
    old = json.loads(get_config().to_json())
    for field in ('kronecker', 'start', 'activation'):
        del old['md'][field]
    (wd / 'config.json').write_text(json.dumps(old))
    stored = workdirs.load_config(str(wd))
    assert (stored.md.kronecker, stored.md.start, stored.md.activation) == ('none', 'dual', 'relu')
    assert get_config().md.kronecker == 'dual_step'
    with pytest.raises(workdirs.WorkdirMismatchError, match='md.kronecker'):
        workdirs.prepare(get_config(), str(wd))
    same = get_config()
    same.md.kronecker = 'none'
    workdirs.prepare(same, str(wd))


def _run_with_checkpoints_at_10_and_20(tmp_path):
    """A 20-step MAML run checkpointed at steps 10 and 20: (workdir, its overrides, config, Checkpointer)."""
    wd = str(tmp_path / 'w')
    over = {'meta.steps': 20, 'train.checkpoint_every': 10, 'train.eval_every': 0}
    c = tiny_config('maml', **over)
    workdirs.prepare(c, wd)
    training.train(experiment.build(c), wd, log=lambda s: None)
    return wd, over, c, checkpoint_lib.Checkpointer(wd)


def test_truncated_checkpoint_is_reported_and_previous_used(tmp_path):
    wd, over, c, ck = _run_with_checkpoints_at_10_and_20(tmp_path)
    assert ck.steps() == [10, 20]
    bad = ck.path(20)
    for f in glob.glob(os.path.join(bad, 'state', '**', 'd', '*'), recursive=True):
        with open(f, 'r+b') as fh:
            fh.truncate(os.path.getsize(f) // 2)
    # continue to step 30 (meta.steps may change on a rerun): resumes from step 10, not 20
    c30 = tiny_config('maml', **dict(over, **{'meta.steps': 30}))
    workdirs.prepare(c30, wd)
    logs = []
    meta, _, _ = training.train(experiment.build(c30), wd, log=logs.append)
    warn = [l for l in logs if l.startswith('warning:')]
    assert len(warn) == 1 and bad in warn[0] and 'truncated' in warn[0], logs
    assert any(l.startswith('resuming from') and l.rstrip().endswith('(step 10/30)') or
               ('ckpt_000000010' in l and l.startswith('resuming')) for l in logs), logs
    assert os.path.isdir(bad + '.corrupt')
    ref, _, _ = training.train(experiment.build(c30), None, log=lambda s: None)
    assert _leaves_equal(meta, ref)



def test_checkpoint_of_another_parameter_layout_is_refused_and_kept(tmp_path):
    """A model whose meta-parameters have other paths or shapes than the stored ones (another md-meta version
    wrote the run): one error naming the checkpoint, and no checkpoint is set aside as corrupt."""
    wd, over, c, ck = _run_with_checkpoints_at_10_and_20(tmp_path)
    meta, opt_state = experiment.init_state(experiment.build(c))
    other_paths = dict(meta, extra=np.zeros(3, np.float32))
    leaf_path, leaf = jax.tree_util.tree_flatten_with_path(meta)[0][0]
    other_shape = jax.tree_util.tree_map_with_path(
        lambda p, x: np.zeros(np.shape(x) + (2,), np.float32) if p == leaf_path else x, meta)
    for template in (other_paths, other_shape):
        with pytest.raises(checkpoint_lib.CheckpointLayoutError, match=r'ckpt_000000020 was written with another '
                           r'parameter layout .* another --workdir'):
            ck.restore_latest({'meta': template, 'opt_state': opt_state})
    # an optimizer state of another layout (leaf by leaf, as md-meta kept it before it raveled theta for the optimizer)
    with pytest.raises(checkpoint_lib.CheckpointLayoutError, match=r'ckpt_000000020 .*\(an optimizer state of \d+ '
                       r'arrays where the model\'s has \d+'):
        ck.restore_latest({'meta': meta, 'opt_state': optax.adam(1e-3).init(meta)})
    assert ck.steps() == [10, 20] and not glob.glob(os.path.join(wd, 'checkpoints', '*.corrupt'))
    assert ck.restore_latest({'meta': meta, 'opt_state': opt_state})[0] == 20

def _fake_run(root, name, method, acc, steps=100, planned=100, finished=True, commit=None):
    wd = os.path.join(root, name)
    os.makedirs(wd)
    with open(os.path.join(wd, 'config.json'), 'w') as f:
        json.dump({'method': method, 'meta': {'steps': planned}}, f)
    with open(os.path.join(wd, 'metrics.jsonl'), 'w') as f:
        for s in range(50, steps + 1, 50):
            f.write(json.dumps({'step': s, 'val/accuracy': acc * s / steps}) + '\n')
        f.write('{"step": 1')  # a line cut by a kill
    if finished:
        res = {'method': method, 'results': [{'shots': 1, 'num_tasks': 10, 'curves': {
            'loss': [2.0, 1.0, 0.5], 'grad_norm': [3.0, 2.0, 1.0]},
            'metrics': {'accuracy': {'mean': acc, 'ci': 0.01, 'n': 10}}}]}
        if commit:
            res['git_commit'] = commit
        with open(os.path.join(wd, 'results.json'), 'w') as f:
            json.dump(res, f)


def test_summarise_runs_table_interval_and_unfinished(tmp_path):
    """Mean over seeds +- t_{0.975,2} s / sqrt(3); an unfinished run is named and left out; runs whose
    results.json records another commit than --commit are named with it."""
    root = tmp_path / 'grid'
    for seed, acc in enumerate((0.90, 0.92, 0.97)):
        _fake_run(str(root), f'maml-1shot-seed{seed}', 'maml', acc)
    _fake_run(str(root), 'md-paper-1shot-seed0', 'md', 0.95, commit='abcdef0123456789')
    _fake_run(str(root), 'md-paper-1shot-seed1', 'md', 0.5, steps=50, finished=False)
    _fake_run(str(root), 'md-paper-1shot-seed2', 'md', 0.5, steps=50, finished=False)
    (root / 'md-paper-1shot-seed2' / 'stopped.json').write_text(
        json.dumps({'reason': 'non-finite meta-updates', 'step': 61, 'message': '...'}))
    out = tmp_path / 'fig' / 'table'
    r = subprocess.run([sys.executable, '-m', 'experiments.studies.summarise_runs', f'--root={root}', f'--out={out}',
                        '--variants=md-paper,maml', '--commit=5b6e9f9'], capture_output=True, text=True, cwd=ROOT, env=_env())
    assert r.returncode == 0, r.stderr
    data = json.load(open(str(out) + '.json'))
    rows = {row['variant']: row for row in data['rows']}
    v = np.array([0.90, 0.92, 0.97])
    assert rows['maml']['mean'] == pytest.approx(v.mean())
    assert rows['maml']['ci'] == pytest.approx(4.303 * v.std(ddof=1) / np.sqrt(3))
    assert rows['md-paper']['per_seed'] == [0.95] and rows['md-paper']['ci'] is None
    assert data['unfinished'] == [['md-paper-1shot-seed1', 50, 100, ''], ['md-paper-1shot-seed2', 61, 100,
                                                                         'stopped: non-finite meta-updates']]
    text = open(str(out) + '.md').read()
    assert text.index('| md-paper |') < text.index('| maml |') and 'md-paper-1shot-seed1 at step 50/100,' in text
    assert 'md-paper-1shot-seed2 at step 61/100 (stopped: non-finite meta-updates)' in text
    assert '93.00 +- ' in text and 'runs from commit 5b6e9f9 (md-paper: abcdef0).' in text
    conv = open(str(out) + '_convergence.csv').read().splitlines()
    assert conv[0] == 'variant,shots,k,support_loss,grad_norm,seeds' and len(conv) == 1 + 2 * 3


def _finished_maml_ablation_runs(wd):
    """Three finished MAML runs of the ablation (seeds 0-2, 5-shot, 70000 steps; MSE 0.50, 0.55, 0.60) in ``wd``."""
    for seed, mse in enumerate((0.50, 0.55, 0.60)):
        os.makedirs(wd / f'maml-s{seed}')
        with open(wd / f'maml-s{seed}' / 'comparison.json', 'w') as f:
            json.dump({'methods': ['maml'], 'shots': [5], 'steps': 70000, 'num_tasks': 600,
                       'config': {'seed': seed}, 'results': [{'shots': 5, 'mse': mse}]}, f)
    return wd


def test_ablation_reads_back_only_the_run_asked_for(tmp_path):
    """A finished (variant, seed) run is read back into the table when its shots, steps, tasks, seed and the
    variant's overrides are the ones asked for; a run with other settings (here: other shots) is refused with
    one line naming the workdir, not read back as if it were the run asked for."""
    wd = _finished_maml_ablation_runs(tmp_path / 'ablate')
    cli = lambda *a: subprocess.run([sys.executable, '-m', 'experiments.studies.ablate_blockiaf', f'--workdir={wd}',
                                     '--variants=maml', '--steps=70000', f'--out={tmp_path / "t"}', *a],
                                    capture_output=True, text=True, cwd=ROOT, env=_env())
    r = cli('--shots=5')
    assert r.returncode == 0, r.stderr
    row, = json.load(open(tmp_path / 't.json'))['rows']
    assert row['per_seed'] == [0.50, 0.55, 0.60] and row['mean'] == pytest.approx(0.55)
    r = cli('--shots=10,20')
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert 'maml-s0 holds a finished run with other settings' in r.stderr and 'shots [5], asked [10, 20]' in r.stderr


def test_ablation_takes_earlier_rows_from_its_own_tables_and_pairs_them(tmp_path):
    """--earlier: a variant every asked shot count of which is in an earlier table (same steps, tasks, seeds) is read
    from it, not run, named with its table, and paired by seed with the runs of this table; a table made with other
    steps is refused in one line."""
    wd = _finished_maml_ablation_runs(tmp_path / 'ablate')
    old = tmp_path / 'old.json'
    old.write_text(json.dumps({'command': 'python -m experiments.studies.ablate_blockiaf --steps=70000',
                               'steps': 70000, 'commit': 'abc1234', 'rows': [
                                   {'variant': 'metacurvature', 'shots': 5, 'mean': 0.4, 'ci': 0.1, 'seeds': 3,
                                    'per_seed': [0.45, 0.40, 0.35]}]}))
    cli = lambda *a: subprocess.run([sys.executable, '-m', 'experiments.studies.ablate_blockiaf', f'--workdir={wd}',
                                     '--variants=maml,metacurvature', '--shots=5', f'--out={tmp_path / "t"}',
                                     f'--earlier={old}', *a], capture_output=True, text=True, cwd=ROOT, env=_env())
    r = cli('--steps=70000')
    assert r.returncode == 0, r.stderr
    table = json.load(open(tmp_path / 't.json'))
    assert [(row['variant'], row['per_seed']) for row in table['rows']] == [('maml', [0.50, 0.55, 0.60]),
                                                                           ('metacurvature', [0.45, 0.40, 0.35])]
    pair, = [p for p in table['paired'] if p['reference'] == 'metacurvature']
    assert pair['diff'] == pytest.approx(0.15) and pair['ahead'] == 0   # 0.05, 0.15, 0.25 worse
    assert f'Rows read from earlier tables of this command: {old} (abc1234): metacurvature.' in open(tmp_path / 't.md').read()
    r = cli('--steps=5000')
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert '(steps, num_tasks, seeds) (70000, 600' in r.stderr


# ----------------------------------------------------------------------------- trustworthy results
def _largest_file(d):
    files = [f for f in glob.glob(os.path.join(d, '**', '*'), recursive=True) if os.path.isfile(f)]
    return max(files, key=os.path.getsize)


def test_corrupted_checkpoint_array_is_caught_by_its_checksum(tmp_path):
    """64 random bytes in the middle of the newest checkpoint's largest file: set aside with a message,
    the previous checkpoint is used and the run equals a clean one; with none left, a restart from 0 is said."""
    wd, over, c, ck = _run_with_checkpoints_at_10_and_20(tmp_path)
    assert ck.steps() == [10, 20] and len(ck.record(20)['fingerprint']) == 16

    def corrupt(step):
        f = _largest_file(os.path.join(ck.path(step), 'state'))
        with open(f, 'r+b') as fh:
            fh.seek(os.path.getsize(f) // 2)
            fh.write(np.random.default_rng(step).bytes(64))
    corrupt(20)
    c30 = tiny_config('maml', **dict(over, **{'meta.steps': 30}))
    workdirs.prepare(c30, wd)
    logs = []
    meta, _, _ = training.train(experiment.build(c30), wd, log=logs.append)
    warn = [l for l in logs if l.startswith('warning:')]
    assert len(warn) == 1 and ck.path(20) in warn[0] and 'corrupted' in warn[0], logs
    assert any(l.startswith('resuming from') and '(step 10/30)' in l for l in logs), logs
    ref, _, _ = training.train(experiment.build(c30), None, log=lambda s: None)
    assert _leaves_equal(meta, ref)
    for s in checkpoint_lib.Checkpointer(wd).steps():
        corrupt(s)
    logs = []
    training.train(experiment.build(c30), wd, log=logs.append)
    assert any('no readable checkpoint is left' in l and 'restarts from step 0' in l for l in logs), logs


def test_second_process_in_one_workdir_is_refused_and_evaluate_warns(tmp_path):
    run_dir = str(tmp_path / 'run')
    # a run that cannot finish while the test looks at it (it is killed at the end), however fast the machine
    p = subprocess.Popen(_cli_cmd(run_dir, ['--config.meta.steps=100000000']), cwd=ROOT, env=_env(),
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        for line in p.stdout:
            if line.startswith('[maml] step ') and int(line.split()[2].split('/')[0]) >= 60:
                break   # past the first checkpoint
        assert workdirs.holder(run_dir) == p.pid
        r = subprocess.run(_cli_cmd(run_dir, ['--config.meta.steps=100000000']), cwd=ROOT, env=_env(),
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2, r.stderr[-2000:]
        assert r.stderr.strip().splitlines() == [r.stderr.strip()] and f'pid {p.pid}' in r.stderr, r.stderr
        e = subprocess.run([sys.executable, '-m', 'experiments.evaluate', f'--workdir={run_dir}', '--num_tasks=10',
                            '--checkpoint=last'], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
        assert e.returncode == 0 and 'training is still running' in e.stderr, e.stderr[-2000:]
    finally:
        p.kill()
        p.wait(timeout=60)
    assert workdirs.holder(run_dir) is None   # the OS released the lock of the killed process
    with workdirs.lock(run_dir):
        pass


def _locked(workdir):
    """Whether some open file holds the workdir's lock (another open file in this process counts too)."""
    import fcntl
    with open(os.path.join(workdir, workdirs.LOCK_NAME)) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
    return False


def test_a_run_claims_its_workdir_once_and_the_cli_keeps_it_over_its_evaluation(tmp_path, monkeypatch):
    claims = []
    claim = workdirs.claim
    monkeypatch.setattr(workdirs, 'claim', lambda config, wd: (claims.append(wd), claim(config, wd))[1])
    wd = str(tmp_path / 'run')
    exp = experiment.build(tiny_config('maml', **{'meta.steps': 5}))
    training.train(exp, wd, log=lambda s: None)   # a library user's call: train claims the workdir
    assert claims == [wd] and not _locked(wd) and os.path.exists(os.path.join(wd, 'config.json'))
    with training.claim(exp, wd):   # as experiments.train: train, then evaluate, under one claim
        training.train(exp, wd, log=lambda s: None, claimed=True)
        assert _locked(wd)
    assert claims == [wd, wd] and not _locked(wd)


def test_report_skips_a_stale_evaluation_and_marks_an_unfinished_run(tmp_path):
    from experiments.evaluate import evaluate_workdir
    from experiments.report import table
    from md_meta.results import load
    over = {'meta.steps': 20, 'train.checkpoint_every': 10, 'train.eval_every': 10, 'train.val_tasks': 10}
    done, paused = str(tmp_path / 'done'), str(tmp_path / 'paused')
    c20 = tiny_config('maml', **over)
    workdirs.prepare(c20, done)
    training.train(experiment.build(c20), done, log=lambda s: None)
    evaluate_workdir(done, num_tasks=10, which='last', log=lambda s: None)
    # paused: trained to step 20, then config.json plans 40 steps (as a rerun does before it resumes)
    training.train(experiment.build(tiny_config('metasgd', **over)), paused, log=lambda s: None)
    workdirs.prepare(tiny_config('metasgd', **dict(over, **{'meta.steps': 40})), paused)
    logs = []
    r = evaluate_workdir(paused, num_tasks=10, which='last', log=logs.append)
    assert r['finished'] is False and r['step'] == 20 and r['planned_steps'] == 40
    assert r['norm_stats'] == 'batch'   # batch norm's statistics for the query, in every results file
    assert any('unfinished' in l and 'step 20 of 40' in l for l in logs), logs
    warns = []
    records = load([done, paused], warn=warns.append)
    assert not warns and len(records) == 2
    text = table(records)
    assert '(step 20/20)' in text and '(step 20/40, unfinished)' in text, text
    # the done run goes on to 30 steps: its evaluation.json no longer describes its last checkpoint
    c30 = tiny_config('maml', **dict(over, **{'meta.steps': 30}))
    workdirs.prepare(c30, done)
    training.train(experiment.build(c30), done, log=lambda s: None)
    with open(os.path.join(paused, 'evaluation.json'), 'a') as f:
        f.write('garbage')   # a damaged file among several
    warns = []
    assert load([done, paused], warn=warns.append) == []
    assert len(warns) == 2 and 'stale' in warns[0] and 'unreadable' in warns[1], warns


def test_sigint_during_a_checkpoint_save_completes_it(tmp_path, monkeypatch):
    """Ctrl-C while orbax writes: the save finishes, then KeyboardInterrupt; the checkpoint restores. (Python's
    own Ctrl-C handler is installed for the test: a process started in the background may inherit SIGINT
    ignored.)"""
    previous = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _sigint_during_save(tmp_path, monkeypatch)
    finally:
        signal.signal(signal.SIGINT, previous)


def _sigint_during_save(tmp_path, monkeypatch):
    c = tiny_config('maml')
    exp = experiment.build(c)
    meta, opt = experiment.init_state(exp)
    ck = checkpoint_lib.Checkpointer(str(tmp_path / 'w'))
    real_save = ck._manager.save

    def save_with_sigint(*a, **k):
        os.kill(os.getpid(), signal.SIGINT)
        return real_save(*a, **k)
    monkeypatch.setattr(ck._manager, 'save', save_with_sigint)
    with pytest.raises(KeyboardInterrupt):
        ck.save(5, {'meta': meta, 'opt_state': opt}, {})
    state, record = checkpoint_lib.Checkpointer(str(tmp_path / 'w')).restore(5, {'meta': meta, 'opt_state': opt})
    assert record['step'] == 5 and _leaves_equal(state['meta'], meta)


def test_ctrl_c_exits_130_with_one_line_and_the_rerun_resumes_bitwise(tmp_path):
    """Also: the rerun loads its compiled programs from the first run's persistent compilation cache
    (``--compilation_cache``, every program cached however fast it compiled) and still resumes bitwise."""
    ref, run_dir = str(tmp_path / 'ref'), str(tmp_path / 'run')
    flags_ = ['--config.train.checkpoint_every=5', '--config.train.keep=1']   # saves are a large share of the time
    ref_p = subprocess.Popen(_cli_cmd(ref, flags_), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    flags_ += [f'--compilation_cache={tmp_path / "cache"}']
    cached_env = dict(_env(), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0', JAX_LOG_COMPILES='1')
    target = random.Random(os.getpid()).randint(60, 200)
    # SIGINT at its default in the child, which then installs Python's Ctrl-C handler (a test process started
    # in the background may have inherited SIGINT ignored)
    p = subprocess.Popen(_cli_cmd(run_dir, flags_), cwd=ROOT, env=dict(cached_env, JAX_LOG_COMPILES='0'),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for line in p.stdout:
        if line.startswith('[maml] step ') and int(line.split()[2].split('/')[0]) >= target:
            p.send_signal(signal.SIGINT)
            break
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, err[-2000:]
    assert 'Traceback' not in err and len(err.strip().splitlines()) == 1, err
    assert 'interrupted; rerun the same command to resume' in err
    r2 = subprocess.run(_cli_cmd(run_dir, flags_), cwd=ROOT, env=cached_env, capture_output=True, text=True,
                        timeout=300)
    assert r2.returncode == 0 and 'resuming from' in r2.stdout, r2.stderr[-2000:]
    assert "Persistent compilation cache hit for 'jit_chunk'" in r2.stderr, r2.stderr[-2000:]
    assert os.listdir(tmp_path / 'cache') == [os.path.basename(compilation_cache_dir(str(tmp_path / 'cache')))]
    _, ref_err = ref_p.communicate(timeout=300)
    assert ref_p.returncode == 0, ref_err[-2000:]
    s1, a, _ = _last_state(ref)
    s2, b, _ = _last_state(run_dir)
    assert s1 == s2 == 300 and _leaves_equal(a, b)


@pytest.fixture(scope='module')
def finished_run(tmp_path_factory):
    wd = str(tmp_path_factory.mktemp('finished') / 'w')
    r = subprocess.run(_cli_cmd(wd, ['--config.meta.steps=50']), cwd=ROOT, env=_env(), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return wd


def test_step_factors_of_a_finished_run(finished_run):
    """experiments.studies.step_factors on a trained workdir: MAML's step is the gradient itself (S = I, cos 1)."""
    from experiments.studies.step_factors import run_step_factors
    r = run_step_factors(finished_run, num_tasks=2)
    assert r['method'] == 'maml' and 'residual' not in r
    np.testing.assert_array_equal(r['diag'], 1.0)
    assert r['mixing'] == {'within': 0.0, 'between': 0.0} and abs(r['cosine'] - 1) < 1e-5


DAMAGED_CONFIGS = {'evaluate_config_truncated': '{"method": "maml", "task": {', 'evaluate_config_empty': '',
                   'evaluate_config_list': '[]', 'evaluate_config_bytes': '{"method": "\udcff"}'}


@pytest.mark.parametrize('case', ['typo', 'missing_config', 'bad_config_arg', 'hidden_zero', 'ways_one', 'inf_lr',
                                  'workdir_is_file', 'steps_below_run', 'evaluate_missing', 'evaluate_read_only',
                                  *DAMAGED_CONFIGS])
def test_bad_input_gives_one_line_and_exit_2(case, tmp_path, finished_run):
    wd = str(tmp_path / 'w')
    if case in DAMAGED_CONFIGS:   # a traceback from evaluate, where train gave one line
        os.makedirs(wd)
        with open(os.path.join(wd, 'config.json'), 'wb') as f:
            f.write(DAMAGED_CONFIGS[case].encode('utf-8', 'surrogateescape'))
    train = lambda *extra: _cli_cmd(wd, extra)
    with_config = lambda path, *extra: [sys.executable, '-m', 'experiments.train', f'--config={path}', *extra,
                                        f'--workdir={wd}']
    if case == 'evaluate_read_only':
        if os.geteuid() == 0:
            pytest.skip('root writes into read-only folders')
        os.chmod(finished_run, 0o555)
    cmd = {'typo': train('--config.meta.stepz=5'),
           'missing_config': with_config('experiments/configs/no_such_file.py'),
           'bad_config_arg': with_config('experiments/configs/omniglot_paper.py:no_such_variant'),
           'hidden_zero': train('--config.model.hidden=(0,40)'),
           'ways_one': with_config('experiments/configs/omniglot_minimal.py', '--config.task.ways=1'),
           'inf_lr': train('--config.meta.lr=inf'),
           'workdir_is_file': _cli_cmd(str(tmp_path / 'file')),
           'steps_below_run': _cli_cmd(finished_run, ['--config.meta.steps=20']),
           'evaluate_missing': [sys.executable, '-m', 'experiments.evaluate', f'--workdir={tmp_path / "none"}'],
           'evaluate_read_only': [sys.executable, '-m', 'experiments.evaluate', f'--workdir={finished_run}',
                                  '--num_tasks=10'],
           **{c: [sys.executable, '-m', 'experiments.evaluate', f'--workdir={wd}'] for c in DAMAGED_CONFIGS}}[case]
    (tmp_path / 'file').write_text('not a directory')
    try:
        r = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    finally:
        os.chmod(finished_run, 0o755)
    err = r.stderr.strip()
    assert r.returncode == 2, (r.returncode, err[-2000:])
    assert 'Traceback' not in err and len(err.splitlines()) == 1 and err.startswith('error: '), err
    expect = {'typo': 'stepz', 'missing_config': 'no_such_file.py', 'bad_config_arg': 'no_such_variant',
              'hidden_zero': 'model.hidden', 'ways_one': 'task.ways', 'inf_lr': 'meta.lr',
              'workdir_is_file': 'is a file', 'steps_below_run': 'already at meta-step 50',
              'evaluate_missing': 'not a md-meta workdir', 'evaluate_read_only': 'evaluation.json',
              **{c: 'config.json is damaged' for c in DAMAGED_CONFIGS}}[case]
    assert expect in err, err
    if case in ('hidden_zero', 'ways_one', 'inf_lr', 'typo'):
        assert not os.path.exists(wd), 'the workdir is created only after the config is valid'
    if case == 'steps_below_run':
        assert json.load(open(os.path.join(finished_run, 'config.json')))['meta']['steps'] == 50


def test_skipped_updates_logged_as_strict_json_and_named_checkpoint(tmp_path):
    """A skipped (non-finite) update neither turns its log window's meta-loss into NaN nor writes a bare
    NaN into metrics.jsonl; the stop message names the last checkpoint, or says that none was written."""
    wd = str(tmp_path / 'w')
    c = tiny_config('maml', **{'meta.steps': 10, 'train.log_every': 5})
    workdirs.prepare(c, wd)
    _, _, hist = training.train(nan_build(c, 6, 1), wd, log=lambda s: None)
    assert hist[1]['step'] == 10 and hist[1]['skipped'] == 1 and np.isfinite(hist[1]['meta_loss'])

    def strict(name):
        raise ValueError(f'bare {name} in metrics.jsonl')
    for line in open(os.path.join(wd, 'metrics.jsonl')):
        json.loads(line, parse_constant=strict)
    c2 = tiny_config('maml', **{'meta.steps': 20, 'train.max_nonfinite': 3, 'train.checkpoint_every': 10})
    wd2 = str(tmp_path / 'w2')
    workdirs.prepare(c2, wd2)
    with pytest.raises(training.NonFiniteError, match=r'\(no checkpoint was written\)'):
        training.train(nan_build(c2, 0, 100), wd2, log=lambda s: None)


def test_entry_point_reports_a_full_disk_in_one_line():
    """A full disk seen by a library's thread (three times: one warning line, from threading.excepthook) and
    then by the main thread: one error line, exit status 2, no traceback, no atexit noise."""
    script = textwrap.dedent("""
        import errno, os, threading
        from experiments.harness import run

        def main(argv):
            def writer():
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            for _ in range(3):   # the same failure, repeated by a background writer
                t = threading.Thread(target=writer)
                t.start()
                t.join()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), '/w/metrics.jsonl')
        run(main, argv=['prog'])
    """)
    r = subprocess.run([sys.executable, '-c', script], cwd=ROOT, env=_env(), capture_output=True, text=True,
                       timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and 'Traceback' not in r.stderr, r.stderr
    assert lines[:-1] == ['warning: background thread: OSError: [Errno 28] No space left on device'], lines
    assert lines[-1].startswith('error: No space left on device (/w/metrics.jsonl)') and 'resumes' in lines[-1]


def test_plot_convergence_reads_stored_curves_and_they_match_a_recomputation(tmp_path):
    from experiments.evaluate import evaluate_workdir
    from md_meta.results import curves_for
    wd = str(tmp_path / 'w')
    c = tiny_config('maml', **{'meta.steps': 10, 'train.checkpoint_every': 10, 'train.eval_every': 10,
                               'train.val_tasks': 10})
    training.train(experiment.build(c), wd, log=lambda s: None)
    evaluate_workdir(wd, num_tasks=10, which='best', log=lambda s: None)
    stored = curves_for(wd, 10, 'best')
    assert stored['source'] == 'stored' and stored['step'] == 10
    fresh = curves_for(wd, 10, 'best', recompute=True)
    assert fresh['source'] == 'computed'
    np.testing.assert_allclose(stored['loss'], fresh['loss'], rtol=1e-6)
    np.testing.assert_allclose(stored['grad_norm'], fresh['grad_norm'], rtol=1e-6)
    assert curves_for(wd, 20, 'best')['source'] == 'computed'   # another number of tasks


def test_a_workdir_of_the_earlier_checkpoint_layout_resumes(tmp_path):
    """Checkpoints written by plain orbax Checkpointers (md-meta before CheckpointManager, no checksums in the
    record) are restored, and the run goes on under CheckpointManager, pruning them like its own."""
    import orbax.checkpoint as ocp
    wd = str(tmp_path / 'w')
    c = tiny_config('maml', **{'meta.steps': 10, 'train.checkpoint_every': 10, 'train.eval_every': 0})
    meta10, opt10, _ = training.train(experiment.build(c), None, log=lambda s: None)
    workdirs.prepare(c, wd)
    stored = json.load(open(os.path.join(wd, 'config.json')))
    stored['train']['inject_nan_at_step'] = -1   # a knob that earlier versions had: ignored, not a mismatch
    json.dump(stored, open(os.path.join(wd, 'config.json'), 'w'))
    ocp.Checkpointer(ocp.CompositeCheckpointHandler()).save(
        os.path.join(wd, 'checkpoints', 'ckpt_000000010'),
        args=ocp.args.Composite(state=ocp.args.StandardSave({'meta': meta10, 'opt_state': opt10}),
                                record=ocp.args.JsonSave({'step': 10, 'consecutive_nonfinite': 0,
                                                          'skipped_total': 0, 'val': None})))
    c40 = tiny_config('maml', **{'meta.steps': 40, 'train.checkpoint_every': 10, 'train.eval_every': 0,
                                 'train.keep': 2})
    logs = []
    meta, _, _ = training.train(experiment.build(c40), wd, log=logs.append)
    assert any(l.startswith('resuming from') and '(step 10/40)' in l for l in logs), logs
    ref, _, _ = training.train(experiment.build(c40), None, log=lambda s: None)
    assert _leaves_equal(meta, ref)
    assert checkpoint_lib.Checkpointer(wd).steps() == [30, 40]


def _numpy_one_step_mse(init, task, alpha):
    """Per-task query MSE after one GD step on the support MSE of a ReLU MLP, back-propagated by hand
    in float64 (independent of JAX's autodiff)."""
    n = len(init)
    W = [np.asarray(init[f'layer_{i}']['dense']['kernel'], np.float64) for i in range(n)]
    b = [np.asarray(init[f'layer_{i}']['dense']['bias'], np.float64) for i in range(n)]
    out = []
    for x, y, xq, yq in zip(*(np.asarray(a, np.float64) for a in task)):
        hs, pre = [x], []
        for i in range(n):
            pre.append(hs[-1] @ W[i] + b[i])
            hs.append(np.maximum(pre[-1], 0) if i < n - 1 else pre[-1])
        d = 2 * (hs[-1] - y) / y.size
        gW, gb = [None] * n, [None] * n
        for i in reversed(range(n)):
            gW[i], gb[i] = hs[i].T @ d, d.sum(0)
            d = (d @ W[i].T) * (pre[i - 1] > 0) if i else None
        h = xq
        for i in range(n):
            h = h @ (W[i] - alpha * gW[i]) + (b[i] - alpha * gb[i])
            h = np.maximum(h, 0) if i < n - 1 else h
        out.append(np.mean((h - yq) ** 2))
    return np.array(out)


def test_maml_evaluation_matches_hand_written_numpy():
    """evaluation.evaluate (here at another support size than meta-training's) equals a hand-written
    float64 one-step GD adaptation on the same tasks: the reported sinusoid MSE is what it claims."""
    exp = experiment.build(tiny_config('maml', **{'eval.num_tasks': 12, 'eval.batch_size': 12}))
    meta, _ = experiment.init_state(exp)
    meta = dict(meta, init=random_like(jax.random.PRNGKey(5), meta['init'], 0.5))
    r = evaluation.evaluate(exp, meta, 'test', shots=6)
    assert r['shots'] == 6 and r['metrics']['loss']['n'] == 12
    other = exp.config.copy_and_resolve_references()
    other.task.shots = 6
    from md_meta import tasks
    task = tasks.make_source(other).sample(10_000_000, 12, 'test', exp.config.task.query)
    assert task.support_x.shape == (12, 6, 1)
    mse = _numpy_one_step_mse(meta['init'], task, exp.config.inner.step_size)
    np.testing.assert_allclose(r['metrics']['loss']['mean'], mse.mean(), rtol=1e-5)


def test_a_damaged_metrics_line_is_skipped_with_a_warning_on_resume(tmp_path):
    """A non-UTF-8 byte in metrics.jsonl stopped the resume with a UnicodeDecodeError traceback."""
    wd = str(tmp_path / 'w')
    over = {'meta.steps': 10, 'train.checkpoint_every': 10, 'train.eval_every': 0}
    training.train(experiment.build(tiny_config('maml', **over)), wd, log=lambda s: None)
    with open(os.path.join(wd, 'metrics.jsonl'), 'rb') as f:
        lines = f.read().splitlines(keepends=True)
    with open(os.path.join(wd, 'metrics.jsonl'), 'wb') as f:
        f.write(lines[0] + b'{"step": 7, "meta_loss": \xff}\n' + b''.join(lines[1:]))
    logs = []
    training.train(experiment.build(tiny_config('maml', **dict(over, **{'meta.steps': 20}))), wd, log=logs.append)
    assert any('metrics.jsonl: skipped 1 damaged line' in l for l in logs), logs
    steps = [json.loads(l)['step'] for l in open(os.path.join(wd, 'metrics.jsonl'))]
    assert steps == [5, 10, 15, 20]


def test_report_warns_about_results_files_that_hold_no_result(tmp_path):
    """results.json holding [1,2] gave a traceback, {} was skipped without a word."""
    from md_meta.results import load
    cases = {'list': ('results.json', '[1, 2]', 'holds a JSON list'), 'empty': ('results.json', '{}', 'holds no result'),
             'no_rows': ('results.json', '{"results": []}', 'holds no result'),
             'eval_list': ('evaluation.json', '[1, 2]', 'holds a JSON list'),
             'bytes': ('evaluation.json', b'\xff\xfe', 'unreadable')}
    for name, (file, text, expect) in cases.items():
        os.makedirs(tmp_path / name)
        (tmp_path / name / file).write_bytes(text if isinstance(text, bytes) else text.encode())
        warns = []
        assert load([str(tmp_path / name)], warn=warns.append) == []
        assert len(warns) == 1 and expect in warns[0] and 'skipped' in warns[0], (name, warns)


def test_evaluation_json_is_strict_and_a_finished_runs_earlier_best_is_not_unfinished(tmp_path, monkeypatch):
    """evaluation.json wrote bare NaN (not JSON); a finished run evaluated at an earlier best checkpoint was
    labelled 'unfinished'."""
    from experiments.evaluate import evaluate_workdir, format_record
    from md_meta.results import load
    wd = str(tmp_path / 'w')
    c = tiny_config('maml', **{'meta.steps': 20, 'train.checkpoint_every': 10, 'train.eval_every': 10,
                               'train.val_tasks': 10})
    training.train(experiment.build(c), wd, log=lambda s: None)
    monkeypatch.setattr(checkpoint_lib.Checkpointer, 'best_step', lambda self: 10)
    logs = []
    r = evaluate_workdir(wd, num_tasks=10, which='best', log=logs.append,
                         overrides={'inner.step_size': 1e30})   # an inner step that overflows: NaN metrics
    assert r['step'] == 10 and r['finished'] is True and not any('unfinished' in l for l in logs), logs
    assert 'unfinished' not in format_record(r) and 'nan' in format_record(r)

    def strict(name):
        raise ValueError(f'bare {name} in evaluation.json')
    stored = json.load(open(os.path.join(wd, 'evaluation.json')), parse_constant=strict)
    assert stored['metrics']['loss']['mean'] is None
    records = load([wd], warn=lambda s: None)
    assert len(records) == 1 and records[0]['status'] == ''


def test_best_checkpoint_when_every_validation_is_nan_is_the_last_and_says_so(tmp_path):
    """A NaN validation score ranked first, so 'best' was the oldest checkpoint kept, without a word."""
    from md_meta import tasks
    wd = str(tmp_path / 'w')
    c = tiny_config('maml', **{'meta.steps': 30, 'train.checkpoint_every': 10, 'train.eval_every': 10,
                               'train.val_tasks': 10, 'train.keep': 2})
    source = tasks.make_source(c)

    def sample(step, num_tasks, split, query):   # meta-validation sees NaN inputs, training does not
        batch = source.sample(step, num_tasks, split, query)
        return batch._replace(query_x=jnp.full_like(batch.query_x, jnp.nan)) if split == 'val' else batch
    training.train(experiment.build(c, source=source._replace(sample=sample)), wd, log=lambda s: None)
    ck = checkpoint_lib.Checkpointer(wd)
    assert ck.steps()[-1] == 30 and ck.best_step() is None
    warns = []
    _, _, step = evaluation.load_run(wd, 'best', warn=warns.append)
    assert step == 30, step
    assert any('every meta-validation' in w and 'NaN' in w and "'best' is the last one" in w for w in warns), warns


def _result(workdir, seed, steps, accuracy, shots=5, method='md'):
    """A result record as md_meta.results.load returns it (provenance with the run's config)."""
    config = json.loads(tiny_config(method, **{'seed': seed, 'meta.steps': steps, 'task.shots': shots}).to_json())
    return {'method': method, 'task': 'omniglot', 'ways': 5, 'shots': shots, 'seed': seed, 'step': steps,
            'planned_steps': steps, 'finished': True, 'parameters': 'best', 'num_tasks': 100, 'status': '',
            'workdir': workdir, 'config': config,
            'metrics': {'accuracy': {'mean': accuracy, 'ci': 0.01, 'n': 100}, 'loss': {'mean': 0.3, 'ci': 0.01, 'n': 100}}}


def test_report_shows_every_run_whatever_the_order_and_aggregates_seeds_explicitly():
    """One run per (task, ways, method, shots) was kept, chosen by the order of --workdirs, without a warning."""
    from experiments.report import table
    from md_meta.evaluation import seed_interval
    ref, seed1, seed1k5 = (_result('ref', 0, 1000, 0.90), _result('seed1', 1, 1000, 0.92),
                           _result('seed1k5', 1, 1500, 0.95))
    forward, backward = table([ref, seed1, seed1k5]), table([seed1k5, seed1, ref])
    assert forward == backward
    mean, ci = seed_interval([0.90, 0.92])
    assert f'{100 * mean:.2f} +- {100 * ci:.2f}% over 2 seeds (0, 1) (step 1000/1000)' in forward, forward
    assert '95.00 +- 1.00% (step 1500/1500)' in forward, forward
    rows = [l for l in forward.splitlines() if l.startswith('| md ')]
    assert len(rows) == 2 and any('meta.steps=1000' in l for l in rows) and any('meta.steps=1500' in l for l in rows)
    warns = []   # two copies of one run: both shown, and said
    text = table([ref, dict(ref, workdir='ref_copy')], warn=warns.append)
    assert 'over 2 seeds (0, 0)' in text and len(warns) == 1 and 'share a seed' in warns[0], (text, warns)
    # the paper's layout: a 1-shot and a 5-shot run of one method share a row
    text = table([_result('a', 0, 1000, 0.9, shots=1), _result('b', 0, 1000, 0.95, shots=5)])
    assert len([l for l in text.splitlines() if l.startswith('| md ')]) == 1 and 'setting' not in text, text


def test_sigterm_checkpoints_at_the_step_reached_and_the_rerun_ends_bitwise_equal(tmp_path):
    """SIGTERM (a preemption) ended training at once with nothing printed, losing up to checkpoint_every steps.
    Now: the chunk finishes, a checkpoint at its step, one line, exit 128 + 15; the rerun resumes there and
    ends bitwise equal to an uninterrupted run."""
    ref, run_dir = str(tmp_path / 'ref'), str(tmp_path / 'run')
    # chunks end at multiples of 5 (steps_per_call) and 7 (checkpoints: they slow the run, so the signal lands
    # well before its end); a chunk ending at a multiple of 5 only gets the preemption's own checkpoint
    flags_ = ['--config.train.checkpoint_every=7', '--config.train.eval_every=1000', '--config.train.keep=1']
    ref_p = subprocess.Popen(_cli_cmd(ref, flags_), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    p = subprocess.Popen(_cli_cmd(run_dir, flags_), cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    for line in p.stdout:
        if line.startswith('[maml] step ') and int(line.split()[2].split('/')[0]) >= 20:
            p.send_signal(signal.SIGTERM)
            break
    out, err = p.communicate(timeout=120)
    assert p.returncode == 128 + signal.SIGTERM, (p.returncode, err[-2000:])
    assert 'Traceback' not in err and len(err.strip().splitlines()) == 1, err
    step = int(err.split('preempted at step ')[1].split(';')[0])
    assert 'rerun the same command to resume' in err and 20 <= step < 300 and (step % 5 == 0 or step % 7 == 0), err
    assert checkpoint_lib.Checkpointer(run_dir).steps()[-1] == step
    r2 = subprocess.run(_cli_cmd(run_dir, flags_), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert r2.returncode == 0 and f'(step {step}/300)' in r2.stdout, r2.stdout[-2000:] + r2.stderr[-2000:]
    _, ref_err = ref_p.communicate(timeout=300)
    assert ref_p.returncode == 0, ref_err[-2000:]
    s1, a, rec1 = _last_state(ref)
    s2, b, rec2 = _last_state(run_dir)
    assert s1 == s2 == 300 and _leaves_equal(a, b) and rec1['fingerprint'] == rec2['fingerprint']


def test_sighup_in_process_stops_at_a_chunk_end_with_a_checkpoint(tmp_path):
    """The library's loop: SIGHUP noted during a chunk, a checkpoint at its end, Preempted with the step and
    status 129; the handlers are restored afterwards."""
    wd = str(tmp_path / 'w')
    c = tiny_config('maml', **{'meta.steps': 40, 'train.checkpoint_every': 1000, 'train.eval_every': 0})
    before = signal.getsignal(signal.SIGHUP)
    if before is not signal.SIG_DFL:
        pytest.skip('SIGHUP is not at its default in this process (e.g. started under nohup)')

    def log(line):
        if line.startswith('[maml] step 10/'):
            os.kill(os.getpid(), signal.SIGHUP)
    with pytest.raises(training.Preempted) as e:
        training.train(experiment.build(c), wd, log=log)
    assert e.value.status == 129 and e.value.step == 10 and 'preempted at step 10' in str(e.value)
    assert checkpoint_lib.Checkpointer(wd).steps() == [10]
    assert signal.getsignal(signal.SIGHUP) is before


def test_provenance_records_the_batch_norm_statistics():
    """results.json and evaluation.json say whether query predictions used the query batch's statistics
    (transductive) or the support set's (inductive): model.norm_stats."""
    for mode in ('batch', 'support'):
        assert workdirs.provenance(tiny_config('maml', **{'model.norm_stats': mode}), 0, 'final', None)[
            'norm_stats'] == mode


def test_a_writer_passed_to_train_receives_what_metrics_jsonl_holds(tmp_path):
    """md_meta.metric_writers: a user's writer (another tracker) gets every record metrics.jsonl gets, training
    and meta-validation scalars alike, with NaN as None; it is closed at the end."""
    class Recorder:
        def __init__(self):
            self.records, self.closed = [], False

        def write_scalars(self, step, scalars):
            self.records.append({'step': step, **scalars})

        def close(self):
            self.closed = True

    wd, rec = str(tmp_path / 'w'), Recorder()
    c = tiny_config('maml', **{'meta.steps': 10, 'train.eval_every': 5, 'train.val_tasks': 10})
    training.train(experiment.build(c), wd, log=lambda s: None, writers=[rec])
    stored = [json.loads(l) for l in open(os.path.join(wd, 'metrics.jsonl'))]
    assert rec.records == stored and rec.closed
    assert any('val/loss' in r for r in stored) and any('meta_loss' in r for r in stored)
