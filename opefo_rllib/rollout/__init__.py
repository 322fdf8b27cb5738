"""Rollout: on-policy samples from the engine fleet, and the RLlib EnvRunner that makes them."""
