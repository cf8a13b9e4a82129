"""Ready-made problems: each builds a :class:`bilevel.Problem` (and, where it has one, an evaluation)."""

from bilevel.problems.ridge import ridge_data, ridge_hypergrad, ridge_problem, ridge_solution, ridge_val_loss

__all__ = ["ridge_data", "ridge_hypergrad", "ridge_problem", "ridge_solution", "ridge_val_loss"]
