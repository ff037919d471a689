"""Hugging Face checkpoints in and out of mmjax: BERT-family text encoders, CLIP and SigLIP, and
Llama/Qwen2 decoders (`load_decoder` / `save_decoder`, the LLM embedder's tower).

`load(dir)` reads a local `config.json` + `model.safetensors` (never pickle, never the hub) and
returns the matching mmjax tower configs and parameters; `save(dir, ...)` writes them back in the
same safetensors layout. See docs/pretrained.md.
"""

from mmjax.hf.convert import Pretrained, load, save
from mmjax.hf.llama import DecoderCheckpoint
from mmjax.hf.llama import load as load_decoder
from mmjax.hf.llama import save as save_decoder
from mmjax.hf.storage import CheckpointError, resolve_dir

__all__ = ['CheckpointError', 'DecoderCheckpoint', 'Pretrained', 'load', 'load_decoder',
           'resolve_dir', 'save', 'save_decoder']
