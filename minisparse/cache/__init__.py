"""minisparse.cache: bounded caches (recursive compressor, streaming, scorers) and the FastGRNN
salience gate. Each module exports its names here, one line each."""
from .fastgrnn import FastGRNNGate, GateCache, GateState, save_gates
