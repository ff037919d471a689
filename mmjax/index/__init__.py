"""Nearest-neighbour search over embeddings: exact on device (the reference) and ScaNN."""

from mmjax.index.ann import (CorruptIndexError, IndexMismatchError, IndexParams, ScannIndex,
                             default_params, model_fingerprint, recall_at_k)
from mmjax.index.exact import ExactSearch

__all__ = ['CorruptIndexError', 'ExactSearch', 'IndexMismatchError', 'IndexParams', 'ScannIndex',
           'default_params', 'model_fingerprint', 'recall_at_k']
