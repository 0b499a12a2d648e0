import os

import jax
import pytest
from hypothesis import HealthCheck, settings

# silent rank promotion hides shape bugs in models and estimators
jax.config.update("jax_numpy_rank_promotion", "raise")

settings.register_profile(
    "ci", max_examples=12, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile(
    "slow", max_examples=150, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("SCG_HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def key():
    return jax.random.key(0)
