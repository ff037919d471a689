"""The `model` group: the towers, their heads and the LLM embedder (docs/configs.md).

Part of `mmjax.schema` (data: imports nothing of mmjax); each function adds its group to `c`.
"""

import ml_collections


def add_model(c: ml_collections.ConfigDict) -> None:
  """config.model: the embedding space and the heads shared by every kind."""
  # --- Model -----------------------------------------------------------------------------------
  c.model = ml_collections.ConfigDict()
  c.model.embed_dim = 256  # Size of the shared, L2-normalised embedding space.
  c.model.head = 'linear'  # Projection head of both towers: 'linear' | 'mlp' | 'none'.
  c.model.dtype = 'float32'  # Compute dtype of the towers ('bfloat16' on TPU/GPU).
  c.model.param_dtype = 'float32'  # Storage dtype of the parameters and optimizer state.
  # Per-tower projection head ('' = `head`), e.g. SigLIP: image 'none' (MAP head output), text
  # 'linear'; head_bias=False for CLIP's bias-free projections.
  c.model.image_head = ''
  c.model.text_head = ''
  c.model.head_bias = True


def add_image_tower(c: ml_collections.ConfigDict) -> None:
  """config.model.image: the ViT."""
  c.model.image = ml_collections.ConfigDict()
  c.model.image.image_size = 64  # Square input resolution in pixels.
  c.model.image.patch_size = 8  # Patch side; image_size must be a multiple of it.
  c.model.image.width = 256  # Transformer width.
  c.model.image.depth = 6  # Number of transformer blocks.
  c.model.image.num_heads = 4  # Attention heads; width must be a multiple of it.
  c.model.image.mlp_dim = 1024  # Hidden size of the MLP in each block.
  c.model.image.posemb = 'learn'  # Position embedding: 'learn' | 'sincos2d'.
  c.model.image.pool = 'gap'  # Pooling: 'cls' | 'gap' (mean over patches) | 'map' (attention).
  c.model.image.dropout = 0.0  # Dropout rate inside the blocks (train mode only).
  c.model.image.remat = False  # Recompute each block's activations in the backward pass.
  # What a remat'ed block keeps for the backward pass: a jax.checkpoint_policies name
  # (nothing_saveable | dots_saveable | ...) or save_attention | save_mlp_hidden (docs/configs.md).
  c.model.image.remat_policy = 'nothing_saveable'
  # Architecture options of released checkpoints (docs/pretrained.md); defaults are mmjax's own.
  c.model.image.norm = 'pre'  # LayerNorm placement: 'pre' | 'post' (BERT).
  c.model.image.act = 'gelu_tanh'  # MLP activation: 'gelu_tanh' | 'gelu' | 'quick_gelu' | 'relu'.
  c.model.image.ln_eps = 1e-6  # LayerNorm epsilon (BERT 1e-12, CLIP 1e-5).
  c.model.image.embed_ln = False  # LayerNorm on the embeddings before the blocks (CLIP vision).
  c.model.image.final_ln = True  # LayerNorm after the last block (False for post-LN stacks).
  c.model.image.locked = False  # LiT: frozen, run in eval mode, no gradient computed through it.
  c.model.image.patch_bias = True  # Bias on the patch embedding (CLIP has none).
  # Convolutional stem: one 3x3 stride-1 conv + GELU per entry (its output channels), run on the
  # full-resolution image before the patch embedding, which then patchifies the last one's
  # feature map. () (default): the plain ViT patch embedding of raw pixels.
  c.model.image.stem_channels = ()
  # How each stem conv downsamples: '' (default) keeps the full resolution; 'maxpool' (2x2 max
  # pool after each conv: a hybrid CNN-ViT front end) or 'stride' (stride-2 convs, the
  # early-convolution stem of Xiao et al. 2021) halve it per conv, and then image_size must be a
  # multiple of patch_size x 2 ** len(stem_channels) (patch_size 1 is usual).
  c.model.image.stem_downsample = ''
  c.model.image.posemb_cls = False  # The learned position embedding covers the CLS token (CLIP).
  # uint8 pixels -> (x/255 - mean)/std per RGB channel (CLIP's statistics); () maps to [-1, 1].
  c.model.image.pixel_mean = ()
  c.model.image.pixel_std = ()


