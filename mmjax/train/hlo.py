"""Reading a compiled HLO module's text: its collectives (count and bytes per step, loops
unrolled by their trip counts) and its largest buffers (used by mmjax.train.aot's report)."""

from __future__ import annotations

import re
from typing import Any

import numpy as np

COLLECTIVES = ('all-gather', 'reduce-scatter', 'all-reduce', 'collective-permute', 'all-to-all')
# Ops whose called computations run inside them: their values live in the op, not in HBM.
_FUSING_OPS = ('fusion', 'reduce', 'all-reduce', 'reduce-window', 'scatter', 'sort', 'map',
               'select-and-scatter', 'reduce-scatter')
_DTYPE_BYTES = {'pred': 1, 's4': 0.5, 'u4': 0.5, 's8': 1, 'u8': 1, 's16': 2, 'u16': 2, 'f16': 2,
                'bf16': 2, 's32': 4, 'u32': 4, 'f32': 4, 's64': 8, 'u64': 8, 'f64': 8, 'c64': 8,
                'c128': 16}
_ARRAY = re.compile(r'\b([a-z]+\d*(?:e\d+m\d+\w*)?)\[([\d,]*)\]')
_INSTR = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*')
_HEADER = re.compile(r'^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$')
_CALLED = re.compile(r'\b(?:calls|to_apply|body|condition|true_computation|false_computation)='
                     r'%?([\w.\-]+)')
_BRANCHES = re.compile(r'branch_computations=\{([^}]*)\}')
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')


def _array_bytes(text: str) -> list[int]:
  out = []
  for dtype, dims in _ARRAY.findall(text):
    size = _DTYPE_BYTES.get(dtype, 1 if dtype.startswith('f8') else None)
    if size is not None:
      out.append(int(np.prod([int(d) for d in dims.split(',') if d] or [1]) * size))
  return out


def _split_instruction(line: str) -> tuple[str, str, str, str] | None:
  """(name, result shape, opcode, rest) of one HLO instruction line."""
  m = _INSTR.match(line)
  if not m:
    return None
  rest = line[m.end():]
  if rest.startswith('('):  # A tuple shape: up to its matching parenthesis.
    depth = 0
    for i, ch in enumerate(rest):
      depth += ch == '('
      depth -= ch == ')'
      if depth == 0:
        break
    shape, rest = rest[:i + 1], rest[i + 1:].lstrip()
  else:
    shape, _, rest = rest.partition(' ')
  opcode, _, args = rest.partition('(')
  return m.group(1), shape, opcode.strip(), args


def _operands(args: str) -> list[str]:
  return re.findall(r'%([\w.\-]+)', args.split(')')[0])


def _trip_count(args: str, comps, roots, instrs) -> int | None:
  """A while loop's trip count: XLA:TPU drops `known_trip_count` from the compiled module, so it
  is read from the loop itself (`i < N` in the condition, `i`'s initial constant in the init;
  jax's loops count by one)."""
  trip = _TRIP.search(args)
  if trip:
    return int(trip.group(1))
  cond, init = re.search(r'condition=%?([\w.\-]+)', args), _operands(args)
  if not cond or cond.group(1) not in comps or len(init) != 1 or init[0] not in instrs:
    return None
  body = {name: (opcode, a) for name, _, opcode, a in comps[cond.group(1)]}
  root = roots.get(cond.group(1))
  if root is None or root[2] != 'compare' or 'direction=LT' not in root[3]:
    return None
  lhs, rhs = (_operands(root[3]) + ['', ''])[:2]
  if body.get(rhs, ('',))[0] != 'constant' or body.get(lhs, ('',))[0] != 'get-tuple-element':
    return None
  index = re.search(r'index=(\d+)', body[lhs][1])
  start = instrs[init[0]]
  if not index or start[0] != 'tuple':
    return None
  elements = _operands(start[1])
  first = instrs.get(elements[int(index.group(1))]) if int(index.group(1)) < len(elements) \
      else None
  while first and first[0] in ('copy', 'bitcast') and _operands(first[1]):
    first = instrs.get(_operands(first[1])[0])
  try:
    limit = int(body[rhs][1].split(')')[0])
    begin = int(first[1].split(')')[0]) if first and first[0] == 'constant' else None
  except ValueError:
    return None
  return None if begin is None else max(limit - begin, 0)


