"""Listening ports without the pick-a-free-port-close-it-reuse-it race.

Picking a free port by binding and closing a socket, then handing the number to a server, leaves
a window in which another process can take the port. Here the port is never let go: either our
bound socket becomes the server's listening socket (:func:`listening_store`, for stores we
create), or it stays bound with ``SO_REUSEADDR`` until a server that binds that way itself has
started (:func:`reserved_port`, for vLLM's NCCL rendezvous). Either way the socket is bound to the
given address only, never to every interface.
"""

from __future__ import annotations

import contextlib
import datetime
import socket
from typing import Iterator

__all__ = ["listening_store", "reserved_port"]


def _bind(address: str, port: int = 0, reuse: bool = False) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET)
    try:
        if reuse:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address, port))
    except BaseException:
        sock.close()
        raise
    return sock


def listening_store(address: str, world_size: int, timeout_s: float, port: int = 0):
    """A master ``TCPStore`` listening on ``address`` only (TCPStore alone listens on every
    interface), at ``port`` (0: one the OS picks; read it back from ``store.port``). The store owns
    the listening socket and closes it when it goes."""
    from torch.distributed import TCPStore

    sock = _bind(address, port)
    try:
        sock.listen(128)
        port = sock.getsockname()[1]
    except BaseException:
        sock.close()
        raise
    fd = sock.detach()
    try:
        return TCPStore(address, port, world_size, True, timeout=datetime.timedelta(seconds=timeout_s),
                        wait_for_workers=False, master_listen_fd=fd)
    except BaseException:
        socket.close(fd)
        raise


@contextlib.contextmanager
def reserved_port(address: str) -> Iterator[int]:
    """A port on ``address`` held (bound with ``SO_REUSEADDR``, not listening) for the duration of
    the block: no other process gets it from the OS meanwhile, and a server started inside the block
    that binds it with ``SO_REUSEADDR`` (vLLM's ``StatelessProcessGroup`` does) can listen on it."""
    sock = _bind(address, 0, reuse=True)
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()
