"""Ahead-of-time compilation for a TPU topology (mmjax.train.aot), on CPU.

The compile-only tests need the `libtpu` wheel (the `tpu` extra; `make test-tpu-compile`
installs it and runs this file) and are skipped without it. They compile configs/tiny.py-sized
programs for a v5e:2x2 slice (4 chips) with XLA's real TPU compiler and check the compiled
program: the layout of every parameter against golden partition specs, the ring loss as
collective-permutes (no all-gather of the other tower), FSDP's parameter all-gathers and
gradient reduce-scatters, and a bound on per-chip memory. The HLO parser tests run everywhere.
"""

import json
import os
import pathlib

import jax
import pytest

from mmjax.train import aot

GOLDEN = pathlib.Path(__file__).parent / 'fixtures' / 'tpu' / 'tiny_fsdp4_partition_specs.json'
TOPOLOGY = 'v5e:2x2'
# A tiny-config program needs a few MiB per chip (mostly generated code); the bound catches a
# layout that replicates what should be sharded or materialises a global matrix.
MEMORY_BOUND = 64 * 2**20

HLO = """HloModule m

%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p = (s32[], f32[8]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = f32[8] get-tuple-element(%p), index=1
  %cp = (f32[8], f32[8], u32[], u32[]) collective-permute-start(%x), channel_id=1
  %cpd = f32[8] collective-permute-done(%cp)
  %one = s32[] constant(1)
  %i2 = s32[] add(%i, %one)
  ROOT %t = (s32[], f32[8]) tuple(%i2, %cpd)
}

%cond (q: (s32[], f32[8])) -> pred[] {
  %q = (s32[], f32[8]) parameter(0)
  %j = s32[] get-tuple-element(%q), index=0
  %n = s32[] constant(3)
  ROOT %lt = pred[] compare(%j, %n), direction=LT
}

%all-reduce-scatter.1 (a: f32[16]) -> f32[4] {
  %a = f32[16] parameter(0)
  %ar = f32[16] all-reduce(%a), channel_id=2, to_apply=%add
  %z = u32[] constant(0)
  ROOT %ds = f32[4] dynamic-slice(%ar, %z), dynamic_slice_sizes={4}
}

%gather (s: f32[4]) -> (f32[4], f32[16]) {
  %s = f32[4] parameter(0)
  %g = f32[16] all-gather(%s), channel_id=5, dimensions={0}
  ROOT %tt = (f32[4], f32[16]) tuple(%s, %g)
}

%gather_done (s2: f32[4]) -> f32[16] {
  %s2 = f32[4] parameter(0)
  ROOT %g2 = f32[16] all-gather(%s2), channel_id=5, dimensions={0}
}

%health (h: f32[4]) -> f32[16] {
  %h = f32[4] parameter(0)
  ROOT %hg = f32[16] all-gather(%h), channel_id=7, dimensions={0}
}

%other (o: f32[4]) -> f32[16] {
  %o = f32[4] parameter(0)
  ROOT %ob = f32[16] broadcast(%o), dimensions={}
}

ENTRY %main (x: f32[8], y: f32[16], pr: s32[]) -> f32[16] {
  %x = f32[8] parameter(0)
  %zero = s32[] constant(0)
  %c = s32[] copy(%zero)
  %init = (s32[], f32[8]) tuple(%c, %x)
  %w = (s32[], f32[8]) while(%init), condition=%cond, body=%body
  %y = f32[16] parameter(1)
  %f = f32[4] fusion(%y), kind=kCustom, calls=%all-reduce-scatter.1
  %async-collective-start = (f32[4], f32[16]) fusion(%f), kind=kCustom, calls=%gather
  %async-collective-done = f32[16] fusion(%async-collective-start), kind=kCustom, calls=%gather_done
  %pr = s32[] parameter(2)
  ROOT %cd = f32[16] conditional(%pr, %f, %f), branch_computations={%other, %health}
}
"""


