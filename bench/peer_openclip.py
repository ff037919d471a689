r"""The peer: open_clip trained with mmjax's recipe on bitwise the same batches, scored by mmjax.

Run (open_clip's own venv, see ../shared/DATA.md "Peers"; mmjax needs none of it):
  python bench/peer_data.py --config=configs/demo.py --workdir=runs/peer/demo --out=runs/peer/demo.npz
  /work/peer-venv/bin/python bench/peer_openclip.py --data=runs/peer/demo.npz --out=runs/peer/openclip

`bench/peer_data.py` (mmjax's venv) dumps the training batches of an mmjax run, its validation
pairs, its zero-shot tasks and the recipe; this trains `open_clip.model.CLIP` on them with the
same tower sizes, loss (`open_clip.loss.SigLipLoss` / `ClipLoss`), AdamW (b1, b2, eps, weight
decay on matrices and embeddings only), warm-up + cosine schedule, clipping, batch and steps,
and evaluates with mmjax's own metrics (`mmjax.eval.metrics`, `mmjax.eval.classification`: pure
NumPy). Everything that differs between the two is the implementation: initialisation, kernels,
GELU (exact here, tanh in mmjax), LayerNorm epsilon (1e-5 / 1e-6), the ViT's class token (open_clip
always prepends one; with 'gap' pooling it is attended to but not pooled).

The model is `open_clip.model.CustomTextCLIP` (open_clip's `CLIP` with the text tower kept as
one `TextTransformer` module, so its padding mask can be switched on). Its text tower runs with
`pool_type='none'` and is pooled here over mmjax's mask: a masked mean for bidirectional text
(configs/demo.py; open_clip has no mean pooler, and the mean commutes with the linear
projection), the last valid token (EOS) for causal text (open_clip's 'argmax' pooling assumes
CLIP's BPE, where EOS has the highest id).

Writes `OUT/log.jsonl` (per step: loss, learning rate, temperature, bias, grad norm) and
`OUT/eval.json` (mmjax's metric names). The building blocks (`load`, `build_model`,
`make_optimizer`, `train`, `evaluate`) are importable for other side-by-side benchmarks.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import pathlib
import sys
import time
from typing import Any

import numpy as np

_ROOT = pathlib.Path(__file__).resolve().parent.parent


def _mmjax_module(name: str):
  """An mmjax module that needs only NumPy (and Pillow), loaded by path: this venv has no JAX,
  and `mmjax/__init__` is light, so the package imports stay cheap."""
  if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))
  return importlib.import_module(name)


def import_open_clip():
  """open_clip, importable beside CPU torch: the pinned torchvision is a CUDA build whose C ops
  cannot load, and it fails in `register_fake("torchvision::nms")`. open_clip uses only its pure
  Python parts, so `register_fake` is a no-op for missing torchvision ops while it imports."""
  import torch  # pylint: disable=import-outside-toplevel
  real = torch.library.register_fake

  def tolerant(op, func=None, /, *args, **kwargs):
    if not (isinstance(op, str) and op.startswith('torchvision::')):
      return real(op, func, *args, **kwargs)

    def register(fn):
      try:
        return real(op, fn, *args, **kwargs)
      except RuntimeError:  # "operator torchvision::nms does not exist"
        return fn
    return register if func is None else register(func)

  torch.library.register_fake = tolerant
  try:
    import open_clip  # pylint: disable=import-outside-toplevel
  finally:
    torch.library.register_fake = real
  return open_clip


def load(path: str | pathlib.Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """(recipe, arrays) of a `bench/peer_data.py` dump; arrays are loaded lazily by the npz."""
  data = np.load(path)
  return json.loads(str(data['recipe'])), data


# --- The model -----------------------------------------------------------------------------------

def _check_supported(model: dict[str, Any]) -> None:
  img, txt = model['image'], model['text']
  problems = []
  if img['pool'] not in ('gap', 'cls'):
    problems.append(f"image.pool={img['pool']!r} (gap | cls)")
  if txt['pool'] not in ('mean', 'last'):
    problems.append(f"text.pool={txt['pool']!r} (mean | last)")
  if txt['pool'] == 'last' and not txt['causal']:
    problems.append('text.pool=last needs text.causal=True here')
  if model['head'] != 'linear' or model['image_head'] or model['text_head']:
    problems.append('heads other than linear')
  if img['width'] % img['num_heads'] or img['posemb'] != 'learn':
    problems.append('image heads/posemb')
  if problems:
    raise ValueError('peer_openclip cannot copy this recipe: ' + '; '.join(problems))


def build_model(recipe: dict[str, Any]):
  """`open_clip.model.CLIP` with the recipe's tower sizes, logit scale and bias."""
  open_clip = import_open_clip()
  m = recipe['model']
  _check_supported(m)
  img, txt = m['image'], m['text']
  vision_cfg = dict(layers=img['depth'], width=img['width'],
                    head_width=img['width'] // img['num_heads'],
                    mlp_ratio=img['mlp_dim'] / img['width'], patch_size=img['patch_size'],
                    image_size=img['image_size'], no_ln_pre=not img['embed_ln'],
                    pool_type='avg' if img['pool'] == 'gap' else 'tok')
  text_cfg = dict(context_length=txt['max_len'], vocab_size=txt['vocab_size'], width=txt['width'],
                  heads=txt['num_heads'], layers=txt['depth'],
                  mlp_ratio=txt['mlp_dim'] / txt['width'], no_causal_mask=not txt['causal'],
                  pad_id=int(recipe.get('pad_id', 0)),
                  pool_type='none', proj_bias=bool(m['head_bias']))
  model = open_clip.model.CustomTextCLIP(
      embed_dim=m['embed_dim'], vision_cfg=vision_cfg, text_cfg=text_cfg,
      init_logit_scale=m['temperature_init'],
      init_logit_bias=m['bias_init'] if m['loss'] == 'sigmoid' else None)
  # Bidirectional: padding is masked out of attention (TextTransformer's own key mask).
  model.text.use_pad_mask = not txt['causal']
  model.mmjax_text_pool = txt['pool']
  return model


