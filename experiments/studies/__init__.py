"""Studies behind docs/ and its figures, run from the repository (``python -m experiments.studies.NAME``):

    ablate_blockiaf      the blockIAF ablation on sinusoid: variants x seeds x shots via experiments.compare
    summarise_runs       a seeded grid of runs as a table with t-intervals, validation curves and Fig. 1 curves
    lake_table           errors on Lake-style one-shot runs from evaluation.json files, paired by run and by seed
    step_factors         the step matrix S a trained run learned: its diagonal, its mixing within and between tensors
    crosscheck_reference MD, MetaCurvature and Meta-SGD against the authors' PyTorch code (needs torch, torchmeta)
    authors_code         loads the authors' code from a checkout (shared by crosscheck_reference and the yardstick)
    authors_yardstick    the authors' train loop timed per meta-step on the benchmark's episodes (needs torch)
    torch_baseline       a plain PyTorch second-order MAML step, a same-machine yardstick (a script; needs torch)
    measure_overhead     the harness's share of training time (checkpoints, validation, logging)
    profile_step         time per op class of a compiled step against its roofline (``benchmark --profile``)
    step_fingerprint     sha256 of two meta-steps of every method and MD form: a refactor must leave it unchanged
    gpu_benchmark.sh     the benchmark suite on a GPU host, in bounded stages
"""
