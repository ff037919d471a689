"""Hugging Face checkpoints in and out of mmjax: BERT-family text encoders, CLIP and SigLIP.

`load(dir)` reads a local `config.json` + `model.safetensors` (never pickle, never the hub) and
returns the matching mmjax tower configs and parameters; `save(dir, ...)` writes them back in the
same safetensors layout. See docs/pretrained.md.
"""

from mmjax.hf.convert import CheckpointError, Pretrained, load, resolve_dir, save

__all__ = ['CheckpointError', 'Pretrained', 'load', 'resolve_dir', 'save']
