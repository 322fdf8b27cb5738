"""Verifiable-reward text environments (installed as ``opefo_rllib.envs``)."""
