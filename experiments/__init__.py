"""md-meta's commands (absl apps: ``python -m experiments.COMMAND``, or ``md-meta COMMAND`` installed), their
config files (configs/), the process harness they share (harness.py) and the studies behind docs/ (studies/)."""
