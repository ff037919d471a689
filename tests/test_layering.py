"""The layering contract (pyproject.toml [tool.importlinter], docs/architecture.md) holds, and no
mmjax module imports another in a cycle, function-local imports included."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import grimp

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_layering_contract_is_kept():
  """An upward import fails here with the import named (`lint-imports` output)."""
  lint = pathlib.Path(sys.executable).with_name('lint-imports')
  proc = subprocess.run([str(lint), '--no-cache'], cwd=REPO, capture_output=True, text=True,
                        check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
  assert 'Contracts: 1 kept, 0 broken.' in proc.stdout


def _cycles(graph) -> list[list[str]]:
  """Strongly connected components of more than one module (Tarjan)."""
  index, low, stack, on, out = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on.add(v)
    for w in graph.find_modules_directly_imported_by(v):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        out.append(sorted(comp))

  for module in sorted(graph.modules):
    if module not in index:
      visit(module)
  return out


def test_no_import_cycles():
  graph = grimp.build_graph('mmjax', cache_dir=None)
  assert _cycles(graph) == []


def test_no_model_kind_dispatch_outside_the_registry():
  """Only mmjax/kinds decides what a model kind needs."""
  pattern = re.compile(r"model\.kind\s*[!=]=|kind\s*==\s*'(two_tower|llm_embedder)'|"
                       r'isinstance\([^)]*(ModelConfig|LLMEmbedderConfig|TwoTower|LLMEmbedder)\)')
  offenders = [f'{p.relative_to(REPO)}:{i}' for p in (REPO / 'mmjax').rglob('*.py')
               if 'kinds' not in p.parts
               for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
  assert offenders == []
