r"""The config schema: every field mmjax reads, each commented once, with its default.

It is data (it imports nothing of mmjax), so every layer may read it; `mmjax.config` validates a
run config against it. Config files start from it through `configs/base.py`:
  python -m mmjax.main --config=configs/base.py --workdir=runs/base

Any field can be overridden on the command line, e.g. `--config.batch_size=512
--config.model.image.depth=12`. The config is locked: a key not listed here is an error.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()

  c.seed = 0  # Seeds parameter init, dropout and the data order.
  c.batch_size = 256  # Global batch (pairs per step), summed over all devices and processes.
  # GradCache: each device's share of the batch is embedded in this many micro-batches, so the
  # activation memory is that of batch_size / (data x fsdp x micro_batches) pairs; loss and
  # gradients stay exactly those of the whole batch (costs one extra forward pass).
  c.micro_batches = 1
  c.total_steps = 1000  # Optimizer steps of the whole run.
  c.log_every_steps = 50  # Train metrics go to metrics.jsonl / TensorBoard this often.
  # Persistent XLA compilation cache, so a repeated or resumed run loads its compiled steps
  # instead of compiling them (mmjax.train.compile_cache): 'user' ($MMJAX_CACHE_DIR, else
  # $XDG_CACHE_HOME/mmjax or ~/.cache/mmjax, then jax/), 'workdir' (WORKDIR/jax_cache), a
  # directory path, or '' (off).
  c.compilation_cache = 'user'
  c.compilation_cache_min_compile_s = 1.0  # Programs compiling faster than this are not cached.
  # XLA:CPU only: schedule for memory instead of concurrency (XLA_FLAGS
  # --xla_cpu_enable_concurrency_optimized_scheduler=false, set by mmjax.main before the backend
  # starts); bench-tiny train step: 23% less temp memory, and remat then saves memory.
  c.cpu_memory_scheduler = False

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

  # --- Loss ------------------------------------------------------------------------------------
  c.loss = ml_collections.ConfigDict()
  c.loss.kind = 'sigmoid'  # 'sigmoid' (SigLIP) | 'softmax' (symmetric InfoNCE, CLIP).
  # Initial log-temperature t' (temperature = exp(t')). None: log(10) for sigmoid, log(1/0.07)
  # for softmax. The bias b (sigmoid only) starts at bias_init (SigLIP: -10).
  c.loss.temperature_init = ml_collections.config_dict.placeholder(float)
  c.loss.bias_init = -10.0
  # How the loss spans devices: 'auto' ('ring' for sigmoid, 'all_gather' for softmax, 'dense' on
  # one batch shard) | 'ring' (sigmoid: text blocks circulate, O(b^2) memory per device) |
  # 'all_gather' (each device: its rows vs the gathered other tower, O(b*B)) | 'dense' (the
  # global [B, B] logits; the reference). b = batch_size / (data x fsdp).
  c.loss.impl = 'auto'
  # Robust loss for noisy pairs: each step, this fraction of the batch whose image and caption
  # agree least (lowest positive similarity = highest positive-pair loss) is left out of the loss.
  c.loss.drop_noisy_fraction = 0.0
  # Weights of the terms on token outputs beside the contrastive loss (0: off; docs/objectives.md):
  # ITM on the positives and on one hard negative text per image and one image per text, drawn
  # ∝ softmax of the in-batch similarities over the global batch (duplicates by `group` left
  # out); CoCa's captioning NLL. Both stay exact under GradCache and across devices.
  c.loss.itm_weight = 0.0
  c.loss.caption_weight = 0.0

  # --- Optimizer -------------------------------------------------------------------------------
  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.learning_rate = 1e-3  # Peak learning rate, reached after warmup.
  c.optimizer.warmup_steps = 100  # Linear warmup from 0.
  c.optimizer.schedule = 'cosine'  # After warmup: 'cosine' (to end_lr_ratio) | 'constant'.
  c.optimizer.end_lr_ratio = 0.0  # Final learning rate as a fraction of the peak.
  c.optimizer.weight_decay = 1e-4  # Decoupled (AdamW) weight decay on matrices only.
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.95
  c.optimizer.eps = 1e-8
  c.optimizer.grad_clip_norm = 1.0  # Global-norm gradient clipping; 0 disables it.
  # Parameters whose path ('txt/encoder/block0/attn/query/kernel') matches this regex (re.search)
  # are frozen: no update, no optimizer state. '' freezes nothing. Locked towers are added.
  c.optimizer.frozen = ''
  # (regex, multiplier) pairs: the learning rate of matching parameters is scaled (first match
  # wins), e.g. (('txt/.*', 0.1),).
  c.optimizer.lr_multipliers = ()

  # --- Data ------------------------------------------------------------------------------------
  c.data = ml_collections.ConfigDict()
  # Training source: 'demo' (procedural scenes shipped with mmjax) | 'records' (shards written by
  # `python -m mmjax.data.prepare`) | 'tfds' (a TFDS dataset in ArrayRecord format). docs/data.md.
  c.data.name = 'demo'
  c.data.path = ''  # records: the `prepare --out` directory; tfds: the TFDS data_dir ('' default).
  c.data.tfds_name = ''  # tfds: the dataset name (e.g. 'coco_captions', 'my_set:1.0.0').
  c.data.split = 'train'  # tfds: the split (slicing such as 'train[:90%]' allowed).
  c.data.image_key = 'image'  # tfds: '/'-separated path of the image feature.
  c.data.captions_key = 'captions'  # tfds: path of the caption text(s), e.g. 'captions/text'.
  c.data.group_key = ''  # tfds: path of a duplicate-group id ('' none), e.g. 'image/id'.
  c.data.keep = ''  # records: a keep file of `python -m mmjax.data.filter` ('' = every example).
  # records: a negatives file of `python -m mmjax.data.mine_negatives`; demo: comma-separated scene
  # attributes ('shape', 'colour', 'size', 'position'): each example gets num_hard_negatives
  # rendered scenes (image + caption) that differ from it in one of them, for one object.
  c.data.negatives = ''
  # Weighted mixture; when non-empty it replaces the single source above. A tuple of dicts with
  # the fields above (name, path, tfds_name, split, image_key, captions_key, group_key, keep,
  # negatives) plus `weight` and `temperature` (below), e.g. (dict(name='records',
  # path='data/a', weight=3.0), dict(name='demo', weight=1.0)).
  c.data.mixture = ()
  # Temperature sampling of the mixture (mmjax.data.sources.mixture_weights): 0 keeps the weights
  # as the proportions; T > 0 samples source i in proportion to (weight_i x size_i)^(1/T): 1 by
  # size, larger T toward uniform (small sources seen more). A source's own `temperature` field
  # overrides it; temperatures must be all 0 or all > 0.
  c.data.mixture_temperature = 0.0
  # 0: rows of all sources interleaved in each batch; k: each batch is k single-source
  # sub-batches of batch_size/k rows (harder in-batch negatives).
  c.data.sub_batches = 0
  c.data.num_hard_negatives = 0  # K: columns neg_image/neg_tokens [B, K, ...] when > 0.
  # The run fails with a clear message when more than this fraction of images cannot be decoded.
  c.data.max_skip_fraction = 0.01
  c.data.num_train_examples = 200_000  # Size of one epoch of the demo source (scenes are rendered on the fly).
  c.data.num_workers = 0  # Grain worker processes (0: decode in the main process).
  c.data.worker_buffer_size = 2  # Batches each worker prepares ahead.
  c.data.read_threads = 2  # Threads reading/transforming elements per process.
  # Decoded training images (RGB, before augmentation) kept in memory per process, in MiB: a
  # corpus revisited every few steps is decoded once (each Grain worker holds its own). 0: off.
  c.data.decode_cache_mb = 256
  # --- Image preprocessing and augmentation (mmjax.data.images, mmjax.data.augment) ----------
  # The deterministic resize, used by every evaluator and teacher embedding, and in training
  # when data.aug.crop does not crop: 'crop' (the centred square of the shorter side, resized)
  # | 'letterbox' (the whole image, aspect kept, centred on a square of `background`).
  c.data.resize = 'crop'
  c.data.background = (255, 255, 255)  # RGB under transparent pixels and in letterbox padding.
  # Which caption of an example a training row uses: 'random' (re-drawn every epoch) | 'first'.
  c.data.caption_sampling = 'random'
  # Training augmentation: 'none' | 'light' (a random crop >= 80% of the side, +-10% brightness
  # and contrast: mmjax's original preset) | 'custom' (data.aug below). Evaluation never augments.
  c.data.augment = 'none'
  c.data.aug = ml_collections.ConfigDict()
  # 'random_resized' (Inception crop: area fraction crop_scale, aspect crop_ratio, relative to
  # the image's aspect and letterboxed when resize='letterbox') | 'none' (the resize above).
  c.data.aug.crop = 'random_resized'
  # Area fraction; torchvision's (0.08, 1) would often crop away what a caption names.
  c.data.aug.crop_scale = (0.5, 1.0)
  c.data.aug.crop_ratio = (3 / 4, 4 / 3)
  # Horizontal-flip probability; a flipped row's texts swap each word of a flip_swap pair
  # (whole words, case kept), so "the dog on the left" stays true.
  c.data.aug.flip = 0.5
  c.data.aug.flip_swap = (('left', 'right'), ('leftmost', 'rightmost'), ('leftward', 'rightward'),
                          ('leftwards', 'rightwards'))
  # Colour jitter as torchvision's ColorJitter: factors in [1 - x, 1 + x], hue shift in
  # [-hue, hue] of the colour circle (0: off; captions name colours), in random order.
  c.data.aug.brightness = 0.2
  c.data.aug.contrast = 0.2
  c.data.aug.saturation = 0.2
  c.data.aug.hue = 0.0
  # ----------------------------------------------------------------------------------------------
  # LLM embedder tasks (mmjax.data.llm_tasks): the share of each task in the batches, the query
  # instruction of each task and the candidates' instruction ('' = none). 'composed' exists on
  # the demo tasks only; records / TFDS / mixtures give i2t and t2i rows (composed must be 0).
  c.data.llm = ml_collections.ConfigDict()
  c.data.llm.weights = ml_collections.ConfigDict({'i2t': 1.0, 't2i': 1.0, 'composed': 1.0})
  c.data.llm.instructions = ml_collections.ConfigDict({
      'i2t': 'Find a caption that describes this image:',
      't2i': 'Find an image that matches this caption:',
      'composed': 'Find the image after this change:'})
  c.data.llm.candidate_instruction = ''
  c.data.llm.pad_side = 'right'  # 'right' | 'left': last-token pooling is exact either way.
  # Audio-text data (model.kind='audio_text'; mmjax.data.audio_pipeline): 'synthetic' captioned
  # sounds rendered on the fly (mmjax.data.audio_demo) or ingested 'records' (`python -m
  # mmjax.data.prepare --audio_dir=... --out=PATH`).
  c.data.audio = ml_collections.ConfigDict()
  c.data.audio.source = 'synthetic'
  c.data.audio.path = ''  # records: the `prepare --out` directory.
  c.data.audio.num_train_clips = 50_000  # synthetic: distinct training clips (then repeated).
  c.data.audio.max_events = 2  # synthetic: sound events per clip (1..max_events, in sequence).
  c.data.audio.random_crop = True  # Clips longer than model.audio.max_seconds: a random window.

  # --- Transfer (docs/pretrained.md) -----------------------------------------------------------
  # Start a tower from a released checkpoint: 'hf:DIR' (config.json + model.safetensors) or
  # 'hf:pkg:MODULE/sub/dir' inside an installed package. The tower's config must match the
  # checkpoint (the error lists the fields to set). '' initialises it randomly. The LLM embedder
  # takes a CLIP/SigLIP vision tower as its ViT (init.image; no text tower: init.text is refused).
  c.init = ml_collections.ConfigDict()
  c.init.image = ''
  c.init.text = ''
  # LLM embedder: the decoder from a local Llama/Qwen2 checkpoint ('hf:DIR'); model.decoder must
  # match it (`python -m mmjax.hf DIR` prints the overrides). Its tokenizer is loaded with it.
  c.init.decoder = ''

  # --- Distillation and multi-task (docs/pretrained.md) ---------------------------------------
  c.distill = ml_collections.ConfigDict()
  c.distill.weight = 0.0  # Weight of the distillation term next to the contrastive loss; 0: off.
  # 'kl': teacher vs student in-batch similarity distributions (dimensions may differ) |
  # 'regression': 1 - cos(student, teacher) per role (equal dimensions) | 'both' (summed).
  c.distill.kind = 'kl'
  c.distill.temperature = 20.0  # KL: scale of teacher and student cosines (1/tau), > 0.
  # 'data': teacher embeddings precomputed into the data (`python -m mmjax.data.teacher_embed`)
  # | 'live': the frozen teacher runs on each batch (its own tokenizer; no gradient/state).
  c.distill.source = 'data'
  c.distill.teacher = ''  # 'hf:DIR' (a Hugging Face checkpoint) or an mmjax export / workdir.
  c.distill.embeddings = ''  # source='data': the directory teacher_embed writes (source_<i>.npz).
  c.multitask = ml_collections.ConfigDict()
  # (task, weight) pairs combined in one step, tasks from 'contrastive' (the run's loss between
  # model.contrastive_roles), 'text_text' (the same loss between 'query' and 'text': a second
  # caption of the image, or the query of text-text pairs) and 'distill'. () = contrastive
  # (+ distill.weight x distill).
  c.multitask.tasks = ()
  # 'static': sum of weight x loss | 'uncertainty': learned log-variances s (Kendall et al.),
  # sum 0.5 (exp(-s) loss + s), started at the given weights; s are trained params ('multitask')
  # | 'gradnorm': each step, weights that give every term's gradient (w.r.t. the towers' output
  # embeddings) a norm in the proportions of the given weights (GradNorm-style, closed form)
  # | 'loss_ratio': each step, weights that make every weighted loss proportional to its given
  # weight (losses divided by their own detached value). docs/training.md, "Balancing losses".
  c.multitask.weighting = 'static'
  # Log 'grad_norm/<task>' (||dL_task / d embeddings|| over the global batch) and
  # 'grad_share/<task>' (its share of the weighted sum) every step: which objective dominates.
  # Also for a single contrastive term. One extra backward pass of each loss (not the towers).
  c.multitask.log_grad_norms = False

  # --- Tokenizer -------------------------------------------------------------------------------
  c.tokenizer = ml_collections.ConfigDict()
  # '' trains a WordPiece tokenizer on the run's captions at start-up (bitwise reproducible;
  # saved to the workdir so a resumed run uses the same one); otherwise a local tokenizer.json
  # or a directory holding one, a SentencePiece *.model, or CLIP's bpe_simple_vocab_16e6.txt.gz
  # (docs/data.md#tokenizers).
  c.tokenizer.path = ''
  c.tokenizer.vocab_size = 1024  # Size of the trained vocabulary (when path is '').

  # --- Parallelism -----------------------------------------------------------------------------
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # Data-parallel axis; -1 takes all devices left over by the other axes.
  c.mesh.fsdp = 1  # Fully sharded data parallel (parameters and optimizer state sharded).
  c.mesh.tensor = 1  # Tensor parallel (attention heads / MLP hidden sharded).
  # Logical axis name -> mesh axis (or None: replicated). Parameters and activations name their
  # axes; this table decides where they live.
  c.logical_axis_rules = (
      ('batch', ('data', 'fsdp')),
      ('embed', 'fsdp'),
      ('mlp', 'tensor'),
      ('heads', 'tensor'),
      ('kv', None),
      ('vocab', 'tensor'),
      ('length', None),
      ('patch', None),
  )

  # --- Multi-process (multi-host) ---------------------------------------------------------------
  c.distributed = ml_collections.ConfigDict()
  # '' : one process. 'host:port' : address of process 0's coordinator service (every process
  # gets the same value plus its own process_id). 'auto' : let jax.distributed detect the cluster
  # (Cloud TPU, SLURM, Open MPI, Kubernetes); num_processes/process_id are then ignored.
  c.distributed.coordinator_address = ''
  c.distributed.num_processes = 1
  c.distributed.process_id = 0
  c.distributed.timeout_s = 300  # How long processes wait for each other at start-up.
  # A process that stops sending heartbeats for this long (killed, host lost) is declared dead
  # by the coordinator, and every other process then exits non-zero instead of hanging in a
  # collective (jax.distributed's heartbeat; docs/scaling.md, "Dead peers").
  c.distributed.heartbeat_timeout_s = 100
  # How long a process exiting normally waits at the shutdown barrier for the others.
  c.distributed.shutdown_timeout_s = 300
  # CPU-only runs: the cross-process collectives library ('gloo'; 'mpi' needs an MPI install).
  c.distributed.cpu_collectives = 'gloo'

  # --- Training health (mmjax/train/health.py; docs/training.md) ------------------------------
  c.health = ml_collections.ConfigDict()
  # Alignment / uniformity (Wang & Isola), effective rank and cross-tower cosine statistics of
  # `rows` evenly spaced rows of each global batch, computed in the train step and logged as
  # train/health/...; 0 turns them off (the loss-plateau warning stays).
  c.health.rows = 256
  # A console warning when a condition holds for this many consecutive train log points:
  c.health.patience = 5
  # the loss within this fraction of its collapse value (sigmoid ~ln B + 1, InfoNCE ln B);
  c.health.plateau_tolerance = 0.1
  # a tower's effective rank below this, or its uniformity above max_uniformity (0 = one point);
  c.health.min_effective_rank = 2.0
  c.health.max_uniformity = -0.1
  # the standard deviation of the batch's cross-tower cosines below this (all pairs alike).
  c.health.min_cosine_std = 0.02

  # --- Checkpoints -----------------------------------------------------------------------------
  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 200  # Save this often (and always at the last step).
  c.checkpoint.keep = 3  # Most recent checkpoints kept.
  c.checkpoint.async_save = True  # Write in a background thread while training continues.

  # --- Evaluation ------------------------------------------------------------------------------
  c.eval = ml_collections.ConfigDict()
  c.eval.every_steps = 500  # Retrieval eval on the validation split this often and at the end.
  c.eval.num_scenes = 1000  # Validation scenes (half of them in one-attribute near-duplicate pairs).
  c.eval.batch_size = 256  # Embedding batch (padded for the last partial batch).
  c.eval.seed = 1234  # Which validation scenes are drawn.
  # Metrics of this validation retrieval eval: recall|precision|ndcg@K, map, mrr, median_rank.
  c.eval.metrics = ('recall@1', 'recall@5', 'recall@10', 'mrr', 'median_rank')
  c.eval.num_composed = 500  # LLM embedder: composed (image + edit) queries of the eval split.
  c.eval.index_min_corpus = 100_000  # Corpora this large or larger are searched with ScaNN.
  # ScaNN index parameters; 0 derives them from the corpus size (mmjax.index.default_params).
  c.eval.index_num_leaves = 0
  c.eval.index_num_leaves_to_search = 0
  c.eval.index_reorder = 0
  # The primary evaluation: the evaluator whose results are the printed table, eval.json's
  # top-level keys (no prefix), the chance level and eval/i2t/... in metrics.jsonl. 'demo' is the
  # one of the fields above (the demo validation scenes); any other value names a config.evals
  # entry. '' chooses: 'demo' when the run trains on the demo only, else its one config.evals
  # entry on a held-out records/TFDS split ('demo' if it has none; several: set this field).
  # The demo evaluator runs beside a primary of real data only when the data includes the demo.
  c.eval.primary = ''
  # More evaluators, by name: each is `mmjax.eval.specs.spec(type, **fields)` with type
  # 'retrieval' | 'zero_shot' | 'linear_probe' | 'robustness' | 'llm_retrieval', its own
  # every_steps (0: the eval.every_steps above), dataset and metrics (docs/eval.md lists every
  # field). Their results go to metrics.jsonl / TensorBoard as eval/<name>/... and to eval.json
  # as <name>/... (the primary's also without the prefix). The name 'demo' is taken
  # (eval.primary).
  c.evals = ml_collections.ConfigDict()

  return c
