"""opefo-rllib: RLVR with On-Policy Entropy Flow Optimization, as a Ray RLlib plugin."""

__version__ = "0.1.0"
