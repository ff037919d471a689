"""Embedding with a trained model, with or without training state: `mmjax.load_embedder(path)`.

The same `Embedder` serves the evaluators during training (params taken from the train state) and
users of an exported model (params restored from `DIR/export`). Inputs are embedded in fixed-size
batches sharded over the mesh's batch axes; the last partial batch is padded and the padding rows
dropped, so every batch has one compiled shape.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from mmjax.data import audio_io, llm_encoding, tokenizer as tokenizer_lib
import mmjax.models.fusion as fusion
from mmjax.models.audio_text import AudioText
from mmjax.models.llm_embedder import LLMEmbedder
from mmjax.models.two_tower import TwoTower
from mmjax.parallel import mesh as mesh_lib
from mmjax.types import AudioTextConfig, LLMEmbedderConfig, ModelConfig

EXPORT_FORMAT = 'mmjax.dual_encoder.v1'
LLM_EXPORT_FORMAT = 'mmjax.llm_embedder.v1'  # LoRA merged; 'llm' holds the encoder settings.
AUDIO_EXPORT_FORMAT = 'mmjax.audio_text.v1'


class Embedder:
  """Embeds images (uint8 [N, H, W, 3]) and texts (list of str) into the shared space: the dual
  encoder's runner (the `mmjax.types.Embedder` protocol evaluators use)."""

  FORMAT = EXPORT_FORMAT  # model.json 'format' of its exports.

  def __init__(self, model_config: ModelConfig, params: Any, encoder: tokenizer_lib.TextEncoder,
               mesh: Mesh | None = None, batch_size: int = 256):
    self.config = model_config
    self.model = TwoTower(model_config)
    self.params = params
    self.encoder = encoder
    self._set_mesh(mesh, batch_size)
    batch_sh = self._batch_sharding
    repl = mesh_lib.replicated(self.mesh)
    apply = self.model.apply
    self._embed_images = jax.jit(
        lambda p, x: apply({'params': p}, x, method=TwoTower.embed_images),
        in_shardings=(None, batch_sh), out_shardings=repl)
    self._embed_texts = jax.jit(
        lambda p, t, m: apply({'params': p}, t, m, method=TwoTower.embed_texts),
        in_shardings=(None, batch_sh, batch_sh), out_shardings=repl)

  def _set_mesh(self, mesh: Mesh | None, batch_size: int) -> None:
    """The mesh (default: every device on 'data') and a batch size that divides its shards."""
    self.mesh = mesh or mesh_lib.default_mesh()
    shards = self.mesh.shape['data'] * self.mesh.shape['fsdp']
    self.batch_size = -(-batch_size // shards) * shards
    self._batch_sharding = mesh_lib.batch_sharding(self.mesh)

  def _spec(self, shape: tuple[int, ...], dtype) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct((self.batch_size,) + shape, dtype, sharding=self._batch_sharding)

  def embedding_steps(self) -> dict[str, tuple[Any, tuple[Any, ...]]]:
    """{name: (jitted function, its arguments for one batch)}: what `mmjax.train.aot` compiles
    ahead of time. The arguments are ShapeDtypeStructs, except `self.params` (pass abstract
    params, e.g. the train state's, to allocate nothing)."""
    size, length = self.config.image.image_size, self.config.text.max_len
    return {'embed_images': (self._embed_images,
                             (self.params, self._spec((size, size, 3), np.uint8))),
            'embed_texts': (self._embed_texts, (self.params, self._spec((length,), np.int32),
                                                self._spec((length,), np.int32)))}

  @classmethod
  def from_export(cls, info: dict[str, Any], tokenizer, params, *, mesh: Mesh,
                  batch_size: int) -> Embedder:
    model_config = ModelConfig.from_dict(info['model'])
    return cls(model_config, params, tokenizer_lib.TextEncoder(tokenizer, model_config.text.max_len),
               mesh=mesh, batch_size=batch_size)

  @staticmethod
  def model_from_info(info: dict[str, Any]) -> TwoTower:
    return TwoTower(ModelConfig.from_dict(info['model']))

  @property
  def embed_dim(self) -> int:
    return self.config.embed_dim

  def _batches(self, arrays: Sequence[np.ndarray]):
    n = len(arrays[0])
    for start in range(0, n, self.batch_size):
      chunk = [a[start:start + self.batch_size] for a in arrays]
      valid = len(chunk[0])
      if valid < self.batch_size:
        chunk = [np.concatenate([c, np.zeros((self.batch_size - valid,) + c.shape[1:], c.dtype)])
                 for c in chunk]
      yield [self._put(c) for c in chunk], valid

  def _put(self, x: np.ndarray) -> jax.Array:
    return jax.make_array_from_callback(x.shape, self._batch_sharding, lambda idx: x[idx])

  def embed_images(self, images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    size = self.config.image.image_size
    if images.ndim != 4 or images.shape[1:3] != (size, size) or images.shape[3] != 3:
      raise ValueError(f'Expected images [N, {size}, {size}, 3], got {images.shape}.')
    out = [np.asarray(self._embed_images(self.params, x))[:valid]
           for (x,), valid in self._batches([images])]
    return np.concatenate(out) if out else np.zeros((0, self.embed_dim), np.float32)

  def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
    if isinstance(texts, str):
      raise TypeError('embed_texts takes a list of strings, got one string.')
    tokens, mask = self.encoder(list(texts))
    out = [np.asarray(self._embed_texts(self.params, t, m))[:valid]
           for (t, m), valid in self._batches([tokens, mask])]
    return np.concatenate(out) if out else np.zeros((0, self.embed_dim), np.float32)

  # --- Heads on token outputs (ITM re-ranking, captioning; docs/objectives.md) ----------------

  @property
  def has_itm(self) -> bool:
    return bool(self.config.itm_depth)

  @property
  def has_captioner(self) -> bool:
    return bool(self.config.caption_depth)

  def _jit(self, name: str, fn):
    """`fn(params, *batch arrays)` jitted once per runner, sharded like the embedding calls."""
    cache = self.__dict__.setdefault('_head_fns', {})
    if name not in cache:
      cache[name] = jax.jit(fn, out_shardings=mesh_lib.replicated(self.mesh))
    return cache[name]

  def _run(self, name: str, fn, arrays: Sequence[np.ndarray]) -> np.ndarray:
    f = self._jit(name, fn)
    return np.concatenate([np.asarray(f(self.params, *xs))[:valid]
                           for xs, valid in self._batches(list(arrays))])

  def image_tokens(self, images: np.ndarray) -> np.ndarray:
    """The ViT's output tokens [N, P, width] of uint8 images (the heads' image input)."""
    apply = self.model.apply
    return self._run('image_tokens', lambda p, x: apply(
        {'params': p}, x, method=TwoTower.image_features)[1], [np.asarray(images)])

  def text_tokens(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(the text tower's output tokens [N, L, width], the mask [N, L]) of `texts`."""
    tokens, mask = self.encoder(list(texts))
    apply = self.model.apply
    out = self._run('text_tokens', lambda p, t, m: apply(
        {'params': p}, t, m, method=TwoTower.text_features)[1], [tokens, mask])
    return out, mask

  def match_scores(self, text_tokens: np.ndarray, mask: np.ndarray,
                   image_tokens: np.ndarray) -> np.ndarray:
    """ITM logits [N] of the pairs (text row i, image row i) of token outputs."""
    if not self.has_itm:
      raise ValueError('This model has no ITM head (config.model.itm.depth=0).')
    apply = self.model.apply
    return self._run('match', lambda p, t, m, i: apply(
        {'params': p}, t, m, i, method=TwoTower.match_logits), [text_tokens, mask, image_tokens])

  def caption(self, images: np.ndarray) -> list[str]:
    """Greedy captions of uint8 images from the captioning decoder (to read what it learned)."""
    if not self.has_captioner:
      raise ValueError('This model has no captioning decoder (config.model.caption.depth=0).')
    apply, length = self.model.apply, self.config.text.max_len

    def decode(p, x):
      tokens = apply({'params': p}, x, method=TwoTower.image_features)[1]
      return fusion.greedy(lambda t: apply({'params': p}, t, tokens,
                                           method=TwoTower.caption_logits), x.shape[0], length)
    ids = self._run('caption', decode, [np.asarray(images)])
    eos_ids, eos_mask = self.encoder.encode_one('')
    eos = int(eos_ids[int(eos_mask.sum()) - 1]) if eos_mask.sum() else -1
    out = []
    for row in ids:
      row = list(row)
      out.append(self.encoder.tokenizer.decode(row[:row.index(eos)] if eos in row else row))
    return out


def export(directory: str | pathlib.Path, model_config: ModelConfig | LLMEmbedderConfig,
           params: Any, tokenizer_json: str, extra: dict[str, Any] | None = None, *,
           fmt: str = EXPORT_FORMAT) -> pathlib.Path:
  """Writes params (Orbax, no optimizer state), the model config and the tokenizer; `fmt` is
  the runner's FORMAT (the model kind's `export_format`)."""
  directory = pathlib.Path(directory).absolute()
  directory.mkdir(parents=True, exist_ok=True)
  params_dir = directory / 'params'
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(params_dir, params, force=True)
  if jax.process_index() == 0:
    (directory / tokenizer_lib.TOKENIZER_FILE).write_text(tokenizer_json)
    info = {'format': fmt, 'model': model_config.to_dict(), **(extra or {})}
    (directory / 'model.json').write_text(json.dumps(info, indent=2, sort_keys=True))
  return directory


def load_embedder(path: str | pathlib.Path, *, batch_size: int = 256,
                  mesh: Mesh | None = None) -> Embedder:
  """Loads an exported model (`DIR/export` or a workdir holding one) for embedding."""
  path = pathlib.Path(path).absolute()
  if not (path / 'model.json').exists() and (path / 'export' / 'model.json').exists():
    path = path / 'export'
  info_file = path / 'model.json'
  if not info_file.exists():
    raise FileNotFoundError(f'{path} is not an mmjax export (no model.json). Create one with '
                            '`python -m mmjax.main --mode=export --workdir=DIR --config=...`.')
  info = json.loads(info_file.read_text())
  runner = RUNNERS.get(info.get('format'))
  if runner is None:
    raise ValueError(f'{info_file}: unknown export format {info.get("format")!r}, expected one '
                     f'of {", ".join(map(repr, RUNNERS))}.')
  model = runner.model_from_info(info)
  abstract = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.key(0),
                                                        *model.init_inputs())['params']))
  mesh = mesh or mesh_lib.default_mesh()
  repl = mesh_lib.replicated(mesh)
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=repl), abstract)
  with ocp.StandardCheckpointer() as ckptr:
    params = ckptr.restore(path / 'params', target)
  return runner.from_export(info, tokenizer_lib.load(path), params, mesh=mesh,
                            batch_size=batch_size)


