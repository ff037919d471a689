"""The dual-encoder families (`bert`, `clip`, `siglip`), each described once for both directions:
`*_configs` turns `config.json` into mmjax tower configs (architecture options included), and
`*_rules` lists every tensor as (HF key, mmjax path, layout), the table import and export both
run off (mmjax.hf.convert). Tensors a family's checkpoints hold that mmjax does not use are named
in `UNUSED` (kept for export).
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from mmjax.types import TextConfig, ViTConfig
from mmjax.hf.storage import CheckpointError

HF_ACTIVATIONS = {'gelu': 'gelu', 'gelu_new': 'gelu_tanh', 'gelu_pytorch_tanh': 'gelu_tanh',
                  'quick_gelu': 'quick_gelu', 'relu': 'relu'}



# A rule: (HF key, mmjax path 'txt/encoder/block0/attn/query/kernel', layout).
# Layouts: 'same'; 'flat' (any reshape, HF side flat or leading ones dropped: biases [h, hd],
# position tables [1, N, d], CLS [1, 1, d]); ('linear', n_in) (torch [out, in] <-> kernel
# [*in, *out]); 'conv' (torch [out, C, p, p] <-> [p, p, C, out]).
Rule = tuple[str, str, Any]


def _act(name: str, where: str) -> str:
  if name not in HF_ACTIVATIONS:
    raise CheckpointError(f'{where}: hidden_act={name!r} is not supported '
                          f'(supported: {", ".join(HF_ACTIVATIONS)}).')
  return HF_ACTIVATIONS[name]


def _encoder_fields(c: dict, where: str) -> dict[str, Any]:
  return dict(width=c['hidden_size'], depth=c['num_hidden_layers'],
              num_heads=c['num_attention_heads'], mlp_dim=c['intermediate_size'],
              act=_act(c['hidden_act'], where), ln_eps=float(c['layer_norm_eps']))


# Defaults of transformers' CLIP/SigLIP sub-configs, for fields a config.json leaves out.
_CLIP_TEXT = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                  num_attention_heads=8, max_position_embeddings=77, hidden_act='quick_gelu',
                  layer_norm_eps=1e-5)
_CLIP_VISION = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                    num_attention_heads=12, num_channels=3, image_size=224, patch_size=32,
                    hidden_act='quick_gelu', layer_norm_eps=1e-5)
_SIGLIP_TEXT = dict(vocab_size=32000, hidden_size=768, intermediate_size=3072,
                    num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=64,
                    hidden_act='gelu_pytorch_tanh', layer_norm_eps=1e-6)
_SIGLIP_VISION = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                      num_attention_heads=12, num_channels=3, image_size=224, patch_size=16,
                      hidden_act='gelu_pytorch_tanh', layer_norm_eps=1e-6, vision_use_head=True)


def bert_configs(c: dict) -> tuple[None, TextConfig, dict[str, Any]]:
  if c.get('position_embedding_type', 'absolute') != 'absolute':
    raise CheckpointError(f"config.json: position_embedding_type={c['position_embedding_type']!r}"
                          " is not supported (only 'absolute').")
  text = TextConfig(**_encoder_fields(c, 'config.json'), max_len=c['max_position_embeddings'],
                    num_positions=c['max_position_embeddings'],
                    vocab_size=c['vocab_size'], causal=False, pool='mean', norm='post',
                    embed_ln=True, final_ln=False, type_vocab_size=c.get('type_vocab_size', 2))
  return None, text, dict(embed_dim=text.width, head='none')


# OpenAI CLIP's pixel statistics (its image processor's defaults). SigLIP's (0.5, 0.5) is
# mmjax's own [-1, 1] mapping.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_configs(c: dict) -> tuple[ViTConfig, TextConfig, dict[str, Any]]:
  t = {**_CLIP_TEXT, **c.get('text_config', {})}
  v = {**_CLIP_VISION, **c.get('vision_config', {})}
  _channels(v)
  image = ViTConfig(**_encoder_fields(v, 'vision_config'), image_size=v['image_size'],
                    patch_size=v['patch_size'], posemb='learn', pool='cls', posemb_cls=True,
                    patch_bias=False, embed_ln=True, pixel_mean=CLIP_MEAN, pixel_std=CLIP_STD)
  text = TextConfig(**_encoder_fields(t, 'text_config'), max_len=t['max_position_embeddings'],
                    num_positions=t['max_position_embeddings'],
                    vocab_size=t['vocab_size'], causal=True, pool='last')
  return image, text, dict(embed_dim=c.get('projection_dim', 512), head='linear',
                           head_bias=False, loss='softmax',
                           temperature_init=float(c.get('logit_scale_init_value', 2.6592)),
                           bias_init=None)


def siglip_configs(c: dict) -> tuple[ViTConfig, TextConfig, dict[str, Any]]:
  t = {**_SIGLIP_TEXT, **c.get('text_config', {})}
  v = {**_SIGLIP_VISION, **c.get('vision_config', {})}
  _channels(v)
  if not v['vision_use_head']:
    raise CheckpointError('vision_config: vision_use_head=False is not supported (mmjax pools '
                          'SigLIP images with the MAP head).')
  proj = t.get('projection_size') or t['hidden_size']
  if proj != v['hidden_size']:
    raise CheckpointError(f"text_config.projection_size={proj} != vision_config.hidden_size="
                          f"{v['hidden_size']}: the two embeddings would not share a space.")
  image = ViTConfig(**_encoder_fields(v, 'vision_config'), image_size=v['image_size'],
                    patch_size=v['patch_size'], posemb='learn', pool='map')
  text = TextConfig(**_encoder_fields(t, 'text_config'), max_len=t['max_position_embeddings'],
                    num_positions=t['max_position_embeddings'],
                    vocab_size=t['vocab_size'], causal=False, pool='last', attend_padding=True)
  return image, text, dict(embed_dim=v['hidden_size'], head='linear', image_head='none',
                           loss='sigmoid', temperature_init=0.0, bias_init=0.0)


def _channels(v: dict) -> None:
  if v.get('num_channels', 3) != 3:
    raise CheckpointError(f"vision_config.num_channels={v['num_channels']} is not supported (3).")


FAMILIES = {'bert': bert_configs, 'clip': clip_configs, 'siglip': siglip_configs}
# Decoder LLMs: the LLM embedder's tower, imported by mmjax.hf.llama.
DECODER_FAMILIES = ('llama', 'qwen2')


def family_of(c: dict, where: str) -> str:
  kind = c.get('model_type')
  if kind in DECODER_FAMILIES:
    raise CheckpointError(f'{where}: model_type={kind!r} is a decoder LLM, not a dual-encoder '
                          'tower: import it with mmjax.hf.load_decoder.')
  if kind not in FAMILIES:
    raise CheckpointError(f'{where}: model_type={kind!r} is a different architecture than mmjax '
                          f'imports (supported: {", ".join(FAMILIES)}).')
  return kind


# ---------------------------------------------------------------------------------------------
# Tensor tables.


def dense(hf: str, mm: str, n_in: int = 1, bias: bool = True) -> list[Rule]:
  rules = [(f'{hf}.weight', f'{mm}/kernel', ('linear', n_in))]
  return rules + ([(f'{hf}.bias', f'{mm}/bias', 'flat')] if bias else [])


def _ln(hf: str, mm: str) -> list[Rule]:
  return [(f'{hf}.weight', f'{mm}/scale', 'same'), (f'{hf}.bias', f'{mm}/bias', 'same')]


BERT_BLOCK = dict(q='attention.self.query', k='attention.self.key', v='attention.self.value',
                  o='attention.output.dense', ln1='attention.output.LayerNorm',
                  fc1='intermediate.dense', fc2='output.dense', ln2='output.LayerNorm')
CLIP_BLOCK = dict(q='self_attn.q_proj', k='self_attn.k_proj', v='self_attn.v_proj',
                  o='self_attn.out_proj', ln1='layer_norm1', fc1='mlp.fc1', fc2='mlp.fc2',
                  ln2='layer_norm2')


def _blocks(hf: str, mm: str, depth: int, names: dict[str, str]) -> list[Rule]:
  rules = []
  for i in range(depth):
    h, m = f'{hf}.{i}', f'{mm}/encoder/block{i}'
    for x, y in (('q', 'query'), ('k', 'key'), ('v', 'value')):
      rules += dense(f'{h}.{names[x]}', f'{m}/attn/{y}')
    rules += dense(f'{h}.{names["o"]}', f'{m}/attn/out', n_in=2)
    rules += _ln(f'{h}.{names["ln1"]}', f'{m}/ln1') + _ln(f'{h}.{names["ln2"]}', f'{m}/ln2')
    rules += dense(f'{h}.{names["fc1"]}', f'{m}/mlp/fc1')
    rules += dense(f'{h}.{names["fc2"]}', f'{m}/mlp/fc2')
  return rules


def bert_rules(image, text, model) -> list[Rule]:
  del image, model
  e = 'embeddings'
  return [(f'{e}.word_embeddings.weight', 'txt/token_embedding', 'same'),
          (f'{e}.position_embeddings.weight', 'txt/pos_embedding', 'flat'),
          (f'{e}.token_type_embeddings.weight', 'txt/type_embedding', 'same'),
          *_ln(f'{e}.LayerNorm', 'txt/embed_ln'),
          *_blocks('encoder.layer', 'txt', text.depth, BERT_BLOCK)]


def _clip_text(text) -> list[Rule]:
  e = 'text_model.embeddings'
  return [(f'{e}.token_embedding.weight', 'txt/token_embedding', 'same'),
          (f'{e}.position_embedding.weight', 'txt/pos_embedding', 'flat'),
          *_blocks('text_model.encoder.layers', 'txt', text.depth, CLIP_BLOCK),
          *_ln('text_model.final_layer_norm', 'txt/encoder/ln_final')]


def _vision_blocks(image) -> list[Rule]:
  return _blocks('vision_model.encoder.layers', 'img', image.depth, CLIP_BLOCK) + _ln(
      'vision_model.post_layernorm', 'img/encoder/ln_final')


def clip_rules(image, text, model) -> list[Rule]:
  del model
  e = 'vision_model.embeddings'
  return [(f'{e}.class_embedding', 'img/cls', 'flat'),
          (f'{e}.patch_embedding.weight', 'img/patch_kernel', 'conv'),
          (f'{e}.position_embedding.weight', 'img/pos_embedding', 'flat'),
          *_ln('vision_model.pre_layrnorm', 'img/embed_ln'),  # sic: HF's spelling.
          *_vision_blocks(image), *_clip_text(text),
          *dense('visual_projection', 'img_head/out', bias=False),
          *dense('text_projection', 'txt_head/out', bias=False),
          ('logit_scale', 't_prime', 'same')]


def siglip_rules(image, text, model) -> list[Rule]:
  del model
  e, h = 'vision_model.embeddings', 'vision_model.head'
  return [(f'{e}.patch_embedding.weight', 'img/patch_kernel', 'conv'),
          (f'{e}.patch_embedding.bias', 'img/patch_bias', 'same'),
          (f'{e}.position_embedding.weight', 'img/pos_embedding', 'flat'),
          *_vision_blocks(image),
          (f'{h}.probe', 'img/map_head/probe', 'same'),
          # torch.nn.MultiheadAttention packs q/k/v; split by unpack / joined by pack.
          *[r for x, y in (('q', 'query'), ('k', 'key'), ('v', 'value'))
            for r in dense(f'{h}.attention.in_proj:{x}', f'img/map_head/attn/{y}')],
          *dense(f'{h}.attention.out_proj', 'img/map_head/attn/out', n_in=2),
          *_ln(f'{h}.layernorm', 'img/map_head/ln'),
          *dense(f'{h}.mlp.fc1', 'img/map_head/mlp/fc1'),
          *dense(f'{h}.mlp.fc2', 'img/map_head/mlp/fc2'),
          *_clip_text(text),
          *dense('text_model.head', 'txt_head/out'),
          ('logit_scale', 't_prime', 'flat'), ('logit_bias', 'bias', 'flat')]


RULES = {'bert': bert_rules, 'clip': clip_rules, 'siglip': siglip_rules}
# Tensors a family's checkpoints may hold that mmjax does not use: kept for export only.
UNUSED = {'bert': (r'(^|\.)position_ids$', r'^pooler\.', r'^cls\.'),
          'clip': (r'(^|\.)position_ids$',), 'siglip': (r'(^|\.)position_ids$',)}


def unpack(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Splits MultiheadAttention's packed in_proj_{weight,bias} into q/k/v (SigLIP's MAP head)."""
  out = {}
  for key, value in tensors.items():
    m = re.fullmatch(r'(.*)\.in_proj_(weight|bias)', key)
    if m and value.shape[0] % 3 == 0:
      for x, part in zip('qkv', np.split(value, 3, axis=0)):
        out[f'{m.group(1)}.in_proj:{x}.{m.group(2)}'] = part
    else:
      out[key] = value
  return out


def pack(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  out, packed = {}, {}
  for key, value in tensors.items():
    m = re.fullmatch(r'(.*)\.in_proj:([qkv])\.(weight|bias)', key)
    if m:
      packed.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = value
    else:
      out[key] = value
  for (prefix, kind), parts in packed.items():
    out[f'{prefix}.in_proj_{kind}'] = np.concatenate([parts[x] for x in 'qkv'], axis=0)
  return out
