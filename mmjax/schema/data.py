"""The `data` group: sources, mixtures, preprocessing and the per-kind tasks (docs/data.md).

Part of `mmjax.schema` (data: imports nothing of mmjax); each function adds its group to `c`.
"""

import ml_collections


def add_sources(c: ml_collections.ConfigDict) -> None:
  """config.data: the training source or mixture and the input pipeline."""
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


def add_preprocessing(c: ml_collections.ConfigDict) -> None:
  """config.data: resize, caption sampling and augmentation."""
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


def add_kind_data(c: ml_collections.ConfigDict) -> None:
  """config.data.llm / audio: the LLM embedder's tasks and the audio data."""
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
