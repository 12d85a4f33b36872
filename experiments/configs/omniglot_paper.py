"""The paper's protocol (Table 1, Fig. 1) on minimal Omniglot, split by alphabet: 5-way, K = 5 inner steps
at meta-train and test, alpha = 0.01, 15 query images per class at meta-train, query = shots at
meta-val/test, meta-batch 4, Adam 1e-3 for every method, CNN4 with 64 channels (the authors' defaults for
every data set), meta-validation on 1000 fixed tasks, 1000 test tasks. Meta-test characters come from
alphabets never seen in meta-train (task.split='minimal_alphabet': meta-train Balinese, Early Aramaic,
Latin, Sanskrit, Tagalog x4 rotations; meta-val Japanese (katakana); meta-test Greek, Korean).

The argument is the variant, optionally with the shot count:

    python -m experiments.train --config=experiments/configs/omniglot_paper.py:md-paper,1 \
        --config.seed=0 --workdir=runs/omniglot_paper/md-paper-1shot-seed0

Variants: maml, anil (only the classifier head adapts: the control of any loss geometry), metasgd,
metacurvature, md-paper (the authors' blockIAF: unconstrained, exp scale, zero-initialised decoder heads),
md-monotone (md-meta's default blockIAF: bounded scale, monotone by construction), md-paper-learnable (the
paper's form with every decoder factor learnable), metakfo, and the forms of MD with a Kronecker matrix per
tensor: md-kron (the monotone map with a Kronecker-preconditioned dual step), md-kron-learnable-enc1,
md-sandwich (the monotone sandwich P g(P w)), md-kron-primal-elu and md-sandwich-primal-elu (primal start, ELU
codes, learnable heads); md-kfo (MetaKFO's nonlinear transformation as the dual step: no longer mirror descent).
1000 meta-steps, validated every 250: the CPU budget of docs/results.md (the paper trains 60000).
"""
import os
import runpy

# the config this one builds on, read by path (configs/__init__.py says why)
omniglot = runpy.run_path(os.path.join(os.path.dirname(__file__), 'omniglot.py'))

VARIANTS = {
    'maml': ('maml', {}),
    'anil': ('anil', {}),
    'metasgd': ('metasgd', {}),
    'metacurvature': ('metacurvature', {}),
    'md-paper': ('md', {'monotone': False, 'scale': 'exp', 'head_init': 'zero', 'kronecker': 'none'}),
    'md-monotone': ('md', {'monotone': True, 'scale': 'bounded', 'head_init': 'zero', 'kronecker': 'none'}),
    'md-paper-learnable': ('md', {'monotone': False, 'scale': 'exp', 'head_init': 'learnable',
                                   'kronecker': 'none'}),
    'metakfo': ('metakfo', {}),
    # MD with a Kronecker matrix per tensor (md.kronecker, docs/methods.md), the forms of the sinusoid ablation
    'md-kron': ('md', {'kronecker': 'dual_step'}),
    'md-kron-learnable-enc1': ('md', {'kronecker': 'dual_step', 'head_init': 'learnable', 'encoder_layers': 1}),
    'md-sandwich': ('md', {'kronecker': 'sandwich'}),
    'md-kron-primal-elu': ('md', {'kronecker': 'dual_step', 'start': 'primal', 'activation': 'elu',
                                  'head_init': 'learnable'}),
    'md-kfo': ('md', {'kronecker': 'kfo_step'}),
    'md-sandwich-primal-elu': ('md', {'kronecker': 'sandwich', 'start': 'primal', 'activation': 'elu',
                                      'head_init': 'learnable'}),
}


def get_config(arg='md-paper,1'):
    variant, _, shots = (arg or 'md-paper,1').partition(',')
    if variant not in VARIANTS:
        raise ValueError(f'omniglot_paper.py: unknown variant {variant!r}; choose from {sorted(VARIANTS)}')
    method, md = VARIANTS[variant]
    shots = int(shots or 1)
    c = omniglot['get_config']()   # the authors' settings: K = 5, alpha = 0.01, CNN4 64, Adam 1e-3, batch 4, ...
    c.method = method
    for k, v in md.items():
        c.md[k] = v
    c.task.data_dir = os.environ.get('OMNIGLOT_DIR', os.path.normpath(
        os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..', '..', 'shared', 'data', 'omniglot')))
    c.task.split = 'minimal_alphabet'
    c.task.source = 'zip'
    c.task.shots = shots
    c.eval.query = shots
    c.meta.steps = 1000
    c.train.eval_every = 250
    c.train.val_tasks = 1000
    c.train.checkpoint_every = 250
    return c
