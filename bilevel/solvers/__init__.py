"""Built-in solvers; importing this package registers them by name."""

from bilevel.solvers.ift import CG, IFT, Exact, ImplicitState
from bilevel.solvers.unrolled import Unrolled, UnrolledState

__all__ = ["CG", "IFT", "Exact", "ImplicitState", "Unrolled", "UnrolledState"]
