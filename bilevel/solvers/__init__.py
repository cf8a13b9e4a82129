"""Built-in solvers; importing this package registers them by name."""

from bilevel.solvers.f2sa import F2SA, F2SAState
from bilevel.solvers.ift import CG, IFT, Exact, ImplicitState, Minres
from bilevel.solvers.lvhba import LVHBA, LVHBAState
from bilevel.solvers.maml import IMAML, MAML, MetaState
from bilevel.solvers.stn import STN, StnState
from bilevel.solvers.unrolled import Unrolled, UnrolledState

__all__ = [
    "CG",
    "F2SA",
    "F2SAState",
    "IFT",
    "Exact",
    "IMAML",
    "ImplicitState",
    "LVHBA",
    "LVHBAState",
    "MAML",
    "MetaState",
    "Minres",
    "STN",
    "StnState",
    "Unrolled",
    "UnrolledState",
]
