r"""Where a meta-step's time goes: time per op class of a compiled step, against its roofline.

    python -m experiments.benchmark --methods=maml,md --shapes=a,b,c --profile

``profile`` runs a compiled meta-step (after two warm-up steps) ``repeats`` times under ``jax.profiler``,
reads XLA's per-kernel trace events (one per execution of a fusion or custom call, loop bodies included)
and sums their durations by class of the HLO instruction that ran (``classify``):

  network matmul      dot / convolution fusions of the network (its op_name names the Flax model)
  geometry matmul     the other dot / convolution fusions (the method's map, e.g. MD's blockIAF products)
  network elementwise the network's other fusions (batch norm, pooling, activations, their backward)
  layout copies       copy / transpose fusions (data moved to suit a matmul's layout)
  optimizer           the meta-optimizer's update (Adam: in the cond that skips non-finite steps, outside
                      the differentiated step)
  other               everything else (the geometry's elementwise work, slicing, the task mean)

For the matmul classes it also counts FLOPs from the instructions' shapes (2 x output size x contracted
size; a loop body's instructions counted each time they run, since the events are per execution) and
reports GFLOP/s against the machine's peak (given) and against ``matmul_gflops`` (a large matmul in the
same process: the roof XLA reaches here); for every class, the bytes its kernels read and write (operand
and output sizes) per second against ``stream_gbps`` (a large y = 2x + 1 in the same process). A class
near either roof cannot be made much faster by any implementation on this machine; one far below both is
bound by something else (kernel count, small shapes, cache misses). Event times are summed over the steps and divided by their number; with
several threads running kernels at once the sum can exceed the wall time (both are printed).
"""
from __future__ import annotations

import functools
import glob
import gzip
import json
import math
import os
import re
import shutil
import tempfile
import time

CLASSES = ('network matmul', 'geometry matmul', 'network elementwise', 'layout copies', 'optimizer', 'other')
MODEL_NAMES = ('CNN4', 'ResNet12', 'MLP')   # md_meta.networks' Flax modules, as they appear in op_name
_CONTROL = ('while', 'conditional', 'call', 'async-start', 'async-done')
_INSTR = re.compile(r'^\s*(?:ROOT )?%(\S+) = (\S+?)(?:\{[^}]*\})? (\S+?)\((.*)$')
_SHAPE = re.compile(r'^[a-z0-9]+\[([0-9,]*)\]')


_BYTES = {'f64': 8, 's64': 8, 'u64': 8, 'f32': 4, 's32': 4, 'u32': 4, 'bf16': 2, 'f16': 2, 's16': 2, 'u16': 2,
          's8': 1, 'u8': 1, 'pred': 1}


def _dims(shape: str) -> list:
    m = _SHAPE.match(shape)
    return [int(d) for d in m.group(1).split(',') if d] if m else []


def _bytes(shape: str) -> int:
    """Bytes of an array shape such as ``f32[4,64]{1,0}`` (0 for tuples and tokens)."""
    m = re.match(r'^([a-z0-9]+)\[', shape)
    return _BYTES.get(m.group(1), 4) * math.prod(_dims(shape)) if m else 0


def _computations(hlo: str) -> dict:
    """{computation name: [instruction lines]} of an HLO module's text."""
    comps, name = {}, None
    for line in hlo.splitlines():
        head = re.match(r'^(?:ENTRY )?%(\S+) .*\{\s*$', line)
        if head:
            name = head.group(1)
            comps[name] = []
        elif name is not None and line.strip() and line.strip() != '}':
            comps[name].append(line)
    return comps


def _matmul_flops(lines: list) -> float:
    """FLOPs of the dot / convolution instructions among ``lines`` (one fused computation)."""
    shapes, flops = {}, 0.0
    for line in lines:
        m = _INSTR.match(line)
        if not m:
            continue
        name, shape, op, rest = m.groups()
        shapes[name] = _dims(shape)
        operands = re.findall(r'%([^\s,)]+)', rest.split(')', 1)[0])
        if op == 'dot' and operands:
            lhs = shapes.get(operands[0], [])
            contract = re.search(r'lhs_contracting_dims=\{([0-9,]*)\}', rest)
            k = math.prod(lhs[int(d)] for d in contract.group(1).split(',') if d) if contract and lhs else 0
            flops += 2.0 * math.prod(shapes[name]) * k
        elif op == 'convolution' and len(operands) > 1:
            rhs = shapes.get(operands[1], [])
            out_features = shapes[name][-1] if shapes[name] else 1
            flops += 2.0 * math.prod(shapes[name]) * (math.prod(rhs) / max(out_features, 1) if rhs else 0)
    return flops


