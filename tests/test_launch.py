"""The launchers (launch/): the dry runs for a 4-host target print what runs on every host, the
GKE JobSet is well-formed for TPU and GPU node pools and refuses a config that does not fit the
job (the Slurm task script runs for real as 2 local processes, with faked SLURM variables, in
tests/test_multiprocess.py: it resumes the preempted 2-process run there)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from test_train import REPO

LAUNCH = REPO / 'launch'


def _sh(args, env=None, check=True, timeout=60):
  proc = subprocess.run(['bash', *map(str, args)], cwd=REPO, capture_output=True, text=True,
                        env={**os.environ, **(env or {})}, timeout=timeout, check=False)
  if check:
    assert proc.returncode == 0, proc.stderr
  return proc


def test_tpu_vm_dry_run_prints_every_step_for_a_4_host_slice():
  out = _sh([LAUNCH / 'tpu_vm.sh', '--dry-run', 'mm', 'v5litepod-16', 'configs/tiny.py',
             'gs://bkt/run', '--config.total_steps=7'], env={'ZONE': 'us-west4-a'}).stdout
  lines = out.splitlines()
  assert '4 host(s) per slice x 1 slice(s)' in out and 'workers 0..3' in out
  cmds = [line for line in lines if line.startswith('+ ')]
  assert cmds[0].startswith('+ gcloud compute tpus tpu-vm create mm --zone=us-west4-a '
                            '--accelerator-type=v5litepod-16')
  assert any(' archive ' in c for c in cmds)
  ssh = [c for c in cmds if ' tpu-vm ssh ' in c]
  assert len(ssh) == 2 and all('--worker=all' in c for c in ssh)
  assert 'requirements/runtime.lock' in ssh[0] and 'libtpu==' in ssh[0]
  train = ssh[1].replace('\\', '')
  assert ('mmjax.main --config=configs/tiny.py --workdir=gs://bkt/run '
          '--config.distributed.coordinator_address=auto --config.total_steps=7') in train


def test_tpu_vm_multislice_and_missing_zone():
  out = _sh([LAUNCH / 'tpu_vm.sh', '--dry-run', 'mm', 'v5litepod-16', 'c.py', 'w'],
            env={'ZONE': 'z', 'NUM_SLICES': '2', 'SPOT': '1'}).stdout
  assert 'queued-resources create mm --zone=z --accelerator-type=v5litepod-16' in out
  assert '--node-count=2' in out and '--spot' in out
  assert 'tpu-vm ssh mm-0' in out and 'tpu-vm ssh mm-1' in out
  env = {k: v for k, v in os.environ.items() if k != 'ZONE'}
  proc = subprocess.run(['bash', str(LAUNCH / 'tpu_vm.sh'), '--dry-run', 'mm', 'v4-32', 'c', 'w'],
                        cwd=REPO, capture_output=True, text=True, env=env, check=False)
  assert proc.returncode != 0 and 'ZONE' in proc.stderr


def test_slurm_dry_run_and_task_refuses_to_run_outside_srun():
  out = _sh([LAUNCH / 'slurm.sbatch', '--dry-run', 'configs/tiny.py', 'runs/x',
             '--config.total_steps=3']).stdout
  assert out.startswith('srun --ntasks-per-node=1 --kill-on-bad-exit=1')
  assert 'launch/slurm_task.sh configs/tiny.py runs/x --config.total_steps=3' in out
  env = {k: v for k, v in os.environ.items() if not k.startswith('SLURM_')}
  proc = subprocess.run(['bash', str(LAUNCH / 'slurm_task.sh'), 'c', 'w'], cwd=REPO, env=env,
                        capture_output=True, text=True, check=False)
  assert proc.returncode == 2 and 'SLURM_JOB_ID is not set' in proc.stderr


def _render(*args, check=True):
  proc = subprocess.run([sys.executable, str(LAUNCH / 'gke' / 'render.py'), *args], cwd=REPO,
                        capture_output=True, text=True, check=False,
                        env={**os.environ, 'JAX_PLATFORMS': 'cpu'}, timeout=120)
  if check:
    assert proc.returncode == 0, proc.stderr
  return proc


def _job(doc):
  assert doc['apiVersion'] == 'jobset.x-k8s.io/v1alpha2' and doc['kind'] == 'JobSet'
  (rjob,) = doc['spec']['replicatedJobs']
  job = rjob['template']['spec']
  assert job['completionMode'] == 'Indexed' and job['backoffLimit'] == 0
  assert job['parallelism'] == job['completions']
  pod = job['template']['spec']
  assert pod['restartPolicy'] == 'Never' and pod['terminationGracePeriodSeconds'] > 0
  (container,) = pod['containers']
  assert container['command'][:3] == ['python', '-m', 'mmjax.main']
  assert container['resources']['limits'] == container['resources']['requests']
  return rjob, job, pod, container


def test_gke_tpu_jobset_for_4_hosts():
  doc = yaml.safe_load(_render('--config=configs/tiny.py', '--workdir=gs://b/r', '--image=img:1',
                               '--accelerator=tpu-v5-lite-podslice', '--topology=4x4', '--',
                               '--config.batch_size=32').stdout)
  rjob, job, pod, container = _job(doc)
  assert rjob['replicas'] == 1 and job['parallelism'] == 4
  assert pod['nodeSelector'] == {'cloud.google.com/gke-tpu-accelerator': 'tpu-v5-lite-podslice',
                                 'cloud.google.com/gke-tpu-topology': '4x4'}
  assert container['resources']['limits'] == {'google.com/tpu': 4}
  assert container['command'][3:] == ['--config=configs/tiny.py', '--workdir=gs://b/r',
                                      '--config.batch_size=32',
                                      '--config.distributed.coordinator_address=auto']


def test_gke_gpu_jobset_names_the_coordinator_and_process_ids():
  doc = yaml.safe_load(_render('--config=configs/tiny.py', '--workdir=/mnt/r', '--image=img:1',
                               '--accelerator=nvidia-h100-80gb', '--num_hosts=4',
                               '--gpus_per_host=8', '--name=emb', '--',
                               '--config.batch_size=64').stdout)
  _, job, pod, container = _job(doc)
  assert job['parallelism'] == 4 and container['resources']['limits'] == {'nvidia.com/gpu': 8}
  assert pod['nodeSelector'] == {'cloud.google.com/gke-accelerator': 'nvidia-h100-80gb'}
  cmd = container['command']
  assert '--config.distributed.coordinator_address=emb-workers-0-0.emb:8476' in cmd
  assert '--config.distributed.num_processes=4' in cmd
  assert '--config.distributed.process_id=$(JOB_COMPLETION_INDEX)' in cmd
  assert any(e['name'] == 'JOB_COMPLETION_INDEX' for e in container['env'])
  assert doc['spec']['network']['enableDNSHostnames'] is True


@pytest.mark.parametrize('args, message', [
    (['--accelerator=tpu-v5-lite-podslice', '--topology=8x8'], 'batch_size=16 is not divisible'),
    (['--accelerator=tpu-v5-lite-podslice', '--topology=4by4'], "--topology='4by4'"),
    (['--accelerator=tpu-v9', '--topology=4x4'], "--accelerator='tpu-v9'"),
    (['--accelerator=nvidia-h100-80gb', '--num_hosts=0'], '--num_hosts=0'),
])
def test_gke_refuses_what_would_fail_on_the_cluster(args, message):
  proc = _render('--config=configs/tiny.py', '--workdir=w', '--image=i', *args, check=False)
  assert proc.returncode == 2 and message in proc.stderr, proc.stderr
  assert proc.stdout == ''
