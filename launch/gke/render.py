r"""Renders a Kubernetes JobSet that runs one `python -m mmjax.main` per host on GKE.

  python launch/gke/render.py --config=configs/siglip_b16.py --workdir=gs://bkt/run1 \
      --image=us-docker.pkg.dev/P/R/mmjax:TAG --accelerator=tpu-v5-lite-podslice \
      --topology=4x4 [--name=mmjax] [--num_slices=1] [-- --config.total_steps=1000] > jobset.yaml
  kubectl apply -f jobset.yaml

TPU node pools (`--accelerator=tpu-v5-lite-podslice|tpu-v5p-slice|tpu-v6e-slice|tpu-v4-podslice`,
`--topology=AxB[xC]`): one pod per TPU host (4 chips each), selected with the GKE TPU node labels;
jax.distributed finds the slice itself (`coordinator_address=auto`), and with `--num_slices`
> 1 the JobSet's replicated jobs are the slices (GKE sets the MEGASCALE_* environment).
GPU node pools (`--accelerator=nvidia-h100-80gb|nvidia-h200-141gb|...`, `--num_hosts`,
`--gpus_per_host`): an indexed job whose pod 0 is the coordinator, reached through the JobSet's
headless service; every pod's process id is its completion index.

The config is loaded and validated for the job's device count before anything is written
(`--nocheck_config` skips that, e.g. on a machine without mmjax's dependencies).
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from typing import Any

import yaml

TPU_ACCELERATORS = {  # GKE's TPU accelerator label -> chips per host (multi-host slices).
    'tpu-v4-podslice': 4, 'tpu-v5-lite-podslice': 4, 'tpu-v5p-slice': 4, 'tpu-v6e-slice': 4}
PORT = 8476  # The coordinator's port (GPU jobs).


def tpu_hosts(accelerator: str, topology: str) -> tuple[int, int]:
  """(hosts, chips per host) of one slice: chips = product of the topology; one host holds up to
  8 v5e/v6e chips in a single-host slice, else 4."""
  if accelerator not in TPU_ACCELERATORS:
    raise ValueError(f'--accelerator={accelerator!r} is not a GKE TPU type '
                     f'({", ".join(TPU_ACCELERATORS)}) nor nvidia-*.')
  if not re.fullmatch(r'\d+x\d+(x\d+)?', topology):
    raise ValueError(f'--topology={topology!r}: expected AxB or AxBxC, e.g. 4x4 or 2x2x4.')
  chips = math.prod(int(d) for d in topology.split('x'))
  per_host = TPU_ACCELERATORS[accelerator]
  if chips <= 8 and accelerator in ('tpu-v5-lite-podslice', 'tpu-v6e-slice'):
    return 1, chips
  if chips % per_host:
    raise ValueError(f'--topology={topology}: {chips} chips is not a multiple of {per_host} '
                     'chips per host.')
  return chips // per_host, per_host


def main_args(config: str, workdir: str, extra: list[str]) -> list[str]:
  return ['python', '-m', 'mmjax.main', f'--config={config}', f'--workdir={workdir}', *extra]


def render(a: argparse.Namespace) -> dict[str, Any]:
  """The JobSet (a dict) for the parsed arguments."""
  gpu = a.accelerator.startswith('nvidia-')
  if gpu:
    hosts, per_host = a.num_hosts, a.gpus_per_host
    if hosts < 1 or per_host < 1:
      raise ValueError(f'--num_hosts={hosts} and --gpus_per_host={per_host} must be >= 1.')
    if a.num_slices != 1:
      raise ValueError('--num_slices is for TPU multislice; a GPU job is one replicated job.')
  else:
    hosts, per_host = tpu_hosts(a.accelerator, a.topology)
  command = main_args(a.config, a.workdir, a.extra)
  env = [{'name': 'TF_CPP_MIN_LOG_LEVEL', 'value': '1'}]
  if gpu:  # Pod 0 of the job is the coordinator; the index is the process id.
    coordinator = f'{a.name}-workers-0-0.{a.name}:{PORT}'
    command += [f'--config.distributed.coordinator_address={coordinator}',
                f'--config.distributed.num_processes={hosts}',
                '--config.distributed.process_id=$(JOB_COMPLETION_INDEX)']
    env.append({'name': 'JOB_COMPLETION_INDEX', 'valueFrom': {'fieldRef': {
        'fieldPath': "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}})
    resources = {'nvidia.com/gpu': per_host}
    selector = {'cloud.google.com/gke-accelerator': a.accelerator}
  else:
    command += ['--config.distributed.coordinator_address=auto']
    resources = {'google.com/tpu': per_host}
    selector = {'cloud.google.com/gke-tpu-accelerator': a.accelerator,
                'cloud.google.com/gke-tpu-topology': a.topology}
    if a.spot:
      selector['cloud.google.com/gke-spot'] = 'true'
  container = {'name': 'mmjax', 'image': a.image, 'command': command, 'env': env,
               'ports': [{'containerPort': PORT}],
               'resources': {'limits': resources, 'requests': dict(resources)},
               'securityContext': {'privileged': False}}
  pod = {'restartPolicy': 'Never', 'nodeSelector': selector, 'containers': [container],
         # SIGTERM before eviction: mmjax checkpoints at the next step and exits 0 in this time.
         'terminationGracePeriodSeconds': a.grace_s}
  job = {'parallelism': hosts, 'completions': hosts, 'completionMode': 'Indexed',
         'backoffLimit': 0, 'template': {'spec': pod}}
  return {
      'apiVersion': 'jobset.x-k8s.io/v1alpha2', 'kind': 'JobSet',
      'metadata': {'name': a.name, 'annotations': {
          'alpha.jobset.sigs.k8s.io/exclusive-topology': 'cloud.google.com/gke-nodepool'}},
      'spec': {
          'failurePolicy': {'maxRestarts': a.max_restarts},
          'network': {'enableDNSHostnames': True},
          'replicatedJobs': [{'name': 'workers', 'replicas': a.num_slices,
                              'template': {'spec': job}}]},
  }


def check_config(a: argparse.Namespace, devices: int, processes: int) -> None:
  """Loads the config with the --config.* overrides exactly as mmjax.main does (config_flags)
  and validates it for the job's devices: a bad key or a batch that does not divide the mesh
  fails here, not on the cluster."""
  # pylint: disable=import-outside-toplevel  (rendering alone needs only PyYAML)
  from absl import flags
  from ml_collections import config_flags
  from mmjax import config as config_lib
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, 'The config file.', flag_values=fv,
                                  lock_config=True)
  fv(['render.py', f'--config={a.config}', *[x for x in a.extra if x.startswith('--config.')]])
  config_lib.validate(fv.config, num_devices=devices, num_processes=processes)


def parse(argv: list[str]) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--config', required=True, help='The config file, as the image sees it.')
  p.add_argument('--workdir', required=True, help='gs:// path or a volume every pod mounts.')
  p.add_argument('--image', required=True, help='Container image with mmjax installed.')
  p.add_argument('--accelerator', required=True)
  p.add_argument('--topology', default='', help='TPU slice topology, e.g. 4x4.')
  p.add_argument('--num_slices', type=int, default=1)
  p.add_argument('--num_hosts', type=int, default=1, help='GPU: pods (one per node).')
  p.add_argument('--gpus_per_host', type=int, default=8)
  p.add_argument('--name', default='mmjax')
  p.add_argument('--max_restarts', type=int, default=3,
                 help='JobSet restarts after a failure or preemption (the run resumes).')
  p.add_argument('--grace_s', type=int, default=300)
  p.add_argument('--spot', action='store_true', help='TPU: schedule on Spot VMs.')
  p.add_argument('--nocheck_config', dest='check_config', action='store_false')
  p.add_argument('extra', nargs='*', help='After --: flags for mmjax.main (--config.x=y).')
  a = p.parse_args(argv)
  if not re.fullmatch(r'[a-z0-9]([-a-z0-9]{0,38}[a-z0-9])?', a.name):
    p.error(f'--name={a.name!r} is not a DNS label (lower case, digits, -; at most 40).')
  return a


def main(argv: list[str] | None = None) -> int:
  a = parse(sys.argv[1:] if argv is None else argv)
  try:
    doc = render(a)
  except ValueError as e:
    print(f'render.py: {e}', file=sys.stderr)
    return 2
  job = doc['spec']['replicatedJobs'][0]
  hosts = job['template']['spec']['parallelism'] * job['replicas']
  limits = job['template']['spec']['template']['spec']['containers'][0]['resources']['limits']
  if a.check_config:
    try:
      check_config(a, devices=hosts * next(iter(limits.values())), processes=hosts)
    except Exception as e:  # pylint: disable=broad-except  (ConfigError, a bad flag, a bad file)
      print(f'render.py: {a.config} does not run on this job ({hosts} hosts): {e}',
            file=sys.stderr)
      return 2
  yaml.safe_dump(doc, sys.stdout, sort_keys=False)
  return 0


if __name__ == '__main__':
  sys.exit(main())