def classify(hlo: str) -> dict:
    """{instruction name: (class, FLOPs, bytes read and written per execution)} for every instruction of a
    compiled module's text (``compiled.as_text()``) that runs as a kernel; control flow (while, conditional,
    call) maps to class None."""
    comps = _computations(hlo)
    fused = set(re.findall(r' fusion\(.*?calls=%([^\s,]+)', hlo))   # kernels' bodies: not launched themselves
    out = {}
    for comp, lines in comps.items():
        if comp in fused:
            continue
        shapes = {}
        for line in lines:
            m = _INSTR.match(line)
            if m:
                shapes[m.group(1)] = m.group(2)
        for line in lines:
            m = _INSTR.match(line)
            if not m:
                continue
            name, shape, op, rest = m.groups()
            if op in ('parameter', 'constant', 'get-tuple-element', 'tuple', 'bitcast'):
                continue                 # no kernel
            if op in _CONTROL:
                out[name] = (None, 0.0, 0)   # its event spans its body's kernels, which are counted themselves
                continue
            called = re.search(r'calls=%([^\s,]+)', rest)
            body = comps.get(called.group(1), []) if called else [line]
            flops = _matmul_flops(body) if op != 'dot' and op != 'convolution' else _matmul_flops(
                [l for l in lines if l is line or not re.search(r'= \S+ (dot|convolution)\(', l)])
            op_name = re.search(r'op_name="([^"]*)"', line)
            op_name = op_name.group(1) if op_name else ''
            network = any(f'({m})' in op_name or f'/{m}/' in op_name or f'({m}' in op_name for m in MODEL_NAMES)
            if flops > 0:
                cls = 'network matmul' if network else 'geometry matmul'
            elif name.startswith(('copy', 'transpose')) or op in ('copy', 'transpose'):
                cls = 'layout copies'
            elif network:
                cls = 'network elementwise'
            elif '/cond/' in op_name and 'jvp(' not in op_name:   # not a cond inside the differentiated step
                cls = 'optimizer'
            else:
                cls = 'other'
            operands = re.findall(r'%([^\s,)]+)', rest.split(')', 1)[0])
            nbytes = _bytes(shape) + sum(_bytes(shapes.get(o, '')) for o in operands)
            out[name] = (cls, flops, nbytes)
    return out


def trace_events(fn, repeats: int) -> tuple:
    """Runs ``fn`` (one meta-step, blocking) ``repeats`` times under jax.profiler: ([(hlo_op, duration us)],
    wall seconds per step)."""
    import jax
    log_dir = tempfile.mkdtemp(prefix='md_meta_profile_')
    try:
        t = time.perf_counter()
        with jax.profiler.trace(log_dir, create_perfetto_trace=True):
            for _ in range(repeats):
                fn()
        wall = (time.perf_counter() - t) / repeats
        path = sorted(glob.glob(os.path.join(log_dir, '**', 'perfetto_trace.json.gz'), recursive=True))[-1]
        with gzip.open(path) as f:
            data = json.load(f)
    finally:
        shutil.rmtree(log_dir, ignore_errors=True)
    events = data['traceEvents'] if isinstance(data, dict) else data
    return [(e['args']['hlo_op'], float(e.get('dur', 0.0))) for e in events
            if e.get('ph') == 'X' and 'hlo_op' in e.get('args', {})], wall


def _best_seconds(fn, arg, runs: int = 5) -> float:
    """Best wall time of ``runs`` calls of the jitted ``fn(arg)`` after one warm-up call."""
    import jax
    f = jax.jit(fn)
    jax.block_until_ready(f(arg))
    best = float('inf')
    for _ in range(runs):
        t = time.perf_counter()
        jax.block_until_ready(f(arg))
        best = min(best, time.perf_counter() - t)
    return best