def _images(images: np.ndarray):
  """uint8 NHWC -> float NCHW in [-1, 1], mmjax's default normalisation."""
  import torch  # pylint: disable=import-outside-toplevel
  x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
  return x * (2.0 / 255.0) - 1.0


def encode_images(model, images: np.ndarray):
  import torch.nn.functional as F  # pylint: disable=import-outside-toplevel
  return F.normalize(model.visual(_images(images)), dim=-1)


def encode_texts(model, tokens: np.ndarray, mask: np.ndarray):
  """L2-normalised text embeddings: the masked mean ('mean') or the last valid position
  ('last': the EOS mmjax's tokenizer appends) of the projected tokens."""
  import torch  # pylint: disable=import-outside-toplevel
  import torch.nn.functional as F  # pylint: disable=import-outside-toplevel
  z = model.text(torch.from_numpy(np.asarray(tokens, np.int64)))
  m = torch.from_numpy(np.asarray(mask, np.float32))
  if model.mmjax_text_pool == 'mean':
    z = (z * m[..., None]).sum(1) / m.sum(1).clamp(min=1.0)[:, None]
  else:
    z = z[torch.arange(len(z)), m.sum(1).long() - 1]
  return F.normalize(z, dim=-1)


# --- The optimizer -------------------------------------------------------------------------------

def lr_at(opt: dict[str, Any], total_steps: int, step: int) -> float:
  """optax.warmup_cosine_decay_schedule (or warm-up + constant) at `step`, as mmjax builds it."""
  peak, warmup = opt['learning_rate'], opt['warmup_steps']
  if step < warmup:
    return peak * step / warmup
  if opt['schedule'] != 'cosine':
    return peak
  decay = max(total_steps, warmup + 1) - warmup
  frac = min(step - warmup, decay) / decay
  end = peak * opt['end_lr_ratio']
  return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * frac))


