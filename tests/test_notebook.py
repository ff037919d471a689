"""The colab/ notebooks run end to end in a fresh kernel: tiny towers, a few steps, on CPU.

papermill is not a dependency, so parameters are injected the way it does it by hand: the source
of the cell tagged `parameters` is replaced. The kernel is this interpreter (a temporary
kernelspec pointing at sys.executable), with one CPU device and this checkout on its path.
"""

import json
import os
import pathlib
import re
import sys

import pytest

nbformat = pytest.importorskip('nbformat')
nbclient = pytest.importorskip('nbclient')
pytest.importorskip('ipykernel')
pytest.importorskip('matplotlib')

from jupyter_client.kernelspec import KernelSpecManager  # noqa: E402
from jupyter_client.manager import AsyncKernelManager  # noqa: E402

from mmjax.data import demo, tokenizer as tokenizer_lib  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / 'colab' / 'quickstart.ipynb'
KERNEL = 'mmjax-test'


def kernel_manager(tmp_path: pathlib.Path) -> AsyncKernelManager:
  """A kernel manager whose only kernelspec runs ipykernel with this interpreter."""
  spec_dir = tmp_path / 'kernels' / KERNEL
  spec_dir.mkdir(parents=True)
  (spec_dir / 'kernel.json').write_text(json.dumps({
      'argv': [sys.executable, '-m', 'ipykernel_launcher', '-f', '{connection_file}'],
      'display_name': 'mmjax test', 'language': 'python'}))
  specs = KernelSpecManager(kernel_dirs=[str(spec_dir.parent)])
  return AsyncKernelManager(kernel_name=KERNEL, kernel_spec_manager=specs)


def kernel_env() -> dict[str, str]:
  env = dict(os.environ)
  # One CPU device, as a notebook user has (conftest simulates 8 for this process).
  flags = re.sub(r'--xla_force_host_platform_device_count=\S+', '', env.get('XLA_FLAGS', ''))
  env['XLA_FLAGS'] = flags.strip()
  env['JAX_PLATFORMS'] = 'cpu'
  env['MPLBACKEND'] = 'module://matplotlib_inline.backend_inline'  # Figures as image/png.
  env['PYTHONPATH'] = os.pathsep.join(filter(None, [str(REPO), env.get('PYTHONPATH')]))
  return env


def execute(notebook: pathlib.Path, params: dict, tmp_path: pathlib.Path) -> list:
  """Runs `notebook` with its `parameters` cell replaced by `params`; returns every output."""
  nb = nbformat.read(notebook, as_version=4)
  cells = [c for c in nb.cells if 'parameters' in c.metadata.get('tags', [])]
  assert len(cells) == 1, 'the notebook needs exactly one cell tagged "parameters"'
  assert all(re.search(rf'^{k} = ', cells[0].source, re.M) for k in params), cells[0].source
  cells[0].source = '\n'.join(f'{k} = {v!r}' for k, v in params.items())
  assert not [o for c in nb.cells if c.cell_type == 'code' for o in c.outputs], (
      'commit the notebook with its outputs cleared')

  client = nbclient.NotebookClient(nb, timeout=600, kernel_name=KERNEL, km=kernel_manager(tmp_path),
                                   resources={'metadata': {'path': str(tmp_path)}})
  client.execute(env=kernel_env())  # Raises CellExecutionError if a cell fails.
  outputs = [o for c in nb.cells if c.cell_type == 'code' for o in c.outputs]
  assert not [o for o in outputs if o.output_type == 'error']
  return outputs


def figures(outputs: list) -> list:
  return [o for o in outputs if 'image/png' in o.get('data', {})]


# Towers of configs/tiny.py: a step compiles in seconds.
TINY = {'batch_size': 16, 'model.embed_dim': 32, 'model.image.image_size': 16,
        'model.image.patch_size': 4, 'model.text.max_len': 16, 'eval.num_scenes': 32,
        'eval.batch_size': 32, **{f'model.{t}.{k}': v for t in ('image', 'text')
                                  for k, v in (('width', 32), ('depth', 1), ('num_heads', 2),
                                               ('mlp_dim', 64))}}


def test_quickstart_notebook(tmp_path, monkeypatch):
  monkeypatch.setenv('JUPYTER_RUNTIME_DIR', str(tmp_path / 'runtime'))  # Connection files.
  # A tokenizer from a small corpus: training one on the default corpus costs ~15 s.
  tok_file = tmp_path / 'tokenizer.json'
  tok = tokenizer_lib.train_wordpiece(demo.caption_corpus(num_scenes=300), vocab_size=256)
  tok_file.write_text(tok.to_str())
  workdir = tmp_path / 'run'
  params = {'TOTAL_STEPS': 4, 'WORKDIR': str(workdir), 'CONFIG': str(REPO / 'configs/tiny.py'),
            'OVERRIDES': {'tokenizer.path': str(tok_file), 'eval.num_scenes': 32}}
  outputs = execute(NOTEBOOK, params, tmp_path)
  assert len(figures(outputs)) >= 2, 'expected the loss curve and the retrieval grid'
  assert (workdir / 'export' / 'model.json').is_file()
  assert (workdir / 'eval.json').is_file()


def test_real_data_notebook(tmp_path, monkeypatch):
  """colab/real_data.ipynb without the stamps: its stand-in corpus, ingested and split, two
  steps of training, the report and the search grid."""
  monkeypatch.setenv('JUPYTER_RUNTIME_DIR', str(tmp_path / 'runtime'))
  workdir = tmp_path / 'real'
  params = {'TOTAL_STEPS': 2, 'WORKDIR': str(workdir), 'STAMPS': '',
            'CONFIG': str(REPO / 'configs/quality_tuxpaint.py'),
            'OVERRIDES': TINY | {'model.text.vocab_size': 512, 'tokenizer.vocab_size': 512},
            'QUERIES': ['a red circle.', 'a blue square at the top.']}
  outputs = execute(REPO / 'colab' / 'real_data.ipynb', params, tmp_path)
  assert len(figures(outputs)) >= 2, 'expected the training report and the retrieval grid'
  corpus = {name: json.loads((workdir / 'corpus' / name / 'metadata.json').read_text())
            for name in ('train', 'val')}
  assert corpus['train']['num_examples'] > 0 and corpus['val']['num_examples'] > 0
  assert corpus['train']['num_examples'] + corpus['val']['num_examples'] == 240
  result = json.loads((workdir / 'run' / 'eval.json').read_text())
  assert result['step'] == 2
  assert 'held_out/i2t/recall@10' in result  # The held-out split was evaluated.
  assert (workdir / 'run' / 'report.png').is_file()
  assert (workdir / 'run' / 'export' / 'model.json').is_file()
