"""The two ways bilevel reports trouble: :class:`BilevelError` (raised) and :class:`BilevelWarning` (warned)."""

from __future__ import annotations


class BilevelError(ValueError):
    """Bad input or a numerical failure that bilevel detected (NaN/inf, divergence, wrong shapes).

    Every message names the call or argument, what was wrong, what was expected and the fix.
    """


class BilevelWarning(UserWarning):
    """Something bilevel did on the user's behalf that changes the numbers (e.g. a fallback to a simpler method)."""