def parse_hlo(text: str) -> dict[str, Any]:
  """The collectives of a compiled HLO module (count and bytes, each weighted by how often its
  computation runs: a while loop's body by its trip count) and its largest values (results of
  ops outside fusions, i.e. buffers).

  An op's bytes are the larger of its inputs and outputs (per chip, all arrays of a combined
  op): the gathered result of an all-gather, the input of a reduce-scatter. An async pair counts
  once.
  Collectives inside a conditional's branches run on some steps only (e.g. the health
  statistics of log steps): they are tallied apart, in `conditional_collectives`.
  """
  comps, roots, entry = _computations(text)
  runs, inner, unknown_trips = _run_counts(comps, roots, entry)
  shapes = {name: shape for body in comps.values() for name, shape, _, _ in body}
  tally = {False: {op: {'count': 0, 'bytes': 0} for op in COLLECTIVES},
           True: {op: {'count': 0, 'bytes': 0} for op in COLLECTIVES}}
  values = []
  for (comp, conditional), times in runs.items():
    for name, shape, opcode, args in comps[comp]:
      base = opcode.removesuffix('-start')
      if base in COLLECTIVES and not opcode.endswith('-done'):
        # XLA:TPU's reduce-scatter is a fusion named all-reduce-scatter around an all-reduce.
        if base == 'all-reduce' and comp.startswith('all-reduce-scatter'):
          base = 'reduce-scatter'
        inputs = sum(_array_bytes(' '.join(shapes.get(o, '') for o in _operands(args))))
        outputs = sum(_array_bytes(shape))
        if opcode.endswith('-start'):  # Its result tuple holds the operands and u32[] contexts.
          outputs -= inputs + 4 * shape.count('u32[]')
        tally[conditional][base]['count'] += times
        tally[conditional][base]['bytes'] += times * max(inputs, outputs)
      if comp not in inner and opcode not in ('parameter', 'get-tuple-element', 'tuple',
                                              'bitcast', 'constant'):
        values.append((max(_array_bytes(shape) or [0]), name, shape.split('{')[0]))
  return {'collectives': tally[False], 'conditional_collectives': tally[True],
          'largest_values': _largest(values), 'loops_without_trip_count': unknown_trips}


def _computations(text: str):
  """({computation: [(name, shape, opcode, args)]}, {computation: its ROOT instruction}, the
  ENTRY computation's name)."""
  comps: dict[str, list[tuple[str, str, str, str]]] = {}
  roots: dict[str, tuple[str, str, str, str]] = {}
  entry, current = None, None
  for line in text.splitlines():
    if current is None:
      m = _HEADER.match(line)
      if m and '=' not in line.split('(')[0]:
        current = m.group(1)
        comps[current] = []
        if line.startswith('ENTRY'):
          entry = current
      continue
    if line.strip() == '}':
      current = None
      continue
    instr = _split_instruction(line)
    if instr:
      comps[current].append(instr)
      if line.lstrip().startswith('ROOT'):
        roots[current] = instr
  return comps, roots, entry


def _run_counts(comps, roots, entry):
  """({(computation, inside a conditional): runs per step}, the computations inside an op
  (fusions, reducers: their values never reach HBM), the number of loops of unknown trips)."""
  instrs = {name: (opcode, args) for body in comps.values() for name, _, opcode, args in body}
  runs: dict[tuple[str, bool], int] = {}
  inner: set[str] = set()
  unknown_trips = 0

  def visit(comp: str, times: int, conditional: bool) -> None:
    nonlocal unknown_trips
    runs[comp, conditional] = runs.get((comp, conditional), 0) + times
    for name, _, opcode, args in comps.get(comp, ()):
      if name.startswith('async-collective-done'):
        continue  # XLA:TPU's async collective fusions: the start's copy of the op is counted.
      called = _CALLED.findall(args)
      for group in _BRANCHES.findall(args):
        called += [c.strip().lstrip('%') for c in group.split(',')]
      factor = 1
      if opcode == 'while':
        trip = _trip_count(args, comps, roots, instrs)
        unknown_trips += trip is None
        factor = 1 if trip is None else trip
      for c in called:
        if c in comps:
          if opcode in _FUSING_OPS:
            inner.add(c)
          visit(c, times * factor, conditional or opcode == 'conditional')

  if entry is not None:
    visit(entry, 1, False)
  return runs, inner, unknown_trips


def _largest(values: list[tuple[int, str, str]], n: int = 8) -> list[dict[str, Any]]:
  largest, seen = [], set()
  for size, name, shape in sorted(values, reverse=True):
    if name not in seen and len(largest) < n:
      seen.add(name)
      largest.append({'name': name, 'shape': shape, 'bytes': size})
  return largest
