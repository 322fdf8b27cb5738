"""The shipped run configs, installed as package data (``opefo_rllib.configs``): `opefo train
--config NAME` takes them by name (``tiny_cpu``, ``overlays/grpo_strict``, ...) as well as by path."""
