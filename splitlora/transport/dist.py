"""torch.distributed transport: the server is rank 0, client c is rank c + 1.

Every packet travels as a fixed 32-byte header (magic, payload length, kind, step: four int64)
followed by the payload, so the receiver allocates exactly what the sender announced and never
guesses shapes. Sends are asynchronous (isend): a sender goes on computing while its packets
move, and `flush()` waits for them at the end of a step. Every receive waits at most
`timeout_s`; a peer that died, stalled or sent something unexpected raises TransportError
naming the peer's rank and the step.

gloo carries CPU tensors; NCCL carries CUDA tensors (packets are moved to the GPU for NCCL).
NCCL is used when every rank can have a GPU of its own; ranks that would share a GPU (NCCL
refuses that) use gloo, with packets crossing host memory.
There is no authentication in torch.distributed: run it on a private network or a VPN.
"""
from __future__ import annotations

import datetime
import os
from typing import List, Optional

import torch

from .base import KINDS, SERVER, Transport, TransportError

_MAGIC = 0x534C5452  # "SLTR"
_HEADER_NUMEL = 4
# Larger claimed payloads are a corrupt or foreign header, not a packet to allocate for.
MAX_PACKET_BYTES = 16 * 2**30


def party_rank(name: str) -> int:
    if name == SERVER:
        return 0
    if name.startswith("client") and name[6:].isdigit():
        return int(name[6:]) + 1
    raise ValueError(f"unknown party {name!r}; parties are 'server' and 'client<N>'")


def rank_party(rank: int) -> str:
    return SERVER if rank == 0 else f"client{rank - 1}"


class DistTransport(Transport):
    """One process's end of the point-to-point links; `me` is this process's party name."""

    def __init__(self, timeout_s: float = 60.0, *, group=None) -> None:
        import torch.distributed as dist

        super().__init__(timeout_s)
        if not dist.is_initialized():
            raise RuntimeError("DistTransport needs torch.distributed initialised (see init_distributed)")
        self._dist = dist
        self.group = group
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.me = rank_party(self.rank)
        self.backend = dist.get_backend(group)
        self._device = torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")
        self._pending: List[tuple] = []
        # Bytes this process received, by the same keys as the ledger (the ledger counts sends).
        from .base import CommLedger

        self.received = CommLedger()
        self.wire_bytes_sent = 0
        self._fault = _fault_from_env(self.me)

    def _timeout(self):
        return datetime.timedelta(seconds=self.timeout_s)

    def _send(self, src, dst, kind, step, packet):
        if src != self.me:
            raise ValueError(f"this process is {self.me}; it cannot send as {src}")
        if self._fault is not None:
            packet = self._fault.apply(kind, step, packet)
        dst_rank = party_rank(dst)
        header = torch.tensor([_MAGIC, packet.numel(), KINDS.index(kind), step], dtype=torch.int64,
                              device=self._device)
        payload = packet.to(self._device).contiguous()
        works = [self._dist.isend(header, dst_rank, group=self.group)]
        if payload.numel():
            works.append(self._dist.isend(payload, dst_rank, group=self.group))
        # The tensors must stay alive until their sends complete.
        self._pending.append((works, header, payload))
        self.wire_bytes_sent += 8 * _HEADER_NUMEL + payload.numel()

    def _wait(self, work, what: str) -> None:
        try:
            completed = work.wait(self._timeout())
        except Exception as err:  # gloo raises RuntimeError when the peer is gone
            raise TransportError(f"{what}: {err}") from None
        if completed is False:
            raise TransportError(f"{what}: no answer within {self.timeout_s:g} s")

    def _recv(self, dst, src, kind, step) -> torch.Tensor:
        if dst != self.me:
            raise ValueError(f"this process is {self.me}; it cannot receive as {dst}")
        src_rank = party_rank(src)
        who = f"{src} (rank {src_rank})"
        header = torch.empty(_HEADER_NUMEL, dtype=torch.int64, device=self._device)
        self._wait(self._dist.irecv(header, src_rank, group=self.group),
                   f"{self.me} waited for {kind} of step {step} from {who}")
        magic, length, kind_id, got_step = (int(v) for v in header.cpu().tolist())
        if magic != _MAGIC or not 0 <= length <= MAX_PACKET_BYTES or not 0 <= kind_id < len(KINDS):
            raise TransportError(f"{self.me} received a corrupt packet header from {who} at step {step}")
        if (KINDS[kind_id], got_step) != (kind, step):
            raise TransportError(f"{self.me} expected {kind} of step {step} from {who} but received "
                                 f"{KINDS[kind_id]} of step {got_step}")
        payload = torch.empty(length, dtype=torch.uint8, device=self._device)
        if length:
            self._wait(self._dist.irecv(payload, src_rank, group=self.group),
                       f"{self.me} waited for the {length}-byte {kind} payload of step {step} from {who}")
        self.received.record(src, dst, kind, self.round_index, length)
        return payload

    def combined_ledger(self):
        """What this process sent and received, in one ledger: on the server (the hub every
        packet passes through) that is every byte of the run."""
        from .base import CommLedger

        return CommLedger.merged((self.ledger, self.received))

    def flush(self) -> None:
        """Waits until every packet this process sent has left."""
        pending, self._pending = self._pending, []
        for works, _, _ in pending:
            for work in works:
                self._wait(work, f"{self.me} sending")


