"""Algorithms: the GRPO family (``grpo``) and OPEFO (``opefo``)."""
