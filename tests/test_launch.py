"""launch/local.sh trains a config into a workdir (tiny config, 2 steps)."""

import json
import os
import pathlib
import re
import subprocess

import pytest

from mmjax.data import demo, tokenizer as tokenizer_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / 'launch' / 'local.sh'


@pytest.mark.slow  # 30 s; the multi-process launcher runs in test_multiprocess
def test_local_launcher(tmp_path):
  assert os.access(SCRIPT, os.X_OK), f'{SCRIPT} is not executable'
  # A tokenizer from a small corpus: training one on the default corpus costs ~15 s.
  tok_file = tmp_path / 'tokenizer.json'
  tok = tokenizer_lib.train_wordpiece(demo.caption_corpus(num_scenes=300), vocab_size=256)
  tok_file.write_text(tok.to_str())
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env['XLA_FLAGS'] = re.sub(r'--xla_force_host_platform_device_count=\S+', '',
                            env.get('XLA_FLAGS', '')).strip()  # One device: faster compiles.
  workdir = tmp_path / 'run'
  proc = subprocess.run(
      [str(SCRIPT), 'configs/tiny.py', str(workdir), '--config.total_steps=2',
       f'--config.tokenizer.path={tok_file}'],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  result = json.loads((workdir / 'eval.json').read_text())
  assert result['step'] == 2
  assert 'i2t/recall@1' in result


def test_local_launcher_usage():
  proc = subprocess.run([str(SCRIPT)], capture_output=True, text=True, timeout=30, check=False)
  assert proc.returncode == 2
  assert 'Usage' in proc.stderr
