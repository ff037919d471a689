"""Flax towers: ViT, text transformer, poolers, projection heads and the dual encoder."""

from mmjax.models.text import TextTransformer
from mmjax.models.two_tower import TwoTower
from mmjax.models.vit import ViT

__all__ = ['TextTransformer', 'TwoTower', 'ViT']