class MultimodalEmbedder(Embedder):
  FORMAT = LLM_EXPORT_FORMAT

  """The LLM embedder's runner: embeds (text with image placeholders, images) inputs.

  `embed_queries(task, contents, images)` prefixes the task's instruction, `embed_candidates`
  the candidate instruction; `embed_images` / `embed_texts` embed plain candidates (an image
  alone, a text alone), so the dual encoder's evaluators run on it too. Inputs are checked on
  the host (`mmjax.data.llm_encoding.MultimodalEncoder`): placeholders must match the images and
  fit the context.
  """

  def __init__(self, model_config, params: Any, encoder, instructions, mesh: Mesh | None = None,
               batch_size: int = 256):
    self.config, self.params, self.encoder = model_config, params, encoder
    self.instructions = instructions
    self.model = LLMEmbedder(model_config)
    self._set_mesh(mesh, batch_size)
    self._embed = jax.jit(
        lambda p, t, m, x: self.model.apply({'params': p}, t, m, x, method=LLMEmbedder.embed),
        in_shardings=(None,) + (self._batch_sharding,) * 3,
        out_shardings=mesh_lib.replicated(self.mesh))

  @classmethod
  def from_export(cls, info: dict[str, Any], tokenizer, params, *, mesh: Mesh,
                  batch_size: int) -> MultimodalEmbedder:
    llm = info['llm']
    return cls(LLMEmbedderConfig.from_dict(info['model']), params,
               llm_encoding.MultimodalEncoder(tokenizer, **llm['encoder']),
               llm_encoding.Instructions(**llm['instructions']), mesh=mesh, batch_size=batch_size)

  def embedding_steps(self) -> dict[str, tuple[Any, tuple[Any, ...]]]:
    enc, size = self.encoder, self.config.image.image_size
    return {'embed': (self._embed, (self.params, self._spec((enc.max_len,), np.int32),
                                    self._spec((enc.max_len,), np.int32),
                                    self._spec((enc.max_images, size, size, 3), np.uint8)))}

  @staticmethod
  def model_from_info(info: dict[str, Any]) -> LLMEmbedder:
    return LLMEmbedder(LLMEmbedderConfig.from_dict(info['model']))

  def embed(self, texts: Sequence[str], images: Sequence[Sequence[np.ndarray]]) -> np.ndarray:
    """[N, embed_dim] of texts whose placeholders take `images[i]` (a list per text), in order."""
    if len(texts) != len(images):
      raise ValueError(f'{len(texts)} texts but {len(images)} image lists.')
    enc, size = self.encoder, self.config.image.image_size
    rows = [enc(t, len(ims)) for t, ims in zip(texts, images)]
    tokens = np.stack([r[0] for r in rows]) if rows else np.zeros((0, enc.max_len), np.int32)
    mask = np.stack([r[1] for r in rows]) if rows else tokens
    pixels = np.stack([llm_encoding.stack_images(ims, enc.max_images, size) for ims in images]) \
        if rows else np.zeros((0, enc.max_images, size, size, 3), np.uint8)
    out = [np.asarray(self._embed(self.params, t, m, x))[:valid]
           for (t, m, x), valid in self._batches([tokens, mask, pixels])]
    return np.concatenate(out) if out else np.zeros((0, self.embed_dim), np.float32)

  def embed_queries(self, task: str, contents: Sequence[str],
                    images: Sequence[Sequence[np.ndarray]]) -> np.ndarray:
    instruction = self.instructions.query[task]
    return self.embed([llm_encoding.format_text(instruction, c) for c in contents], images)

  def embed_candidates(self, contents: Sequence[str],
                       images: Sequence[Sequence[np.ndarray]]) -> np.ndarray:
    instruction = self.instructions.candidate
    return self.embed([llm_encoding.format_text(instruction, c) for c in contents], images)

  def embed_images(self, images: np.ndarray) -> np.ndarray:
    return self.embed_candidates([self.encoder.image_token] * len(images),
                                 [[x] for x in np.asarray(images)])

  def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
    if isinstance(texts, str):
      raise TypeError('embed_texts takes a list of strings, got one string.')
    return self.embed_candidates(list(texts), [[] for _ in texts])


