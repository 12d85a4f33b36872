"""The task batch sharded over devices (jax.sharding) and processes (jax.distributed), on CPU.

Every multi-device run happens in a subprocess with its own XLA_FLAGS (forced host devices), so the
pytest process keeps its single CPU device. This file is also the subprocesses' entry point:

    python tests/test_distributed.py devices OUT.json           # 4 forced devices vs 1, in one process
    python tests/test_distributed.py worker ID PORT OUT.npz     # one of two jax.distributed processes
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

STEPS = 4
BATCH = 8
# A process that stops sending heartbeats for this long is declared dead by the coordination service.
HEARTBEAT_S = 5


def _overrides(**extra):
    o = {'meta.batch_size': BATCH, 'meta.steps': STEPS, 'train.log_every': 2, 'train.steps_per_call': 2,
         'train.checkpoint_every': 0, 'train.eval_every': 0, 'train.tensorboard': False,
         'md.encoder_layers': 1}
    o.update(extra)
    return o


def _config(method, **extra):
    from tests.helpers import tiny_config
    from md_meta.config import base_config
    known = base_config()
    o = {k: v for k, v in _overrides(**extra).items()
         if k.split('.')[0] != 'train' or k.split('.')[1] in known.train}  # fields of other issues optional
    return tiny_config(method, **o)


def _host_only(exp):
    """The same experiment fed by the host sampler (one jitted meta-step per host batch)."""
    return exp._replace(source=exp.source._replace(device_sample=None))


def _leaves(tree):
    import jax
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def _env(num_devices):
    env = dict(os.environ)
    flags = [f for f in env.get('XLA_FLAGS', '').split() if 'xla_force_host_platform_device_count' not in f]
    env['XLA_FLAGS'] = ' '.join(flags + [f'--xla_force_host_platform_device_count={num_devices}'])
    env['JAX_PLATFORMS'] = 'cpu'
    env['PYTHONPATH'] = ROOT + os.pathsep + env.get('PYTHONPATH', '')
    env['PYTHONUNBUFFERED'] = '1'
    return env


def _free_port():
    with socket.socket() as s:
        s.bind(('localhost', 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------- subprocess bodies
def _devices_main(out_path):
    """4 forced devices: the same N meta-steps on 1 device (dist.devices=1) and sharded over 4."""
    import jax
    from md_meta import distributed, experiment, training
    assert jax.device_count() == 4, jax.devices()
    result = {}
    for method, host in (('maml', False), ('maml', True), ('md', False)):
        params = {}
        for n in (1, 4):
            exp = experiment.build(_config(method, **{'dist.devices': n}))
            assert distributed.num_devices(exp.mesh) == n
            exp = _host_only(exp) if host else exp
            meta, opt_state, hist = training.train(exp, None, log=lambda s: None)
            params[n] = _leaves((meta, opt_state))
        result[f'{method}_{"host" if host else "fused"}'] = {
            'max_abs_diff': max(float(np.max(np.abs(a - b))) for a, b in zip(params[1], params[4])),
            'max_abs_change': max(float(np.max(np.abs(a))) for a in params[4]),
            'finite': bool(all(np.all(np.isfinite(a)) for a in params[4]))}
    # The sharded step really is partitioned: XLA inserted the cross-device reduction of the task mean.
    exp = _host_only(experiment.build(_config('maml')))
    meta, opt_state = distributed.replicate(experiment.init_state(exp), exp.mesh)
    batch = distributed.host_batch(exp.source, 0, BATCH, 'train', exp.config.task.query, exp.mesh)
    step0 = distributed.step_scalar(0, exp.mesh)
    hlo = training.make_host_step(exp).lower(meta, opt_state, batch, step0).compile().as_text()
    result['all_reduce_in_hlo'] = 'all-reduce' in hlo
    result['batch_shards'] = [list(s.index[0].indices(BATCH)) for s in batch.support_x.addressable_shards]
    # A global batch that does not divide by the device count is refused (by build, which builds the mesh).
    try:
        experiment.build(_config('md', **{'meta.batch_size': 6}))
        result['refusal'] = None
    except Exception as e:  # noqa: BLE001
        result['refusal'] = f'{type(e).__name__}: {e}'
    with open(out_path, 'w') as f:
        json.dump(result, f)


def _worker_main(process_id, port, out_path):
    """One of two processes (2 forced CPU devices each): N fused meta-steps, N host-sampled meta-steps,
    process 0 saves both results, then both train on until killed."""
    from md_meta import distributed
    dist = {'dist.coordinator': f'localhost:{port}', 'dist.num_processes': 2, 'dist.process_id': process_id,
            'dist.heartbeat_timeout': HEARTBEAT_S}
    cfg = _config('maml', **dist)
    assert distributed.initialize_from_config(cfg)
    import jax
    from md_meta import experiment, training
    assert (jax.process_count(), jax.device_count(), jax.local_device_count()) == (2, 4, 2)
    exp = experiment.build(cfg)   # validates the device request and the batch, builds the mesh
    fused, _, _ = training.train(exp, None, log=lambda s: None)
    host, _, _ = training.train(_host_only(exp), None, log=lambda s: None)
    if distributed.is_main_process():
        np.savez(out_path + '.tmp.npz', *(_leaves(fused) + _leaves(host)))
        os.replace(out_path + '.tmp.npz', out_path)
    print(f'READY {process_id}', flush=True)
    forever = _host_only(experiment.build(_config('maml', **dist, **{'meta.steps': 10 ** 7, 'train.log_every': 1})))
    training.train(forever, None, log=lambda s: print(f'{process_id} {s}', flush=True))


# ------------------------------------------------------------------------------- tests
def test_four_devices_match_one_device_and_indivisible_batch_is_refused(tmp_path):
    out = tmp_path / 'devices.json'
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), 'devices', str(out)], env=_env(4),
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    for name in ('maml_fused', 'maml_host', 'md_fused'):
        assert r[name]['finite'], (name, r[name])
        assert r[name]['max_abs_diff'] < 1e-5, (name, r[name])
    assert r['all_reduce_in_hlo']
    assert r['batch_shards'] == [[2 * i, 2 * i + 2, 1] for i in range(4)]  # 2 tasks on each device
    assert r['refusal'] is not None and 'config.meta.batch_size' in r['refusal'] and '4 devices' in r['refusal'], r


def test_trainer_cli_refuses_indivisible_batch(tmp_path):
    proc = subprocess.run([sys.executable, '-m', 'experiments.train', '--config.meta.batch_size=6',
                           '--config.meta.steps=2', f'--workdir={tmp_path / "run"}'], env=_env(4), cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert 'config.meta.batch_size' in proc.stderr and '4 devices' in proc.stderr, proc.stderr[-2000:]


def _reference(exp, num_processes):
    """The single-process, single-device run on the same global batches: fused sampling is the same
    program on one device; the host-sampled global batch is the concatenation of the processes' shares."""
    import jax
    import jax.numpy as jnp
    from md_meta import distributed, experiment, training
    fused, _, _ = training.train(exp, None, log=lambda s: None)
    meta, opt_state = experiment.init_state(exp)
    step_fn = training.make_host_step(exp)
    cfg = exp.config
    for step in range(cfg.meta.steps):
        shares = [distributed.sample_share(exp.source, step, cfg.meta.batch_size, 'train', cfg.task.query, p,
                                           num_processes) for p in range(num_processes)]
        batch = jax.tree_util.tree_map(lambda *xs: jnp.concatenate([jnp.asarray(x) for x in xs]), *shares)
        meta, opt_state, _ = step_fn(meta, opt_state, batch, jnp.asarray(step, jnp.int32))
    return _leaves(fused) + _leaves(meta)