def test_parse_hlo_weights_loops_and_reads_tpu_fusions():
  hlo = aot.parse_hlo(HLO)
  ops, cond = hlo['collectives'], hlo['conditional_collectives']
  assert hlo['loops_without_trip_count'] == 0
  assert ops['collective-permute'] == {'count': 3, 'bytes': 3 * 32}  # 3 trips of 8 floats.
  assert ops['reduce-scatter'] == {'count': 1, 'bytes': 64}  # all-reduce-scatter: 16 floats in.
  assert ops['all-reduce'] == {'count': 0, 'bytes': 0}
  assert ops['all-gather'] == {'count': 1, 'bytes': 64}  # The async pair once, its output.
  assert cond['all-gather'] == {'count': 1, 'bytes': 64}  # In a branch: apart.
  assert hlo['largest_values'][0]['bytes'] == 64


def test_unknown_trip_count_is_counted_once_and_reported():
  hlo = aot.parse_hlo(HLO.replace('%c = s32[] copy(%zero)', '%c = s32[] parameter(3)'))
  assert hlo['loops_without_trip_count'] == 1
  assert hlo['collectives']['collective-permute']['count'] == 1


# --- Compile-only tests for a TPU topology (libtpu) ----------------------------------------------

def _libtpu():
  pytest.importorskip('libtpu', reason='compile-only TPU tests need the libtpu wheel: '
                                       "pip install -e '.[tpu]' or `make test-tpu-compile`")


def _config(**overrides):
  from configs import tiny  # pylint: disable=import-outside-toplevel
  c = tiny.get_config()
  c.health.rows = 0  # The health statistics (log steps only) gather embeddings on purpose.
  for key, value in overrides.items():
    node = c
    *path, leaf = key.split('.')
    for p in path:
      node = node[p]
    node[leaf] = value
  return c


@pytest.fixture(scope='module')
def ring(tmp_path_factory):
  """The data-parallel tiny run (ring sigmoid loss), compiled by `--mode=compile`'s function."""
  _libtpu()
  workdir = tmp_path_factory.mktemp('aot_ring')
  report = aot.compile_for_topology(_config(**{'loss.impl': 'ring'}), workdir, TOPOLOGY)
  return workdir, report


@pytest.fixture(scope='module')
def fsdp(tmp_path_factory):
  """The tiny run with the parameters sharded 4 ways (mesh fsdp=4) and GradCache (2 micro-batches
  per chip): the train step only."""
  _libtpu()
  run, chip, compiled = aot.compile_programs(
      _config(**{'mesh.data': 1, 'mesh.fsdp': 4, 'loss.impl': 'ring', 'micro_batches': 2}),
      tmp_path_factory.mktemp('aot_fsdp'), TOPOLOGY, embedding=False)
  return run, compiled['train_step'], aot.analyse(compiled['train_step'], chip)


def test_report_written_and_within_memory_bound(ring):
  workdir, report = ring
  saved = json.loads((workdir / 'compile_v5e_2x2.json').read_text())
  assert saved['num_chips'] == 4 and saved['chip']['name'] == 'v5e'
  assert set(saved['programs']) == {'train_step', 'embed_images', 'embed_texts'}
  for name, prog in report['programs'].items():
    mem = prog['memory']
    assert 0 < mem['total'] < MEMORY_BOUND, (name, mem)
    assert prog['flops'] > 0 and prog['roofline']['step_s'] > 0
  assert 'ESTIMATE' in report['programs']['train_step']['roofline']['note']


def test_ring_loss_compiles_to_collective_permutes(ring):
  """Data-parallel with the ring loss: the towers' embeddings travel by collective-permute; no
  all-gather at all (the parameters are replicated, the loss gathers nothing)."""
  ops = ring[1]['programs']['train_step']['collectives']
  assert ops['collective-permute']['count'] >= 3  # D - 1 = 3 hops, forward and backward.
  assert ops['all-gather']['count'] == 0, ops
  assert ops['all-reduce']['count'] > 0  # The data-parallel gradient reduction.


