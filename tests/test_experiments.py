"""The commands' harness (experiments/harness.py): flags are defined when a command runs, never at import;
config names; background threads' failures; the installed package."""
import json
import os
import shutil
import subprocess
import sys

from conftest import ROOT

_IMPORT_ALL = r'''
import importlib, pkgutil, sys
import experiments, md_meta
from absl import flags
for pkg in (md_meta, experiments):
    for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + '.'):
        try:
            importlib.import_module(m.name)
        except ModuleNotFoundError as e:   # an optional dependency (torch for the authors' code)
            if e.name.split('.')[0] not in ('torch', 'torchmeta'):
                raise
ours = sorted(f'{module}: --{flag.name}' for module, defined in flags.FLAGS.flags_by_module_dict().items()
              if module.split('.')[0] in ('experiments', 'md_meta', '__main__') for flag in defined)
print('\n'.join(ours))
sys.exit(1 if ours else 0)
'''


def test_every_module_imports_into_one_interpreter_without_defining_a_flag():
    """Two modules defining one absl flag at import made any process importing both fail (DuplicateFlagError),
    so the suite's outcome depended on how pytest-xdist grouped the tests. Every module of md_meta and
    experiments is imported here into one fresh interpreter, and none may have defined a flag."""
    p = subprocess.run([sys.executable, '-c', _IMPORT_ALL], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr[-3000:]


def test_a_command_defines_its_flags_when_it_runs():
    """The flags defined in the command's ``__main__`` block and the shared process flags both reach its
    command line (absl's --helpfull lists them and exits with status 1)."""
    p = subprocess.run([sys.executable, '-m', 'experiments.report', '--helpfull'], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    for flag in ('--workdirs', '--out', '--host_memory', '--compilation_cache'):
        assert flag in p.stdout, flag


def test_config_names_resolve_to_the_config_files():
    """--config=NAME[:ARG] names a file of experiments/configs; paths and unknown names are left alone."""
    from experiments.harness import _resolve_config_names, resolve_config_name
    configs = os.path.join(ROOT, 'experiments', 'configs')
    assert resolve_config_name('sinusoid') == os.path.join(configs, 'sinusoid.py')
    assert resolve_config_name('omniglot_paper:md-paper,1') == os.path.join(configs, 'omniglot_paper.py') + ':md-paper,1'
    for value in ('experiments/configs/sinusoid.py', 'my_config.py:x', 'no_such_config'):
        assert resolve_config_name(value) == value
    assert _resolve_config_names(['p', '--config', 'sinusoid', '--config.seed=1'], 'config') == [
        'p', '--config', os.path.join(configs, 'sinusoid.py'), '--config.seed=1']


def test_a_background_thread_failure_is_one_warning_line_per_message(capsys, monkeypatch):
    """The harness's threading.excepthook: an exception escaping a thread is one line on stderr, not a traceback;
    a repeated message is written once, and a thread's SystemExit is silent (as with Python's own hook)."""
    import threading
    from experiments.harness import background_thread_warnings
    monkeypatch.setattr(threading, 'excepthook', background_thread_warnings())
    for error in (OSError(28, 'No space left on device'), OSError(28, 'No space left on device'),
                  ValueError('two\nlines'), SystemExit(3)):
        def target(error=error):
            raise error
        thread = threading.Thread(target=target)
        thread.start()
        thread.join()
    assert capsys.readouterr().err.splitlines() == [
        'warning: background thread: OSError: [Errno 28] No space left on device',
        'warning: background thread: ValueError: two lines']


_INSTALLED = r"""
import importlib.metadata, importlib.util, json, os, runpy, sys
configs = os.path.dirname(importlib.util.find_spec('md_meta_experiments.configs').origin)
print(json.dumps({
    'top_level': sorted({f.parts[0] for f in importlib.metadata.files('md-meta')
                         if f.parts[0] != '..' and not f.parts[0].endswith('.dist-info')}),
    'experiments_importable': importlib.util.find_spec('experiments') is not None,
    'origins': {name: importlib.util.find_spec(name).origin for name in sys.argv[1:]},
    'configs': {name: type(runpy.run_path(os.path.join(configs, name))['get_config']()).__name__
                for name in sorted(os.listdir(configs)) if name.endswith('.py') and name != '__init__.py'},
}))
"""


def _repository_packages() -> list:
    """The packages of md_meta/ and experiments/, named as installed (experiments/ is md_meta_experiments)."""
    names = []
    for top, installed in (('md_meta', 'md_meta'), ('experiments', 'md_meta_experiments')):
        for folder, _, files in os.walk(os.path.join(ROOT, top)):
            inner = os.path.relpath(folder, os.path.join(ROOT, top))
            if '__init__.py' in files:
                names.append('.'.join([installed] + ([] if inner == '.' else inner.split(os.sep))))
    return sorted(names)


def test_an_installed_wheel_gives_a_console_command_that_runs_from_another_folder(tmp_path):
    """pip install of md-meta's wheel into a fresh venv gives ``md-meta``; ``md-meta train --config=sinusoid``
    runs from a folder outside the repository, with the installed packages (not the checkout's). The wheel puts
    no top-level ``experiments`` into site-packages (experiments/ installs as md_meta_experiments), holds every
    package of the repository, and every installed config file loads by its path, as ml_collections loads it
    (those that build on another read it by path)."""
    src, wheels, venv, elsewhere = tmp_path / 'src', tmp_path / 'wheels', tmp_path / 'venv', tmp_path / 'elsewhere'
    run = lambda *cmd, **kw: subprocess.run(list(map(str, cmd)), capture_output=True, text=True, timeout=600, **kw)
    # a copy of what the build reads: a build/ that an older build left in the checkout would add its files
    src.mkdir()
    for name in ('setup.cfg', 'pyproject.toml', 'README.md', 'LICENSE'):
        shutil.copy(os.path.join(ROOT, name), src)
    for name in ('md_meta', 'experiments'):
        shutil.copytree(os.path.join(ROOT, name), src / name, ignore=shutil.ignore_patterns('__pycache__'))
    p = run(sys.executable, '-m', 'pip', 'wheel', '-q', '--no-deps', '-w', wheels, src)   # build deps from PyPI
    assert p.returncode == 0, p.stderr[-2000:]
    assert run(sys.executable, '-m', 'venv', venv).returncode == 0
    vpython = venv / 'bin' / 'python'
    site_dir = run(vpython, '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])').stdout.strip()
    # the dependencies from this environment (its site-packages as a plain path: its .pth files, among them an
    # editable install of this checkout, stay inactive), md-meta itself only from the wheel
    deps = [p for p in __import__('site').getsitepackages() if os.path.isdir(p)]
    with open(os.path.join(site_dir, 'md_meta_test_deps.pth'), 'w') as f:
        f.write('\n'.join(deps) + '\n')
    p = run(vpython, '-m', 'pip', 'install', '-q', '--no-deps', '--no-index', *wheels.glob('*.whl'))
    assert p.returncode == 0, p.stderr[-2000:]
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    p = run(vpython, '-c', _INSTALLED, *_repository_packages(), cwd=elsewhere, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    installed = json.loads(p.stdout)
    assert installed['top_level'] == ['md_meta', 'md_meta_experiments'], installed
    assert not installed['experiments_importable'], installed
    assert all(origin.startswith(str(venv)) for origin in installed['origins'].values()), installed['origins']
    assert 'sinusoid_mtnet.py' in installed['configs'] and set(installed['configs'].values()) == {'ConfigDict'}
    p = run(venv / 'bin' / 'md-meta', 'train', '--config=sinusoid', '--config.meta.steps=10',
            '--config.train.log_every=5', '--config.eval.num_tasks=10', '--workdir=w', cwd=elsewhere, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    assert (elsewhere / 'w' / 'results.json').exists() and '| md |' in p.stdout, p.stdout[-2000:]
