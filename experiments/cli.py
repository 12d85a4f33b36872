"""The ``md-meta`` console script: ``md-meta COMMAND [flags]`` runs the command's module as
``python -m experiments.COMMAND [flags]`` does in the repository.

    md-meta train --config=sinusoid --config.method=maml --workdir=runs/sin-maml
    md-meta evaluate --workdir=runs/sin-maml
    md-meta report --workdirs=runs/a,runs/b

Installed with md-meta (setup.cfg, ``[options.entry_points]``; this folder installs as the package
``md_meta_experiments``), it works from any folder; ``--config`` takes a file path or the name of a config of
the installed configs folder (``harness.resolve_config_name``).
"""
from __future__ import annotations

import runpy
import sys

COMMANDS = {
    'train': 'meta-train, evaluate and write results (experiments.train)',
    'evaluate': 'evaluate a trained run on new tasks (experiments.evaluate)',
    'report': "the paper's Table 1 from evaluated runs (experiments.report)",
    'plot_convergence': "the paper's Fig. 1 from trained runs (experiments.plot_convergence)",
    'compare': 'every method on sinusoid, 5/10/20 shots (experiments.compare)',
    'download': 'fetch and verify data sets (experiments.download)',
    'benchmark': 'speed and memory of the meta-step (experiments.benchmark)',
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    return 'usage: md-meta COMMAND [flags]  (md-meta COMMAND --help for its flags)\n\n' + '\n'.join(
        f'  {name.ljust(width)}  {what}' for name, what in COMMANDS.items())


def main(argv=None) -> None:
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] in ('-h', '--help', 'help'):
        print(usage(), file=sys.stdout if len(argv) >= 2 else sys.stderr)
        raise SystemExit(0 if len(argv) >= 2 else 2)
    command = argv[1]
    if command not in COMMANDS:
        print(f'error: unknown command {command!r}\n\n{usage()}', file=sys.stderr)
        raise SystemExit(2)
    sys.argv = [f'md-meta {command}'] + argv[2:]
    runpy.run_module(f'{__package__}.{command}', run_name='__main__', alter_sys=True)


if __name__ == '__main__':
    main()