def test_all_gather_loss_gathers_the_other_tower(tmp_path):
  """The contrast that keeps the ring test honest: loss.impl='all_gather' does gather [B, d]."""
  _libtpu()
  c = _config(**{'loss.impl': 'all_gather'})
  run, chip, compiled = aot.compile_programs(c, tmp_path, TOPOLOGY, embedding=False)
  ops = aot.analyse(compiled['train_step'], chip)['collectives']
  assert ops['all-gather']['count'] > 0
  # One tower's [B, d] embeddings, at least in bf16 (XLA:TPU's default matmul precision lets it
  # gather f32 embeddings as bf16).
  assert ops['all-gather']['bytes'] >= c.batch_size * c.model.embed_dim * 2


def _param_specs(shardings) -> dict[str, str]:
  return {jax.tree_util.keystr(path): str(tuple(s.spec))
          for path, s in jax.tree_util.tree_leaves_with_path(shardings)}


def test_partition_specs_match_golden(fsdp):
  """Every parameter's sharding in the *compiled* program (as XLA laid it out) matches the golden
  specs. Regenerate with MMJAX_UPDATE_GOLDEN=1 after an intended change, and review the diff."""
  run, compiled, _ = fsdp
  state_in = compiled.input_shardings[0][0]
  specs = _param_specs(state_in.params)
  assert specs == _param_specs(run.state_shardings.params)  # XLA kept the requested layout.
  if os.environ.get('MMJAX_UPDATE_GOLDEN'):
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    GOLDEN.write_text(json.dumps(specs, indent=1, sort_keys=True) + '\n')
  assert specs == json.loads(GOLDEN.read_text())
  assert any('fsdp' in s for s in specs.values())


def test_fsdp_gathers_params_and_reduce_scatters_grads(fsdp):
  run, _, analysis = fsdp
  ops = analysis['collectives']
  assert ops['all-gather']['count'] > 0 and ops['reduce-scatter']['count'] > 0, ops
  assert analysis['memory']['total'] < MEMORY_BOUND
  # The gathered weights are what the matmuls read: the gather moves at least the kernels.
  kernels = sum(x.size for p, x in jax.tree_util.tree_leaves_with_path(run.abstract_state.params)
                if 'kernel' in jax.tree_util.keystr(p))
  assert ops['all-gather']['bytes'] >= 2 * kernels * 3 // 4  # bf16 or wider, 3/4 from peers.


def test_too_big_fails_with_the_per_chip_figure_and_largest_buffers(ring):
  _, report = ring
  small = json.loads(json.dumps(report))
  small['programs']['train_step']['memory']['hbm'] = 1024
  with pytest.raises(aot.DoesNotFit, match=r'train_step needs .* GiB per chip .*\n'
                                           r'Largest buffers per chip:\n.*MiB'):
    aot.check_fits(small)
  aot.check_fits(report)  # The real chip: fits.


def test_unknown_topology_is_a_clear_error(tmp_path):
  _libtpu()
  with pytest.raises(aot.ConfigError, match="--compile_topology='v5e:3x7'"):
    aot.topology('v5e:3x7')


def test_without_libtpu_the_error_names_the_extra(monkeypatch):
  monkeypatch.setattr(aot.importlib.util, 'find_spec', lambda name: None)
  with pytest.raises(aot.ConfigError, match=r"--compile_topology=v5e:2x2: .*libtpu.*\[tpu\]"):
    aot.topology('v5e:2x2')


def test_program_over_hbm_fails_with_the_compilers_figure_and_the_state(tmp_path):
  """XLA:TPU itself refuses a program whose temporaries exceed HBM (a 262k batch of the tiny
  model: the ring's [65536, 65536] logit blocks): DoesNotFit names the figures."""
  _libtpu()
  with pytest.raises(aot.DoesNotFit, match=r'(?s)train_step does not fit a v5e chip \(16 GiB '
                                           r'HBM\).*RESOURCE_EXHAUSTED.*exceeds available HBM.*'
                                           r'Largest state buffers per chip:\n.*MiB'):
    aot.compile_programs(_config(batch_size=262_144), tmp_path, TOPOLOGY, embedding=False)
