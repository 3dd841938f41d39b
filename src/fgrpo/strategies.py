"""Compatibility: the strategies moved to `fgrpo.federation.strategies`; this name keeps `fgrpo.strategies.FGRPO` working."""

from fgrpo.federation.strategies import *  # noqa: F401,F403
from fgrpo.federation.strategies import FGRPO, RewardWeighted, make_strategy  # noqa: F401
