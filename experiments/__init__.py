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
