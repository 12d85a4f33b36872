"""The entry points' package (experiments/__init__.py): flags are defined when a command runs, never at import."""
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