class AudioEmbedder(Embedder):
  """The audio-text dual encoder's runner: `embed_audio(clips)` (mono float clips at the model's
  sample rate, each any length: longer ones are cut to max_seconds, shorter ones padded and
  masked) and `embed_texts(texts)` into one space."""

  FORMAT = AUDIO_EXPORT_FORMAT

  def __init__(self, model_config: AudioTextConfig, params: Any,
               encoder: tokenizer_lib.TextEncoder, mesh: Mesh | None = None,
               batch_size: int = 256):
    self.config, self.params, self.encoder = model_config, params, encoder
    self.model = AudioText(model_config)
    self._set_mesh(mesh, batch_size)
    batch_sh, apply = self._batch_sharding, self.model.apply
    repl = mesh_lib.replicated(self.mesh)
    self._embed_audio = jax.jit(
        lambda p, x, n: apply({'params': p}, x, n, method=AudioText.embed_audio),
        in_shardings=(None, batch_sh, batch_sh), out_shardings=repl)
    self._embed_texts = jax.jit(
        lambda p, t, m: apply({'params': p}, t, m, method=AudioText.embed_texts),
        in_shardings=(None, batch_sh, batch_sh), out_shardings=repl)

  @classmethod
  def from_export(cls, info: dict[str, Any], tokenizer, params, *, mesh: Mesh,
                  batch_size: int) -> AudioEmbedder:
    model_config = AudioTextConfig.from_dict(info['model'])
    encoder = tokenizer_lib.TextEncoder(tokenizer, model_config.text.max_len)
    return cls(model_config, params, encoder, mesh=mesh, batch_size=batch_size)

  @staticmethod
  def model_from_info(info: dict[str, Any]) -> AudioText:
    return AudioText(AudioTextConfig.from_dict(info['model']))

  def embedding_steps(self) -> dict[str, tuple[Any, tuple[Any, ...]]]:
    samples, length = self.config.audio.max_samples, self.config.text.max_len
    return {'embed_audio': (self._embed_audio, (self.params, self._spec((samples,), np.float32),
                                                self._spec((), np.int32))),
            'embed_texts': (self._embed_texts, (self.params, self._spec((length,), np.int32),
                                                self._spec((length,), np.int32)))}

  def embed_audio(self, clips: Sequence[np.ndarray]) -> np.ndarray:
    """[N, embed_dim] of N mono float clips (1-D arrays at config.audio.sample_rate)."""
    if isinstance(clips, np.ndarray) and clips.ndim == 1:
      raise TypeError('embed_audio takes a list of clips (or [N, samples]), got one clip.')
    rows = []
    for i, clip in enumerate(clips):
      clip = np.asarray(clip, np.float32)
      if clip.ndim != 1 or not len(clip):
        raise ValueError(f'Clip {i} has shape {clip.shape}; expected non-empty mono samples.')
      rows.append(audio_io.fit(clip, self.config.audio.max_samples))
    waves = np.stack([w for w, _ in rows]) if rows else np.zeros(
        (0, self.config.audio.max_samples), np.float32)
    lengths = np.asarray([n for _, n in rows], np.int32)
    out = [np.asarray(self._embed_audio(self.params, x, n))[:valid]
           for (x, n), valid in self._batches([waves, lengths])]
    return np.concatenate(out) if out else np.zeros((0, self.embed_dim), np.float32)

  def embed_images(self, images: np.ndarray) -> np.ndarray:
    raise TypeError('An audio-text model embeds audio and texts, not images.')


# The runner of each export format (load_embedder picks by model.json's 'format').
RUNNERS = {runner.FORMAT: runner for runner in (Embedder, MultimodalEmbedder, AudioEmbedder)}
