"""Entry points (absl apps) and config files of md-meta."""
from absl import flags

_HOST_MEMORY = flags.DEFINE_enum(
    'host_memory', 'retain', ['retain', 'system'],
    "'retain': freed host memory stays mapped for the next meta-step (glibc; saves XLA:CPU ~1M page faults "
    "per CNN4 step, md_meta.host_memory); 'system': malloc's defaults.")


def prepare_process() -> None:
    """The first call of every entry point's main(), before any JAX computation: quiet library logs and
    host memory per ``--host_memory``."""
    from md_meta import host_memory
    quiet_library_logs()
    host_memory.configure(_HOST_MEMORY.value)


def quiet_library_logs() -> None:
    """absl apps log at INFO by default, and orbax logs several INFO lines per checkpoint save; keep
    the console to md-meta's own progress lines unless the user asked for ``--verbosity``."""
    from absl import logging
    if not flags.FLAGS['verbosity'].present:
        logging.set_verbosity(logging.WARNING)


# ----------------------------------------------------------------------------- one-line errors
EXIT_USAGE = 2         # bad flags, config, data or workdir
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT)


def fail(message: str, status: int = EXIT_USAGE):
    """Prints ``error: <message>`` (one line) on stderr and exits with ``status``."""
    import sys
    print('error: ' + ' '.join(str(message).split()), file=sys.stderr, flush=True)
    raise SystemExit(status)


def _flag_error_line(e: BaseException) -> str:
    """One line for an error raised while parsing flags (ml_collections embeds tracebacks)."""
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    if isinstance(e, (AttributeError, KeyError)):   # ml_collections: an override of an unknown field
        hint = f' ({lines[1]})' if len(lines) > 1 else ''
        return f'unknown config field {lines[0] if lines else e!r} in a --config.* flag{hint}'
    return lines[-1] if lines else type(e).__name__


def parse_flags(argv):
    """absl's flag parsing with one-line errors (exit status 2) instead of tracebacks."""
    try:
        return flags.FLAGS(argv)
    except Exception as e:  # noqa: BLE001 - flags.Error, and whatever a config file raises
        fail(_flag_error_line(e))


def run(main, argv=None) -> None:
    """``app.run(main)`` where bad flags or config files, md-meta's ConfigError/DataError/WorkdirError, and
    OS errors (full disk, no permission) end with one line on stderr and exit status 2; Ctrl-C exits 130."""
    import errno
    import sys

    from absl import app

    def guarded(argv):
        from md_meta.config import ConfigError
        from md_meta.workdirs import WorkdirError
        try:
            return main(argv)
        except KeyboardInterrupt:
            print('interrupted', file=sys.stderr, flush=True)
            raise SystemExit(EXIT_INTERRUPTED)
        except (ConfigError, WorkdirError) as e:   # DataError is a ConfigError
            fail(e)
        except OSError as e:
            what = e.strerror or str(e)
            where = f' ({e.filename})' if e.filename else ''
            hint = '; free some space and rerun (a training run resumes from its last checkpoint)' \
                if e.errno == errno.ENOSPC else ''
            fail(f'{what}{where}{hint}')

    app.run(guarded, argv=argv, flags_parser=parse_flags)


def define_config_file(name: str, default: str, help_string: str):
    """ml_collections' DEFINE_config_file, whose overrides (``--config.a.b=v``) are resolved when the flag
    is defined, at import: an unknown field there ends with one line (exit status 2), not a traceback."""
    from ml_collections import config_flags
    try:
        return config_flags.DEFINE_config_file(name, default, help_string)
    except Exception as e:  # noqa: BLE001
        fail(_flag_error_line(e))
