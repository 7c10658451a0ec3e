"""minisparse.gate: the FastGRNN salience gate (fastgrnn.py: the cells, their weights, the running
decode state, training data and metrics) and the selector it drives (gated.py: `Gated`, sinks +
window + log-stride plus the most salient earlier keys). Sits above attention (Gated is a
Selector) and below the caches (cache.GateCache runs the gate over the keys it stores)."""
from .fastgrnn import (CELLS, DEFAULT_WEIGHTS, FastGRNNGate, GateState, RandomGate, attention_maps,
                       future_mass, mass_recall, save_gates)
from .gated import Gated, gate_rows
