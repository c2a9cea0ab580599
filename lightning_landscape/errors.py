"""The package's own warning category, so users can filter what lightning_landscape says."""

from __future__ import annotations


class LandscapeWarning(UserWarning):
    """A warning from lightning_landscape (too few snapshots, an eigensolver out of budget, ...).

    Example:
        >>> import warnings
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore", LandscapeWarning)  # silence the package only
        ...     warnings.warn("ignored", LandscapeWarning)
        >>> issubclass(LandscapeWarning, UserWarning)
        True
    """


class ConvergenceWarning(LandscapeWarning, RuntimeWarning):
    """An iterative solver (Lanczos) stopped before the accuracy asked; the values are its best estimates.

    Example:
        >>> issubclass(ConvergenceWarning, LandscapeWarning), issubclass(ConvergenceWarning, RuntimeWarning)
        (True, True)
    """
