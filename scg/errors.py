"""The exceptions scg raises: one type per failure family.

Every message names the place that is wrong (a site, a cost, a primitive, an
argument), says what was found, and says how to fix it. The attributes carry
the same facts for programs that catch the error.
"""
from __future__ import annotations


class ScgError(Exception):
    """Base class of every error scg raises on purpose."""


class ModelError(ScgError, ValueError):
    """A model violates a structural precondition at trace time.

    Attributes:
      site: the site or cost name involved, or ``None``.
      source: ``"file.py:LINE"`` of the offending call in the user's model, or ``None``.
    """

    def __init__(self, message: str, *, site: str | None = None, source: str | None = None):
        where = f" (at {source})" if source else ""
        super().__init__(message + where)
        self.site = site
        self.source = source


class UnsupportedPrimitiveError(ScgError, NotImplementedError):
    """The dependency walk met a JAX primitive it cannot reason about.

    scg refuses rather than guesses: an unknown higher-order primitive could hide
    sampling or data flow that the estimator must see.
    """

    def __init__(self, message: str, *, primitive: str, source: str | None = None):
        where = f" (at {source})" if source else ""
        super().__init__(message + where)
        self.primitive = primitive
        self.source = source


class PreconditionError(ScgError, ValueError):
    """A pass was asked to rewrite a site whose precondition does not hold.

    Attributes:
      pass_name: the pass that refused (``"reparameterize"``, ...).
      site: the site it refused.
      precondition: the name of the precondition that failed.
    """

    def __init__(self, message: str, *, pass_name: str, site: str, precondition: str):
        super().__init__(f"{pass_name}: site '{site}': precondition '{precondition}' failed: {message}")
        self.pass_name = pass_name
        self.site = site
        self.precondition = precondition


class BudgetError(ScgError, ValueError):
    """An exact computation (enumeration, quadrature) exceeds its size budget."""

    def __init__(self, message: str, *, size: int, budget: int):
        super().__init__(message)
        self.size = size
        self.budget = budget


class IntractableError(ScgError, ValueError):
    """An exact expectation was asked of a site scg cannot integrate exactly."""

    def __init__(self, message: str, *, site: str):
        super().__init__(message)
        self.site = site
