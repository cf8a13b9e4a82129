"""Pieces of the hypergradient benchmarks (``hypergrad_peers.py``, ``hypergrad_trajectory.py``): the problem cases
(:mod:`peers.cases`) and the contenders that compute a hypergradient on them (:mod:`peers.contenders`)."""
