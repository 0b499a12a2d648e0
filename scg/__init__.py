"""scg: a JAX-backed tracing compiler for stochastic computation graphs.

Trace a model into an IR, rewrite it with certified passes, lower it to one
jitted unbiased gradient estimator, and check that estimator against the exact
gradient of the expected loss.
"""
import importlib.metadata as _metadata

from scg.errors import (
    BudgetError as BudgetError,
    IntractableError as IntractableError,
    ModelError as ModelError,
    PreconditionError as PreconditionError,
    ScgError as ScgError,
    UnsupportedPrimitiveError as UnsupportedPrimitiveError,
)
from scg.exact import GradReport as GradReport, check_grad as check_grad, expectation as expectation
from scg.ir import Graph as Graph
from scg.lower import Objective as Objective, compile as compile  # noqa: A004 - the public name
from scg.unroll import unroll as unroll
from scg.trace import Model as Model, cost as cost, log_prob as log_prob, model as model, plate as plate, sample as sample
from scg import baselines as baselines, passes as passes

__version__ = _metadata.version("scg")
