"""Same-machine yardstick: a second-order CNN4 MAML meta-step in plain PyTorch, for comparing md-meta's
benchmark (experiments.benchmark) with PyTorch on the machine at hand. NOT the paper's reference code
(torchmeta, not in this repo): the same computation written directly -- functional conv -> batch norm on
the current batch -> ReLU -> 2x2 max-pool, four times, then a linear layer; K inner SGD steps with
autograd.grad(create_graph=True), one task after another as the reference does; mean query loss; backward;
Adam. Random episodes of the benchmark's shapes (5-way 1-shot, 15 query).

    pip install torch   # not a dependency of md-meta; a separate venv is fine
    python experiments/studies/torch_baseline.py a 5     # shape a|b|c, timed steps (after one warm-up step)
"""
import statistics
import sys
import time

import torch
import torch.nn.functional as F
torch.set_num_threads(2)
shape = sys.argv[1]
tasks, K, hw, cin = {'a': (4, 5, 28, 1), 'b': (4, 5, 84, 3), 'c': (32, 1, 28, 1)}[shape]
ways, shots, query, alpha = 5, 1, 15, 0.4
g = torch.Generator().manual_seed(0)
params = []
c = cin
for i in range(4):
    params += [torch.randn(64, c, 3, 3, generator=g) * 0.1, torch.zeros(64), torch.ones(64), torch.zeros(64)]
    c = 64
feat = 64 * ((hw // 16) ** 2)
params += [torch.randn(ways, feat, generator=g) * 0.1, torch.zeros(ways)]
params = [p.requires_grad_() for p in params]
opt = torch.optim.Adam(params, 1e-3)

def forward(x, p):
    for i in range(4):
        w, b, s, o = p[4 * i:4 * i + 4]
        x = F.conv2d(x, w, b, padding=1)
        x = F.batch_norm(x, None, None, s, o, training=True)
        x = F.max_pool2d(F.relu(x), 2)
    return F.linear(x.flatten(1), p[16], p[17])

xs = torch.randn(tasks, ways * shots, cin, hw, hw, generator=g); ys = torch.arange(ways).repeat(shots)
xq = torch.randn(tasks, ways * query, cin, hw, hw, generator=g); yq = torch.arange(ways).repeat(query)

def step():
    opt.zero_grad()
    total = 0.
    for t in range(tasks):
        fast = params
        for _ in range(K):
            loss = F.cross_entropy(forward(xs[t], fast), ys)
            grads = torch.autograd.grad(loss, fast, create_graph=True)
            fast = [p - alpha * gr for p, gr in zip(fast, grads)]
        qloss = F.cross_entropy(forward(xq[t], fast), yq) / tasks
        qloss.backward()
        total += qloss.item()
    opt.step()
    return total

step()
ts = []
for _ in range(int(sys.argv[2]) if len(sys.argv) > 2 else 3):
    t = time.perf_counter(); step(); ts.append(time.perf_counter() - t)
print(f'torch {torch.__version__} MAML ({shape}) threads {torch.get_num_threads()}: median {statistics.median(ts):.3f} s min {min(ts):.3f}  {[round(x, 3) for x in ts]}', flush=True)
