"""Entry points (absl apps) and config files of md-meta."""


def quiet_library_logs() -> None:
    """absl apps log at INFO by default, and orbax logs several INFO lines per checkpoint save; keep
    the console to md-meta's own progress lines unless the user asked for ``--verbosity``."""
    from absl import flags, logging
    if not flags.FLAGS['verbosity'].present:
        logging.set_verbosity(logging.WARNING)
