"""The inference fleet: the Engine protocol, engines, and the fleet of engine Ray actors."""

from opefo_rllib.fleet.engine import Engine, GenerationResult, SamplingConfig

__all__ = ["Engine", "GenerationResult", "SamplingConfig"]
