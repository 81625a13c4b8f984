"""Exceptions. Every one is a ``ValueError`` subclass, so bad input can be caught as such."""

from __future__ import annotations


class AsFTError(ValueError):
    """Base class of the errors raised for bad input."""


class AnchorMismatchError(AsFTError):
    """An anchor does not fit a model: missing module, wrong shape, wrong layout."""


class AnchorFileError(AsFTError):
    """An anchor file is missing, truncated, corrupted or holds invalid values."""


class UnsupportedAdapterError(AsFTError):
    """An adapter for which ``ΔW = B A`` on top of the aligned weights does not hold."""


class OptimizerInputError(AsFTError):
    """Bad optimizer arguments or parameters (λ < 0, wrong dtype or device, ...)."""


class AnchorEntryError(AsFTError):
    """An anchor entry's values are inconsistent (``k > m``, a non-orthonormal basis,
    ``Σ sᵢ² > ‖V‖²_F``, non-finite values, ...)."""
