"""Distillation losses: DBiLD (Switch-KD's divergence), BiLD/fixed-k ablations, full-vocab KL."""

from .dbild import DBiLDOutput, KStats, dbild_loss
from .full_kl import full_kl_loss
from .kneedle import kneedle_k
from .pairwise import pair_kl_cumulative, pair_kl_explicit

__all__ = [
    "DBiLDOutput",
    "KStats",
    "dbild_loss",
    "full_kl_loss",
    "kneedle_k",
    "pair_kl_cumulative",
    "pair_kl_explicit",
]
