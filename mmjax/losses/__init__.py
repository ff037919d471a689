"""Losses: contrastive (sigmoid, softmax)."""

from mmjax.losses.contrastive import get, sigmoid_loss, softmax_loss

__all__ = ['get', 'sigmoid_loss', 'softmax_loss']
