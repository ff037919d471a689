"""mmjax: multimodal embeddings in JAX/Flax."""

__version__ = '0.1.0'


def load_embedder(path, **kwargs):
  """Loads an exported model (`DIR/export`) and returns an `Embedder`.

  >>> emb = mmjax.load_embedder('runs/demo/export')
  >>> zimg = emb.embed_images(images_uint8)  # [N, D], L2-normalised
  >>> ztxt = emb.embed_texts(['a large red circle at the top left.'])
  """
  from mmjax.embedder import load_embedder as _load  # pylint: disable=import-outside-toplevel
  return _load(path, **kwargs)


__all__ = ['load_embedder', '__version__']