def test_two_processes_match_one_process_and_a_killed_peer_stops_the_other(tmp_path):
    from md_meta import experiment
    out = tmp_path / 'two.npz'
    port = _free_port()
    logs = [tmp_path / f'p{i}.log' for i in range(2)]
    files = [open(log, 'w') for log in logs]
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), 'worker', str(i), str(port), str(out)],
                              env=_env(2), cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
             for i, f in enumerate(files)]
    text = lambda i: logs[i].read_text(errors='replace')
    try:
        # Meanwhile, the reference in this (one-device) process.
        expected = _reference(experiment.build(_config('maml')), 2)
        # Wait until both processes finished the N steps (process 0 saved them) and train on.
        deadline = time.time() + 400
        while not all(f'READY {i}' in text(i) for i in range(2)) and time.time() < deadline:
            for i, p in enumerate(procs):
                assert p.poll() is None or f'READY {i}' in text(i), f'process {i} exited early:\n{text(i)[-3000:]}'
            time.sleep(0.2)
        assert all(f'READY {i}' in text(i) for i in range(2)), f'timed out: {[text(i)[-1500:] for i in range(2)]}'
        with np.load(out) as saved:
            got = [saved[f'arr_{i}'] for i in range(len(saved.files))]
        assert len(got) == len(expected)
        diff = max(float(np.max(np.abs(a - b))) for a, b in zip(got, expected))
        assert diff < 1e-5, diff
        # Kill process 1 mid-training: process 0 must stop with an error (missed heartbeats), not hang.
        time.sleep(1.0)
        procs[1].send_signal(signal.SIGKILL)
        procs[1].wait(timeout=30)
        t_kill = time.time()
        try:
            procs[0].wait(timeout=HEARTBEAT_S * 6 + 30)
        except subprocess.TimeoutExpired:
            pytest.fail(f'process 0 still running {HEARTBEAT_S * 6 + 30} s after its peer was killed (hang)')
        waited = time.time() - t_kill
        msg = text(0)
        assert procs[0].returncode != 0, msg[-3000:]
        assert 'stopped sending heartbeats' in msg or 'another task died' in msg, msg[-3000:]
        print(f'process 0 stopped {waited:.1f} s after process 1 was killed (exit status {procs[0].returncode})')
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)
        for f in files:
            f.close()


if __name__ == '__main__':
    if sys.argv[1] == 'devices':
        _devices_main(sys.argv[2])
    elif sys.argv[1] == 'worker':
        _worker_main(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
    else:
        raise SystemExit(f'unknown mode {sys.argv[1]!r}')