def make_optimizer(model, opt: dict[str, Any]):
  """torch AdamW with mmjax's decay mask: matrices and embeddings decay (ndim >= 2), biases,
  norms, the class token and the logit scale/bias do not."""
  import torch  # pylint: disable=import-outside-toplevel
  params = [p for p in model.parameters() if p.requires_grad]
  decay = [p for p in params if p.ndim >= 2]
  no_decay = [p for p in params if p.ndim < 2]
  return torch.optim.AdamW(
      [{'params': decay, 'weight_decay': opt['weight_decay']},
       {'params': no_decay, 'weight_decay': 0.0}],
      lr=0.0, betas=(opt['b1'], opt['b2']), eps=opt['eps'])


def make_loss(recipe: dict[str, Any]):
  open_clip = import_open_clip()
  if recipe['model']['loss'] == 'sigmoid':
    return open_clip.loss.SigLipLoss()
  return open_clip.loss.ClipLoss()


# --- Training and evaluation ----------------------------------------------------------------------

def train(model, recipe: dict[str, Any], batches, log_path: pathlib.Path | None = None,
          steps: int | None = None) -> list[dict[str, float]]:
  """Trains on `batches` (an iterable of dicts image/tokens/mask), one optimizer step each."""
  import torch  # pylint: disable=import-outside-toplevel
  opt_cfg, total = recipe['optimizer'], recipe['total_steps']
  steps = steps or total
  optimizer, loss_fn = make_optimizer(model, opt_cfg), make_loss(recipe)
  sigmoid = recipe['model']['loss'] == 'sigmoid'
  model.train()
  log, t0 = [], time.perf_counter()
  out = open(log_path, 'w') if log_path else contextlib.nullcontext()
  with out as f:
    for step, batch in enumerate(batches):
      if step >= steps:
        break
      lr = lr_at(opt_cfg, total, step)
      for group in optimizer.param_groups:
        group['lr'] = lr
      zimg = encode_images(model, batch['image'])
      ztxt = encode_texts(model, batch['tokens'], batch['mask'])
      scale = model.logit_scale.exp()
      loss = loss_fn(zimg, ztxt, scale, model.logit_bias) if sigmoid else loss_fn(zimg, ztxt, scale)
      optimizer.zero_grad(set_to_none=True)
      loss.backward()
      clip = opt_cfg['grad_clip_norm']
      norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip if clip > 0 else math.inf)
      optimizer.step()
      rec = {'step': step + 1, 'loss': float(loss), 'learning_rate': lr,
             'temperature': float(scale), 'grad_norm': float(norm),
             'bias': float(model.logit_bias) if sigmoid else 0.0,
             'elapsed_s': time.perf_counter() - t0}
      log.append(rec)
      if f:
        f.write(json.dumps(rec) + '\n')
        f.flush()
  return log


def _embed(fn, *arrays, batch: int = 256) -> np.ndarray:
  import torch  # pylint: disable=import-outside-toplevel
  with torch.no_grad():
    parts = [fn(*(a[i:i + batch] for a in arrays)).numpy() for i in range(0, len(arrays[0]),
                                                                          batch)]
  return np.concatenate(parts)


