"""The serving export: a self-contained artifact that embeds without the model code.

  python -m mmjax.deploy.export --model=runs/demo/export --out=runs/demo/serving \
      [--name=demo] [--platforms=cpu,cuda,tpu]

From a params export (`--mode=export`, read by `load_embedder`) it writes into OUT:

  serving.json              format, version {id, name, fingerprint}, model config, embed_dim,
                            preprocessing spec, platforms, SHA-256 and size of every file
  params.npz                the parameters, flat ('img/…/kernel' -> array)
  tokenizer.json            the run's tokenizer (with its pad id)
  {image,text}.{platform}.jax_exported
                            each tower's embedding function, `jax.export`ed (StableHLO) with a
                            symbolic batch dimension, for each platform asked for

The model version is `NAME-FINGERPRINT`: the fingerprint is a SHA-256 over the parameters
(paths, shapes, dtypes, bytes), the model config and the tokenizer, so a retrained model, another
config or another tokenizer is another version whatever its name. `mmjax.deploy.serving.load`
reads it with JAX and NumPy only.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from mmjax import embedder as embedder_lib
from mmjax.deploy import serving

PLATFORMS = ('cpu', 'cuda', 'tpu')


def fingerprint(flat_params: dict[str, np.ndarray], model_config: dict[str, Any],
                tokenizer_json: str) -> str:
  """SHA-256 (hex) of params + model config + tokenizer: the content half of a model version."""
  h = hashlib.sha256()
  for key in sorted(flat_params):
    value = np.ascontiguousarray(flat_params[key])
    h.update(f'{key}:{value.shape}:{value.dtype};'.encode())
    h.update(value.tobytes())
  h.update(json.dumps(model_config, sort_keys=True).encode())
  h.update(tokenizer_json.encode())
  return h.hexdigest()


def _check_platforms(platforms: Sequence[str]) -> tuple[str, ...]:
  platforms = tuple(dict.fromkeys(platforms))
  bad = [p for p in platforms if p not in PLATFORMS]
  if bad or not platforms:
    raise ValueError(f'platforms={list(platforms)}: each must be one of {PLATFORMS}.')
  return platforms


def export_serving(model_dir: str | pathlib.Path, out: str | pathlib.Path, *, name: str = '',
                   platforms: Sequence[str] = ('cpu',), resize: str = 'crop') -> pathlib.Path:
  """Writes the serving export of the params export at `model_dir` into `out`; returns `out`.

  `resize` ('crop' or 'letterbox') is recorded in the preprocessing spec: how a stored image
  becomes the model's square input (`mmjax.data.images.View`), which the backfill follows.
  """
  platforms = _check_platforms(platforms)
  model_dir, emb = _load_params_export(model_dir, resize)
  cfg = emb.config
  params = jax.device_get(emb.params)
  flat = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params, sep='/').items()}
  tokenizer_json = emb.encoder.to_str()
  model_dict = cfg.to_dict()
  digest = fingerprint(flat, model_dict, tokenizer_json)
  name = name or model_dir.parent.name or 'model'
  out = pathlib.Path(out).absolute()
  out.mkdir(parents=True, exist_ok=True)
  for old in out.iterdir():  # Nothing of a previous export may survive into the checksums.
    if old.is_file():
      old.unlink()

  _write_functions(out, emb.model, cfg, params, platforms)
  np.savez(out / serving.PARAMS_FILE, **flat)
  (out / 'tokenizer.json').write_text(tokenizer_json)
  files = {p.name: {'sha256': serving.sha256(p), 'bytes': p.stat().st_size}
           for p in sorted(out.iterdir()) if p.is_file() and p.name != serving.INFO_FILE}
  info = {
      'format': serving.FORMAT,
      'version': {'id': f'{name}-{digest[:12]}', 'name': name, 'fingerprint': digest},
      'source': str(model_dir),
      'model': model_dict,
      'embed_dim': cfg.embed_dim,
      'platforms': list(platforms),
      'preprocessing': {
          'image_size': cfg.image.image_size, 'resize': resize, 'background': [255, 255, 255],
          # uint8 -> (x/255 - mean)/std when given, else x * 2/255 - 1 (inside the functions).
          'pixel_mean': list(cfg.image.pixel_mean), 'pixel_std': list(cfg.image.pixel_std),
          'max_text_len': cfg.text.max_len, 'pad_id': int(emb.encoder.pad_id),
      },
      'files': files,
  }
  tmp = out / (serving.INFO_FILE + '.tmp')
  tmp.write_text(json.dumps(info, indent=2, sort_keys=True))
  tmp.replace(out / serving.INFO_FILE)  # serving.json last: a half-written export has none.
  return out


def _load_params_export(model_dir: str | pathlib.Path, resize: str):
  """(the params export's directory, its dual-encoder Embedder): `model_dir` may be a workdir
  holding export/; other export formats and resize values are refused."""
  model_dir = pathlib.Path(model_dir).absolute()
  if not (model_dir / 'model.json').exists() and (model_dir / 'export' / 'model.json').exists():
    model_dir = model_dir / 'export'
  if resize not in ('crop', 'letterbox'):
    raise ValueError(f'resize={resize!r} is not one of (\'crop\', \'letterbox\').')
  emb = embedder_lib.load_embedder(model_dir, batch_size=1)
  if type(emb) is not embedder_lib.Embedder:  # pylint: disable=unidiomatic-typecheck
    raise ValueError(f'{model_dir}: serving exports cover the {embedder_lib.EXPORT_FORMAT} format '
                     f'(images and texts), not {emb.FORMAT}.')
  return model_dir, emb


def _write_functions(out: pathlib.Path, model, cfg, params, platforms: Sequence[str]) -> None:
  """The image and text embedding functions as StableHLO, one file per modality and platform,
  with a symbolic batch dimension."""
  size, max_len = cfg.image.image_size, cfg.text.max_len
  batch, = jax.export.symbolic_shape('b')
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  tower = type(model)
  functions = {
      'image': (lambda p, x: model.apply({'params': p}, x, method=tower.embed_images),
                [jax.ShapeDtypeStruct((batch, size, size, 3), jnp.uint8)]),
      'text': (lambda p, t, m: model.apply({'params': p}, t, m, method=tower.embed_texts),
               [jax.ShapeDtypeStruct((batch, max_len), jnp.int32)] * 2),
  }
  for modality, (fn, args) in functions.items():
    for platform in platforms:
      exported = jax.export.export(jax.jit(fn), platforms=(platform,))(abstract, *args)
      (out / serving.function_file(modality, platform)).write_bytes(exported.serialize())


if __name__ == '__main__':  # The command lives in the CLI layer (mmjax.cli.deploy).
  import runpy
  runpy.run_module('mmjax.cli.deploy_export', run_name='__main__')
