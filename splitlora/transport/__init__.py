"""Moving packets between the server and the clients.

A transport moves 1-D uint8 packets between named parties ("server", "client0", ...) and
counts every byte it moves in a `CommLedger`; it knows nothing of models. The in-process
`LocalTransport` is the default; a torch.distributed transport plugs in behind the same
interface.
"""
from .base import SERVER, CommLedger, Transport, TransportError, client_name, is_client_process
from .local import LocalTransport

__all__ = ["SERVER", "CommLedger", "Transport", "TransportError", "client_name", "is_client_process", "LocalTransport",
           "make_transport"]


def make_transport(kind: str, *, timeout_s: float = 60.0) -> Transport:
    if kind == "local":
        return LocalTransport(timeout_s=timeout_s)
    if kind == "dist":
        from .dist import DistTransport

        return DistTransport(timeout_s=timeout_s)
    raise ValueError(f"transport {kind!r} is unknown; use local (in-process) or dist (torch.distributed)")