def add_text_tower(c: ml_collections.ConfigDict) -> None:
  """config.model.text: the text transformer."""
  c.model.text = ml_collections.ConfigDict()
  c.model.text.max_len = 32  # Tokens per caption, EOS included; longer captions are truncated.
  c.model.text.vocab_size = 32_000  # Embedding rows; must be >= the tokenizer's vocabulary.
  c.model.text.width = 256
  c.model.text.depth = 6
  c.model.text.num_heads = 4
  c.model.text.mlp_dim = 1024
  c.model.text.causal = True  # Causal (GPT/CLIP-style) or bidirectional (BERT-style) attention.
  c.model.text.pool = 'last'  # 'last' (EOS token, by mask) | 'first' | 'mean' | 'map'.
  c.model.text.dropout = 0.0
  c.model.text.remat = False
  # What a remat'ed block keeps for the backward pass: a jax.checkpoint_policies name
  # (nothing_saveable | dots_saveable | ...) or save_attention | save_mlp_hidden (docs/configs.md).
  c.model.text.remat_policy = 'nothing_saveable'
  # The architecture options of model.image, the same defaults.
  c.model.text.norm, c.model.text.act, c.model.text.ln_eps = 'pre', 'gelu_tanh', 1e-6
  c.model.text.embed_ln, c.model.text.final_ln, c.model.text.locked = False, True, False
  c.model.text.num_positions = 0  # Position-embedding rows (BERT: 512); 0 means max_len.
  c.model.text.type_vocab_size = 0  # BERT token-type embedding rows (type 0 is used); 0: none.
  # Attend to (and pool over) padding too: SigLIP pads to max_len and reads the last position.
  c.model.text.attend_padding = False


def add_audio_tower(c: ml_collections.ConfigDict) -> None:
  """config.model.audio: the log-mel front end and its ViT."""
  # --- Audio tower (model.kind='audio_text', docs/modalities.md) --------------------------------
  # Waveform -> log-mel spectrogram on the device (librosa's conventions) -> AST-style ViT over
  # (patch_time frames x patch_freq mel bins) patches; clips shorter than max_seconds are padded
  # and masked (a padded clip embeds as the clip alone).
  c.model.audio = ml_collections.ConfigDict()
  c.model.audio.sample_rate = 16_000  # Hz; stored clips are resampled to it on load.
  c.model.audio.max_seconds = 10.0  # Longer clips are cropped (randomly when training).
  c.model.audio.n_fft = 400  # FFT size (25 ms at 16 kHz).
  c.model.audio.hop_length = 160  # Frame step (10 ms at 16 kHz); frames = 1 + samples // hop.
  c.model.audio.win_length = 0  # Hann window length; 0: n_fft.
  c.model.audio.n_mels = 64
  c.model.audio.fmin = 0.0
  c.model.audio.fmax = 0.0  # 0: sample_rate / 2.
  c.model.audio.mel_scale = 'slaney'  # 'slaney' (librosa's default) | 'htk'.
  c.model.audio.mel_norm = True  # Slaney area normalisation of the mel filters.
  c.model.audio.amin = 1e-10  # dB floor: 10 log10(max(power, amin)).
  c.model.audio.db_mean = -50.0  # The ViT sees (dB - db_mean) / db_std.
  c.model.audio.db_std = 20.0
  c.model.audio.patch_time = 8
  c.model.audio.patch_freq = 8  # Must divide n_mels.
  c.model.audio.pool = 'gap'  # 'gap' (mean over the clip's patches) | 'map' (attention pooling).
  # SpecAugment in training: this many time / frequency masks of up to *_width frames / bins.
  c.model.audio.spec_time_masks = 0
  c.model.audio.spec_time_width = 16
  c.model.audio.spec_freq_masks = 0
  c.model.audio.spec_freq_width = 8
  c.model.audio.width = 256
  c.model.audio.depth = 6
  c.model.audio.num_heads = 4
  c.model.audio.mlp_dim = 1024
  c.model.audio.dropout = 0.0
  c.model.audio.remat = False
  c.model.audio.norm, c.model.audio.act, c.model.audio.ln_eps = 'pre', 'gelu_tanh', 1e-6
  c.model.audio.embed_ln, c.model.audio.final_ln, c.model.audio.locked = False, True, False
  c.model.audio_head = ''  # Projection head of the audio tower ('' = `head`).


