"""A module-level engine-side peer of the opefo_gloo transfer group, for tests that start it in a
process of its own (a spawned process imports it by name)."""

import time


def join_then_wait(port: int, world_size: int, ready) -> None:
    """Join the trainer's group as rank 1, say so, then wait (to be killed)."""
    from opefo_rllib.fleet.gloo_transfer import _group, _worker_store

    store = _worker_store("127.0.0.1", port, world_size, 30)
    group = _group(store, 1, world_size, 30, "127.0.0.1")
    ready.set()
    time.sleep(600)
    del group
