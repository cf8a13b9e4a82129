r"""Self-Tuning Networks (MacKay, Vicol, Lorraine, Duvenaud & Grosse, 2019, ICLR): best-response layers and
hyperparameter spaces. The solver is ``solve(problem, method="stn")`` (:mod:`bilevel.solvers.stn`).

A self-tuning model takes the hyperparameter features as an extra input, ``net(x, space.features(outer))``; its
``StnLinear`` / ``StnConv2d`` layers gate hidden units on them, so one network represents the weights' best
response ŵ_φ(λ) around the current hyperparameters.
"""

from bilevel.stn.layers import StnConv2d, StnLinear, dropout, weight_sq_norm
from bilevel.stn.space import HyperParam, HyperSpace

__all__ = ["HyperParam", "HyperSpace", "StnConv2d", "StnLinear", "dropout", "weight_sq_norm"]