@functools.cache
def stream_gbps() -> float:
    """This machine's memory bandwidth as XLA sees it: y = 2 x + 1 on 2^26 float32 (256 MiB in, 256 out),
    best of 5; measured once per process."""
    import jax.numpy as jnp
    x = jnp.ones((1 << 26,), jnp.float32)
    return 2 * x.nbytes / _best_seconds(lambda v: 2.0 * v + 1.0, x) / 1e9


@functools.cache
def matmul_gflops() -> float:
    """The matmul roof as XLA reaches it on this machine: a 2048 x 2048 float32 product, best of 5; measured
    once per process."""
    import jax.numpy as jnp
    return 2 * 2048 ** 3 / _best_seconds(lambda m: m @ m, jnp.ones((2048, 2048), jnp.float32)) / 1e9


def profile(compiled, args, repeats: int, peak_gflops: float) -> dict:
    """Per-class milliseconds, launches and GFLOP per step of a compiled meta-step ``compiled(*args)``
    (returning (meta, opt_state, metrics), the trainer's step), the wall time and the launches per step (each
    execution of a kernel: a loop body's once per iteration, unlike ``benchmark.count_kernels``)."""
    import jax
    classes = classify(compiled.as_text())
    state = list(args)

    def step():
        out = compiled(*state)
        jax.block_until_ready(out)
        state[0], state[1] = out[0], out[1]

    for _ in range(2):
        step()
    events, wall = trace_events(step, repeats)
    rows = {c: {'ms': 0.0, 'launches': 0, 'gflop': 0.0, 'gb': 0.0} for c in CLASSES}
    unknown = 0.0
    for op, dur in events:
        cls, flops, nbytes = classes.get(op, ('other', 0.0, 0))
        if cls is None:
            continue
        if op not in classes:
            unknown += dur
        r = rows[cls]
        r['ms'] += dur / 1000.0 / repeats
        r['launches'] += 1 / repeats
        r['gflop'] += flops / 1e9 / repeats
        r['gb'] += nbytes / 1e9 / repeats
    for r in rows.values():
        r['gflops'] = r['gflop'] / (r['ms'] / 1000.0) if r['ms'] > 0 and r['gflop'] > 0 else None
        r['pct_peak'] = 100.0 * r['gflops'] / peak_gflops if r['gflops'] else None
        r['pct_matmul'] = 100.0 * r['gflops'] / matmul_gflops() if r['gflops'] else None
        r['gbps'] = r['gb'] / (r['ms'] / 1000.0) if r['ms'] > 0 and r['gb'] > 0 else None
    return {'wall_ms': 1000.0 * wall, 'events_ms': sum(r['ms'] for r in rows.values()),
            'launches': round(sum(r['launches'] for r in rows.values())),
            'unmatched_ms': unknown / 1000.0 / repeats, 'stream_gbps': stream_gbps(), 'matmul_gflops': matmul_gflops(),
            'peak_gflops': peak_gflops, 'classes': rows}


def table(method: str, shape: str, p: dict) -> str:
    lines = [f"### {method}, shape ({shape}): wall {p['wall_ms']:.0f} ms per step under the profiler, kernel "
             f"events {p['events_ms']:.0f} ms, {p['launches']} launches; roofs: peak {p['peak_gflops']:.0f} GFLOP/s (given), matmul "
             f"{p['matmul_gflops']:.0f} GFLOP/s and stream {p['stream_gbps']:.1f} GB/s (measured)",
             '', '| op class | ms / step | % of events | launches / step | GFLOP / step | GFLOP/s | % peak | '
             '% matmul roof | GB moved / step | GB/s | % stream |',
             '| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |']
    total = max(p['events_ms'], 1e-9)
    for c in CLASSES:
        r = p['classes'][c]
        g = lambda v, f: (f % v) if v else '-'
        lines.append(f"| {c} | {r['ms']:.1f} | {100 * r['ms'] / total:.0f} | {r['launches']:.0f} | "
                     f"{g(r['gflop'], '%.2f')} | {g(r['gflops'], '%.0f')} | {g(r['pct_peak'], '%.0f')} | "
                     f"{g(r['pct_matmul'], '%.0f')} | {g(r['gb'], '%.2f')} | {g(r['gbps'], '%.1f')} | "
                     f"{g(r['gbps'] and 100 * r['gbps'] / p['stream_gbps'], '%.0f')} |")
    return '\n'.join(lines)
