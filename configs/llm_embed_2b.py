r"""LLM embedder, 2B class: a Qwen2-1.5B-sized decoder with LoRA reading a frozen ViT-L/14-336-
sized vision tower (~1.9B parameters), batch 1024 with GradCache, on an 8-device FSDP mesh.

A recipe, not a CPU run: its compiled memory per device is checked without running it by
  python bench/llm_embed_memory.py --config=configs/llm_embed_2b.py
(BENCHMARKS.md has the numbers). On real hardware, with the decoder weights imported
(docs/llm_embedder.md) and the model's tokenizer in config.tokenizer.path:
  python -m mmjax.main --config=configs/llm_embed_2b.py --workdir=runs/llm_embed_2b \
      --config.tokenizer.path=/path/to/qwen2 --config.model.llm.eos_token='<|endoftext|>'
"""

from configs import base


def get_config():
  c = base.get_config()
  c.model.kind = 'llm_embedder'
  c.loss.kind = 'softmax'  # InfoNCE at the fixed temperature 0.02, in-batch + hard negatives.
  c.batch_size = 1024
  # GradCache: each device embeds its 128 rows in 16 micro-batches of 8 (activations of one
  # micro-batch live at a time), then the loss sees all 1024 x 1024 pairs.
  c.micro_batches = 16
  c.data.num_hard_negatives = 1
  c.total_steps = 2000

  c.model.dtype = 'bfloat16'
  c.model.param_dtype = 'bfloat16'  # The frozen base in bf16; adapters' AdamW state is small.

  # Vision: ViT-L/14 at 336 px (CLIP-L sizes): 24x24 patches, merged 2x2 -> 144 visual tokens.
  c.model.image.image_size = 336
  c.model.image.patch_size = 14
  c.model.image.width = 1024
  c.model.image.depth = 24
  c.model.image.num_heads = 16
  c.model.image.mlp_dim = 4096
  # Frozen vision tower (its features pass no gradient, so GradCache keeps none of its
  # activations): trained, its 24 unscanned layers' backward dominated the compiled memory (77 GiB
  # per device measured, BENCHMARKS.md); the projector and the LoRA adapters train.
  c.model.image.locked = True
  c.model.llm.merge = 2
  c.model.llm.max_len = 384  # 144 visual tokens + instruction + text.
  c.model.llm.matryoshka_dims = (256, 512, 1024)

  # Qwen2-1.5B.
  c.model.decoder.vocab_size = 151_936
  c.model.decoder.width = 1536
  c.model.decoder.depth = 28
  c.model.decoder.num_heads = 12
  c.model.decoder.num_kv_heads = 2
  c.model.decoder.mlp_dim = 8960
  c.model.decoder.rope_theta = 1_000_000.0
  c.model.decoder.rms_eps = 1e-6
  c.model.decoder.max_len = 32_768
  c.model.decoder.qkv_bias = True
  c.model.decoder.scan_layers = True
  c.model.decoder.remat = True
  c.model.decoder.remat_policy = 'nothing_saveable'
  # LoRA r=16 on every attention and MLP projection of the decoder; its base is frozen.
  c.model.lora.rank = 16
  c.model.lora.alpha = 32.0
  c.model.lora.targets = r'llm/.*(attn/(query|key|value|out)|mlp/(gate|up|down))$'

  c.optimizer.learning_rate = 2e-4
  c.optimizer.warmup_steps = 100
  c.optimizer.weight_decay = 0.0

  # 8 devices, parameters and optimizer state sharded 8 ways (FSDP), the batch split over all.
  c.mesh.data = 1
  c.mesh.fsdp = 8
  c.mesh.tensor = 1

  c.eval.batch_size = 256
  c.eval.every_steps = 500
  c.checkpoint.every_steps = 500
  return c