def evaluate(model, data) -> dict[str, float]:
  """mmjax's metrics of the dumped eval sets: the demo validation pairs ('i2t/...'), each
  retrieval set on ingested data ('NAME/i2t/...', any caption of an image relevant to it, as
  `mmjax.eval.retrieval.RetrievalEvaluator` scores it) and each zero-shot task."""
  metrics = _mmjax_module('mmjax.eval.metrics')
  model.eval()
  names = ('recall@1', 'recall@5', 'recall@10', 'mrr', 'median_rank')
  out = {}
  if 'val_image' in data.files:
    zimg = _embed(lambda x: encode_images(model, x), data['val_image'])
    ztxt = _embed(lambda t, m: encode_texts(model, t, m), data['val_tokens'], data['val_mask'])
    scores = zimg.astype(np.float32) @ ztxt.astype(np.float32).T
    for direction, s in (('i2t', scores), ('t2i', scores.T)):
      out |= {f'{direction}/{k}': v
              for k, v in metrics.from_ranks(metrics.ranks_of_true(s), names).items()}
  for key in data.files:
    if key.startswith('ret/') and key.endswith('/owner'):
      name = key.split('/')[1]
      zimg = _embed(lambda x: encode_images(model, x), data[f'ret/{name}/image'])
      ztxt = _embed(lambda t, m: encode_texts(model, t, m), data[f'ret/{name}/tokens'],
                    data[f'ret/{name}/mask'])
      scores = zimg.astype(np.float32) @ ztxt.astype(np.float32).T
      rel = (np.arange(len(zimg))[:, None] == data[key][None, :]).astype(np.float32)
      for direction, s, r in (('i2t', scores, rel), ('t2i', scores.T, rel.T)):
        out |= {f'{name}/{direction}/{k}': v for k, v in metrics.from_scores(s, r, names).items()}
    if key.startswith('zs/') and key.endswith('/classes'):
      name = key.split('/')[1]
      out |= {f'{name}/{k}': v for k, v in zero_shot(model, data, name).items()
              if not k.startswith('per_class')}
  model.train()
  return out


def zero_shot(model, data, name: str) -> dict[str, float]:
  """mmjax.eval.classification's zero-shot accuracy, class embeddings from the dumped prompts."""
  cls_lib = _mmjax_module('mmjax.eval.classification')
  classes = [str(c) for c in data[f'zs/{name}/classes']]
  z = _embed(lambda t, m: encode_texts(model, t, m), data[f'zs/{name}/tokens'],
             data[f'zs/{name}/mask'])
  z = z.reshape(len(classes), -1, z.shape[-1])
  class_emb = cls_lib._normalise(cls_lib._normalise(z.astype(np.float64)).mean(axis=1))  # pylint: disable=protected-access
  image_emb = _embed(lambda x: encode_images(model, x), data[f'zs/{name}/image'])
  return cls_lib.zero_shot_metrics(image_emb, data[f'zs/{name}/label'], class_emb, classes)


def dumped_batches(data):
  """The dumped training batches in order (the arrays are read one step at a time)."""
  images, tokens, mask = data['train_image'], data['train_tokens'], data['train_mask']
  for i in range(len(images)):
    yield {'image': images[i], 'tokens': tokens[i], 'mask': mask[i]}


def main(argv=None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--data', required=True, help='A bench/peer_data.py .npz.')
  parser.add_argument('--out', required=True, help='Output directory (log.jsonl, eval.json).')
  parser.add_argument('--threads', type=int, default=0, help='torch threads (0: default).')
  args = parser.parse_args(argv)
  import torch  # pylint: disable=import-outside-toplevel
  if args.threads:
    torch.set_num_threads(args.threads)
  recipe, data = load(args.data)
  if 'pad_id' not in recipe:  # Older dumps: the padding positions hold the pad id.
    recipe['pad_id'] = int(data['val_tokens'][data['val_mask'] == 0][0])
  torch.manual_seed(recipe['seed'])
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  model = build_model(recipe)
  # The whole train array is one npz member: read it once, not once per step.
  batches = dumped_batches({k: data[k] for k in ('train_image', 'train_tokens', 'train_mask')})
  t0 = time.perf_counter()
  log = train(model, recipe, batches, out / 'log.jsonl')
  train_s = time.perf_counter() - t0
  result = {**evaluate(model, data), 'step': len(log), 'train_s': train_s,
            'final_temperature': log[-1]['temperature'], 'final_bias': log[-1]['bias'],
            'torch': torch.__version__, 'open_clip': import_open_clip().__version__}
  (out / 'eval.json').write_text(json.dumps(result, indent=1))
  print(json.dumps({k: v for k, v in result.items() if '/' not in k or 'recall@1' in k
                    or k.endswith('top1')}, indent=1))
  return result


if __name__ == '__main__':
  main()
