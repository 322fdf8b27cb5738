"""The batches an Algorithm trained on, kept for a test's checks.

A test that checks the rollouts of a real-model run could sample one more batch after training,
but on SmolLM2 a batch costs as much as an iteration's generation (~15-30 s on 2 cores); the
batches the run trained on are as good for checks of their form (lengths, EOS, chat markers,
masks) and cost nothing more.
"""

from __future__ import annotations

from typing import Any


def keep_sampled_batches(algo: Any) -> list:
    """Every batch ``algo.env_runner.sample()`` returns from now on, in order (the sync pipeline
    samples each iteration's batch through it)."""
    runner, batches = algo.env_runner, []
    sample = runner.sample

    def kept(**kwargs):
        batches.append(sample(**kwargs))
        return batches[-1]

    runner.sample = kept
    return batches
