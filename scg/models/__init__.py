"""Models shared by the command line, the examples and the benchmarks."""

from scg.models import aevb as aevb