def add_token_heads(c: ml_collections.ConfigDict) -> None:
  """config.model.itm / caption: heads on the towers' token outputs."""
  # Heads on the towers' token outputs (docs/objectives.md); depth 0 builds none. Each needs its
  # loss weight (config.loss.itm_weight / caption_weight) > 0, and the weight needs the head.
  # ITM (ALBEF/BLIP): text tokens cross-attend to image tokens; a binary match logit that
  # re-ranks retrieval candidates (config.evals type 'rerank').
  c.model.itm = ml_collections.ConfigDict()
  c.model.itm.depth = 0  # Fusion blocks (self-attention, cross-attention, MLP).
  c.model.itm.num_heads = 4  # Must divide model.text.width (the fusion width).
  c.model.itm.mlp_dim = 0  # 0: 4 x model.text.width.
  # Captioning (CoCa): a causal text decoder (own token embedding, model.text width, vocabulary
  # and max_len) cross-attending to the image tokens.
  c.model.caption = ml_collections.ConfigDict()
  c.model.caption.depth = 0
  c.model.caption.num_heads = 4
  c.model.caption.mlp_dim = 0


def add_llm_embedder(c: ml_collections.ConfigDict) -> None:
  """config.model.kind, llm, decoder, lora: the model kind and the LLM embedder."""
  # --- LLM embedder (docs/llm_embedder.md) ------------------------------------------------------
  # 'two_tower': the dual encoder above (model.image + model.text). 'llm_embedder': model.image
  # -> projector -> visual tokens in a decoder LLM's sequence (model.decoder), pooled (model.llm).
  # 'audio_text': model.audio + model.text, trained on config.data.audio (docs/modalities.md).
  c.model.kind = 'two_tower'
  c.model.llm = ml_collections.ConfigDict()
  c.model.llm.max_len = 128  # Tokens per sequence (visual tokens, instruction, text, EOS).
  c.model.llm.max_images = 1  # Image slots per sequence; more images in one input are refused.
  c.model.llm.merge = 1  # merge x merge neighbouring ViT patches -> one visual token.
  c.model.llm.projector = 'mlp'  # Vision -> decoder width: 'mlp' (Dense-GELU-Dense) | 'linear'.
  c.model.llm.pool = 'last'  # 'last' (the EOS token's hidden state) | 'mean' (over the mask).
  # Matryoshka: nested prefix dimensions trained jointly (the loss is averaged over them and the
  # full width) and evaluated truncated; () trains the full width only.
  c.model.llm.matryoshka_dims = ()
  c.model.llm.temperature = 0.02  # Fixed InfoNCE temperature (logits = cos / temperature).
  c.model.llm.image_token = '<image>'  # Image placeholder in texts; added to the tokenizer.
  c.model.llm.eos_token = ''  # EOS appended to every sequence; '' finds [EOS], </s>, ...
  # The decoder tower (mmjax.config.DecoderConfig; Llama/Qwen2 sizes).
  c.model.decoder = ml_collections.ConfigDict()
  c.model.decoder.vocab_size = 32_000
  c.model.decoder.width = 256  # hidden_size; also the embedding dimension.
  c.model.decoder.depth = 4
  c.model.decoder.num_heads = 4
  c.model.decoder.num_kv_heads = 4  # < num_heads: grouped-query attention.
  c.model.decoder.head_dim = 0  # 0: width // num_heads.
  c.model.decoder.mlp_dim = 1024
  c.model.decoder.rope_theta = 10_000.0
  # Llama 3.x rope scaling (factor, low_freq_factor, high_freq_factor, original context); ().
  c.model.decoder.rope_scaling = ()
  c.model.decoder.rms_eps = 1e-6
  c.model.decoder.max_len = 512  # The decoder's context; model.llm.max_len must fit in it.
  c.model.decoder.qkv_bias = False  # Qwen2: True.
  c.model.decoder.scan_layers = False  # nn.scan over the layers (one compiled layer).
  c.model.decoder.remat = False
  c.model.decoder.remat_policy = 'nothing_saveable'  # A jax.checkpoint_policies name.
  c.model.decoder.dropout = 0.0
  # LoRA adapters (mmjax.models.lora, mmjax.config.LoraConfig) on the projections whose module
  # path matches `targets` ('llm/layers_0/attn/query'); rank 0: none. With rank > 0 the
  # decoder's base weights are frozen (the optimizer trains the adapters, projector and ViT).
  c.model.lora = ml_collections.ConfigDict()
  c.model.lora.rank = 0
  c.model.lora.alpha = 16.0  # The update is (alpha / rank) * x A B.
  c.model.lora.targets = r'attn/(query|key|value|out)$'
