"""minisparse.cache: bounded caches (recursive compressor, streaming, scorers) and the FastGRNN
salience gate. Each module exports its names here, one line each."""
from .fastgrnn import FastGRNNGate, GateCache, GateState, save_gates
from .recursive import PressCache, RecursiveCompressor, SlotCache, accumulate_size
from .scorers import (H2O, ExactAttention, Hybrid, LSHFrequency, QuestionAware, RandomKeep,
                      Scorer, ScoreContext, SnapKV, attention_mass, question_queries,
                      scorer_from_config)
from .streaming import StreamingCache
from .spec import CACHE_NAMES, max_keys, parse_cache_spec
