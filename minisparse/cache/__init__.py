"""minisparse.cache: the cache contract (base.py) and every cache that follows it: the dense
KVCache, the bounded caches (recursive compressor, press, streaming, PyramidKV, Ada-KV) with their scorers, KIVI's 2-bit KiviCache, and
GateCache (any cache plus the FastGRNN gate's running state). Each module exports its names here.
Cache specs ("streaming=4+508") are parsed one layer up, by minisparse.spec.parse_cache_spec."""
from .base import Cache
from .budgets import AdaKV, HeldSlots, PyramidKV, adakv_keep, pyramid_budgets
from .dense import KVCache
from .gated import GateCache
from .kivi import KiviCache
from .recursive import PressCache, RecursiveCompressor, SlotCache, accumulate_size
from .scorers import (H2O, SCORERS, TOVA, ExactAttention, ExpectedAttention, Hybrid, KeyDiff,
                      KNorm, LSHFrequency, QuestionAware, RandomKeep, Scorer, ScoreContext, SnapKV,
                      attention_mass, question_queries, scorer_from_config)
from .streaming import StreamingCache
from ..gate.fastgrnn import FastGRNNGate, GateState, save_gates   # re-exported: they lived here


def max_keys(cache: Cache):
    """cache.max_keys: the most positions it keeps, None when no count bounds it."""
    return cache.max_keys