class _Fault:
    """Fault injection for the transport tests (SPLITLORA_INJECT_FAULT=<what>:<party>:<step>[:<kind>]):
    `corrupt` flips bytes of this party's packet of that kind (default: activations) at that step;
    `exit` ends the process abruptly just before that send (a client that dies mid-round; with
    kind `gradients`, a U-shaped client that dies after its tail's forward and backward)."""

    KINDS = ("activations", "gradients")

    def __init__(self, what: str, step: int, kind: str = "activations") -> None:
        self.what, self.step, self.kind = what, step, kind

    def apply(self, kind: str, step: int, packet: torch.Tensor) -> torch.Tensor:
        if step != self.step or kind != self.kind:
            return packet
        if self.what == "exit":
            os._exit(17)
        corrupted = packet.clone()
        corrupted[: min(64, corrupted.numel())] ^= 0x5A
        return corrupted


def _fault_from_env(me: str) -> Optional[_Fault]:
    spec = os.environ.get("SPLITLORA_INJECT_FAULT")
    if not spec:
        return None
    fields = spec.split(":")
    if len(fields) not in (3, 4) or (len(fields) == 4 and fields[3] not in _Fault.KINDS):
        raise ValueError(f"SPLITLORA_INJECT_FAULT={spec!r}; expected <corrupt|exit>:<party>:<step>[:<kind>], kind one "
                         f"of {', '.join(_Fault.KINDS)}")
    what, party, step = fields[:3]
    if what not in ("corrupt", "exit"):
        raise ValueError(f"SPLITLORA_INJECT_FAULT: unknown fault {what!r}; use corrupt or exit")
    return _Fault(what, int(step), *fields[3:]) if party == me else None


def init_distributed(*, world_size_expected: int, timeout_s: float, device: torch.device):
    """Joins the process group torchrun (or the caller's RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT)
    describes: gloo on CPU, NCCL on CUDA."""
    import torch.distributed as dist

    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise ValueError(
                f"transport=dist needs the launcher's environment ({var} is not set): start with "
                f"`torchrun --nproc-per-node {world_size_expected} -m splitlora train ... transport=dist` "
                "(the server is rank 0, client c is rank c+1)")
    world_size = int(os.environ["WORLD_SIZE"])
    if world_size != world_size_expected:
        raise ValueError(f"train.clients + 1 = {world_size_expected} processes are needed (one server, one per client), "
                         f"but WORLD_SIZE is {world_size}; set --nproc-per-node (x --nnodes) to {world_size_expected}")
    if not dist.is_initialized():
        # NCCL needs a GPU of its own per rank; parties sharing a GPU talk through gloo instead
        # (packets are small and cross host memory, as they would cross a network).
        backend = "gloo"
        if device.type == "cuda" and torch.cuda.device_count() >= world_size:
            backend = "nccl"
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=max(timeout_s, 10.0)))
    return dist.get_rank()
