"""The process harness of every command: process flags, one-line errors, config files named or by path."""
import os

from absl import flags

def define_process_flags() -> None:
    """``--host_memory`` and ``--compilation_cache``, shared by every entry point. Defined by ``run`` (once per
    process), never at import: no module that tests, notebooks or the library import defines a flag, so any set
    of modules imports into one interpreter."""
    if 'host_memory' in flags.FLAGS:
        return
    flags.DEFINE_enum(
        'host_memory', 'retain', ['retain', 'system'],
        "'retain': freed host memory stays mapped for the next meta-step (glibc; saves XLA:CPU ~1M page faults "
        "per CNN4 step, md_meta.host_memory); 'system': malloc's defaults.")
    flags.DEFINE_string(
        'compilation_cache', os.path.join('~', '.cache', 'md_meta', 'xla'),
        "Directory of JAX's persistent compilation cache, one subdirectory per kind of CPU (the entries are native "
        "code): a run that compiles a program compiled before loads it instead (MD's CNN4 meta-step: 1 s, not ~40 "
        "s); '' turns it off. Unless given, $JAX_COMPILATION_CACHE_DIR (JAX's own setting) takes its place, used as "
        "it is. The benchmark and measure_overhead never use a cache: they time compilation.")


def prepare_process(compilation_cache: bool = True) -> None:
    """The first call of every entry point's main(), before any JAX computation: quiet library logs, host
    memory per ``--host_memory``, and the persistent compilation cache per ``--compilation_cache`` (off
    where ``compilation_cache=False``: entry points that time compilation)."""
    from md_meta import host_memory
    quiet_library_logs()
    host_memory.configure(flags.FLAGS.host_memory)
    import jax
    cache = flags.FLAGS['compilation_cache']
    if not compilation_cache or not cache.value:
        jax.config.update('jax_enable_compilation_cache', False)
    elif cache.present or not os.environ.get('JAX_COMPILATION_CACHE_DIR'):
        jax.config.update('jax_compilation_cache_dir', compilation_cache_dir(cache.value))


def compilation_cache_dir(base: str) -> str:
    """``base``/<machine>-<hash of the CPU's model and features>: XLA:CPU's cached executables are code for
    one instruction set, and a cache on a shared home directory must not hand one machine's code to another."""
    import hashlib
    import platform
    cpu = platform.processor()
    try:
        with open('/proc/cpuinfo') as f:
            info = f.read()
        cpu = '\n'.join(next((l for l in info.splitlines() if l.startswith(k)), '') for k in ('model name', 'flags'))
    except OSError:
        pass
    return os.path.join(os.path.expanduser(base),
                        f'{platform.machine()}-{hashlib.sha256(cpu.encode()).hexdigest()[:12]}')


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


def background_thread_warnings():
    """A ``threading.excepthook``: an exception escaping a thread other than the main one (a library's writer or
    I/O thread failing, e.g. on a full disk) becomes one line on stderr, ``warning: background thread:
    <ExceptionType: message>``, once per distinct message, instead of a traceback."""
    import sys
    import traceback
    seen = set()

    def hook(args):
        if issubclass(args.exc_type, SystemExit):   # as threading's own hook: a thread's sys.exit() is silent
            return
        line = ' '.join(''.join(traceback.format_exception_only(args.exc_type, args.exc_value)).split())[:300]
        if line not in seen:
            seen.add(line)
            print(f'warning: background thread: {line}', file=sys.stderr, flush=True)
    return hook


def run(main, argv=None) -> None:
    """``app.run(main)`` where bad flags or config files, md-meta's ConfigError/DataError/WorkdirError, and
    OS errors (full disk, no permission) end with one line on stderr and exit status 2; Ctrl-C exits 130, a
    preempted training run (md_meta.training.Preempted, SIGTERM/SIGHUP) 128 + the signal's number."""
    import errno
    import sys
    import threading

    from absl import app

    define_process_flags()

    def fatal(message, status=EXIT_USAGE):
        """One line, then exit at once: no atexit handlers or library threads adding tracebacks."""
        import os
        print('error: ' + ' '.join(str(message).split()), file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(status)

    def guarded(argv):
        from md_meta.config import ConfigError
        from md_meta.workdirs import WorkdirError
        threading.excepthook = background_thread_warnings()
        try:
            return main(argv)
        except KeyboardInterrupt as e:   # Ctrl-C, or a preemption (md_meta.training.Preempted: its own status)
            if hasattr(e, 'status'):
                fail(e, e.status)
            print('interrupted', file=sys.stderr, flush=True)
            raise SystemExit(EXIT_INTERRUPTED)
        except (ConfigError, WorkdirError) as e:   # DataError is a ConfigError
            fail(e)
        except OSError as e:
            what = e.strerror or str(e)
            where = f' ({e.filename})' if e.filename else ''
            hint = '; free some space and rerun (a training run resumes from its last checkpoint)' \
                if e.errno == errno.ENOSPC else ''
            fatal(f'{what}{where}{hint}')

    app.run(guarded, argv=argv, flags_parser=parse_flags)


def resolve_config_name(value: str) -> str:
    """``--config``'s value with a config name (``sinusoid``, ``omniglot_paper:md-paper,1``) replaced by the path
    of that file of ``experiments/configs`` (so that an installed md-meta runs from any folder); a path, or a
    name that is no config there, is returned as it is."""
    name, sep, arg = value.partition(':')
    if not name or '/' in name or os.sep in name or name.endswith('.py') or os.path.exists(name):
        return value
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configs', name + '.py')
    return path + sep + arg if os.path.isfile(path) else value


def _resolve_config_names(argv: list, flag: str) -> list:
    """argv with ``--FLAG=NAME[:ARG]`` / ``--FLAG NAME[:ARG]`` resolved by ``resolve_config_name``."""
    out, i = list(argv), 0
    while i < len(out):
        if out[i].startswith(f'--{flag}='):
            out[i] = f'--{flag}=' + resolve_config_name(out[i][len(flag) + 3:])
        elif out[i] == f'--{flag}' and i + 1 < len(out):
            out[i + 1] = resolve_config_name(out[i + 1])
            i += 1
        i += 1
    return out


def define_config_file(name: str, default: str, help_string: str):
    """ml_collections' DEFINE_config_file, whose overrides (``--config.a.b=v``) are resolved when the flag
    is defined (in the entry point's ``__main__`` block): an unknown field there ends with one line (exit
    status 2), not a traceback."""
    import sys
    from ml_collections import config_flags
    sys.argv = _resolve_config_names(sys.argv, name)   # config names of experiments/configs, from any folder
    try:
        return config_flags.DEFINE_config_file(name, default, help_string)
    except Exception as e:  # noqa: BLE001
        fail(_flag_error_line(e))
