"""All-reduce through shared memory for CPU ranks on one host (docs/design.md, section 9.1).

Gloo, TorchRec's CPU backend, sends every all-reduce through TCP on the loopback device. On
the project's 2-core machine a 1 MB all-reduce between two ranks takes ~1.7 ms (median),
as long as the TT forward+backward it synchronises, and the main job does two per step (DDP's
for the MLPs, the data-parallel TT cores'). Ranks that share a host can instead copy into one
``/dev/shm`` segment and sum the copies: :class:`ShmAllReduce` does that with the
``torchrec_tt::shm_all_reduce_`` op, and :func:`host_all_reduce_` uses it wherever it
applies and gloo everywhere else. :class:`ShmDataParallelWrapper` routes DDP's buckets
(DMP's dense part) through it.

Results equal gloo's up to float summation order: the segment sums the ranks' tensors in
rank order, identically on every rank, so ranks stay bit-identical (with two ranks the sum is
the same bits as gloo's). Set ``TORCHREC_TT_SHM_ALLREDUCE=0`` to use gloo throughout.
"""

import os
import socket
import tempfile
import threading
from datetime import timedelta
from typing import Dict, Optional, Tuple

import torch
import torch.distributed as dist
from torch.distributed.constants import default_pg_timeout
from torchrec.distributed.model_parallel import DefaultDataParallelWrapper, DistributedModelParallel
from torchrec.distributed.types import ShardingEnv

from torchrec_tt import ops

_ENV_SWITCH = "TORCHREC_TT_SHM_ALLREDUCE"
_SHM_DIR = "/dev/shm"
_FLAG_BYTES = 64  # csrc/cpu/shm_all_reduce_cpu.cpp: one cache line per rank's flag
_MIN_SLOT_BYTES = 1 << 20
_DTYPES = (torch.float32, torch.float64)


def _host_identity() -> str:
    """This machine, as far as a shared /dev/shm goes: host name and boot id. (Ranks that match
    yet do not share /dev/shm, e.g. in separate containers, are caught when the segment is
    mapped: every rank then raises.)"""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


def _slot_bytes(nbytes: int) -> int:
    """A slot for ``nbytes``: at least 1 MiB, a power of two (few regrowths), 64-byte aligned."""
    size = _MIN_SLOT_BYTES
    while size < nbytes:
        size *= 2
    return size


class ShmAllReduce:
    """In-place sum over the ranks of ``group`` through one shared-memory segment.

    Only for groups whose ranks all run on this host (:meth:`for_group` checks). Collective
    like ``dist.all_reduce``: every rank calls :meth:`all_reduce_` with tensors of the same
    size and dtype, in the same order. A segment is created by the group's first rank on the
    first call, and again (doubled) when a tensor outgrows it; creation goes through the
    group itself (gloo). Its file is unlinked as soon as every rank has mapped it, so nothing
    is left in ``/dev/shm`` when a rank dies.

    Args:
        group (dist.ProcessGroup): the ranks to sum over (gloo).
        timeout (timedelta): how long a rank waits for the others inside one call before it
            raises ``RuntimeError`` (a rank failed) instead of hanging; default: torch's
            process-group default (30 min), the wait gloo would allow.
    """

    def __init__(self, group: dist.ProcessGroup, timeout: timedelta = default_pg_timeout) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self._timeout_s = timeout.total_seconds()
        self._lock = threading.Lock()
        self._segment: Optional[torch.Tensor] = None
        self._slot_capacity = 0
        self._step = 0

    # id(group) -> (group, its all-reduce or None); holding the group keeps its id from being reused.
    _BY_GROUP: Dict[int, Tuple[dist.ProcessGroup, Optional["ShmAllReduce"]]] = {}

    @classmethod
    def for_group(cls, group: Optional[dist.ProcessGroup] = None) -> Optional["ShmAllReduce"]:
        """The group's shared-memory all-reduce, or ``None`` where it does not apply: the
        compiled op is missing, ``TORCHREC_TT_SHM_ALLREDUCE=0``, one rank, a backend other than
        gloo, or ranks on several hosts. Decided once per group, by all its ranks together: the
        first call is a collective (an all-gather of host identities)."""
        group = group if group is not None else dist.group.WORLD
        key = id(group)
        if key not in cls._BY_GROUP:
            usable = (
                ops.HAS_EXTENSION
                and hasattr(torch.ops.torchrec_tt, "shm_all_reduce_")
                and os.environ.get(_ENV_SWITCH, "1") != "0"
                and dist.get_world_size(group) > 1
                and dist.get_backend(group) == dist.Backend.GLOO
                and os.path.isdir(_SHM_DIR)
            )
            # Every rank takes part in the all-gather, even one that cannot use shared memory,
            # so the ranks agree on the decision.
            hosts = [None] * dist.get_world_size(group)
            dist.all_gather_object(hosts, (_host_identity(), usable), group=group)
            same_host = len({host for host, _ in hosts}) == 1
            cls._BY_GROUP[key] = (group, cls(group) if same_host and all(ok for _, ok in hosts) else None)
        return cls._BY_GROUP[key][1]

    def _map_segment(self, nbytes: int) -> None:
        """(Re)creates the segment with slots of at least ``nbytes`` (collective). A rank that
        cannot create or map it makes every rank raise ``RuntimeError`` (none is left waiting)."""
        slot = _slot_bytes(nbytes)
        total = self.world_size * _FLAG_BYTES + self.world_size * slot
        created = [None]
        if self.rank == 0:
            try:
                fd, path = tempfile.mkstemp(prefix="torchrec_tt_allreduce_", dir=_SHM_DIR)
                try:
                    os.ftruncate(fd, total)  # zero-filled: every flag at 0 ("done with step 0")
                    token = os.urandom(16)  # in slot 0 until the first step: proves the others see this file
                    os.pwrite(fd, token, self.world_size * _FLAG_BYTES)
                finally:
                    os.close(fd)
                created = [("ok", path, token)]
            except OSError as err:
                created = [("error", f"rank 0 could not create a {total}-byte segment in {_SHM_DIR}: {err}", b"")]
        dist.broadcast_object_list(created, src=dist.get_global_rank(self.group, 0), group=self.group)
        status, path, token = created[0]
        segment, error = None, path if status == "error" else None
        if error is None:
            try:
                segment = torch.from_file(path, shared=True, size=total, dtype=torch.uint8)
                start = self.world_size * _FLAG_BYTES
                if bytes(segment[start : start + len(token)].tolist()) != token:
                    # Same host name and boot id, yet another /dev/shm (e.g. separate containers).
                    error = f"rank {self.rank} does not share rank 0's {_SHM_DIR} ({path} differs)"
            except RuntimeError as err:
                error = f"rank {self.rank} could not map {path}: {err}"
        errors = [None] * self.world_size
        dist.all_gather_object(errors, error, group=self.group)  # every rank has mapped it, or knows
        if self.rank == 0 and status == "ok":
            os.unlink(path)
        if any(errors):
            raise RuntimeError(
                "ShmAllReduce: no shared-memory segment (set TORCHREC_TT_SHM_ALLREDUCE=0 to use the "
                f"process group's backend): {'; '.join(e for e in errors if e)}"
            )
        self._segment, self._slot_capacity, self._step = segment, slot, 0

    def all_reduce_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sums ``tensor`` (contiguous float32/float64, CPU) over the group, in place.

        Args:
            tensor (Tensor): any shape; the same shape and dtype on every rank.

        Returns:
            Tensor: ``tensor``, now holding the sum.
        """
        if tensor.device.type != "cpu" or tensor.dtype not in _DTYPES or not tensor.is_contiguous():
            raise ValueError(
                f"ShmAllReduce.all_reduce_: expected a contiguous float32/float64 CPU tensor, got "
                f"{tensor.dtype} on {tensor.device}{'' if tensor.is_contiguous() else ' (non-contiguous)'}"
            )
        nbytes = tensor.numel() * tensor.element_size()
        with self._lock:
            if self._segment is None or nbytes > self._slot_capacity:
                self._map_segment(nbytes)
            self._step += 1
            torch.ops.torchrec_tt.shm_all_reduce_(
                tensor, self._segment, self.rank, self.world_size, self._step, self._timeout_s
            )
        return tensor


def host_all_reduce_(tensor: torch.Tensor, group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """``dist.all_reduce(tensor, group=group)`` (sum, in place), through shared memory where
    :meth:`ShmAllReduce.for_group` allows and the tensor suits it, through the group otherwise.
    A collective: the same calls in the same order on every rank.

    Args:
        tensor (Tensor): the same shape and dtype on every rank.
        group (Optional[dist.ProcessGroup]): default: the world.

    Returns:
        Tensor: ``tensor``, now holding the sum.
    """
    shm = ShmAllReduce.for_group(group)
    if shm is not None and tensor.device.type == "cpu" and tensor.dtype in _DTYPES and tensor.is_contiguous():
        return shm.all_reduce_(tensor)
    dist.all_reduce(tensor, group=group)
    return tensor


def _shm_allreduce_hook(
    shm: ShmAllReduce, bucket: dist.GradBucket
) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook: the bucket averaged over the ranks through shared memory (DDP's default
    hook divides by the world size first, so does this one)."""
    buffer = bucket.buffer()
    buffer.div_(shm.world_size)
    shm.all_reduce_(buffer)
    future: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    future.set_result(buffer)
    return future


class ShmDataParallelWrapper(DefaultDataParallelWrapper):
    """TorchRec's ``DefaultDataParallelWrapper`` (DDP around DMP's unsharded modules) whose
    gradient buckets are averaged through shared memory when every rank runs on this host
    (gloo, CPU). Elsewhere it is the default wrapper unchanged. Pass it to DMP::

        dmp = DistributedModelParallel(model, env=env, plan=plan, sharders=sharders,
                                       data_parallel_wrapper=ShmDataParallelWrapper())

    Takes ``DefaultDataParallelWrapper``'s arguments; with ``allreduce_comm_precision``
    (fp16/bf16 compression) DDP keeps TorchRec's compressing hook over gloo instead.
    """

    def wrap(self, dmp: DistributedModelParallel, env: ShardingEnv, device: torch.device) -> None:
        super().wrap(dmp, env, device)
        ddp = dmp._dmp_wrapped_module
        if (
            not isinstance(ddp, torch.nn.parallel.DistributedDataParallel)
            or device.type != "cpu"
            or self._allreduce_comm_precision is not None
        ):
            return
        shm = ShmAllReduce.for_group(env.process_group)
        if shm is not None:
            ddp.register_comm_hook(shm, _shm_allreduce_hook)


__all__ = ["ShmAllReduce", "ShmDataParallelWrapper", "host_all_reduce_"]
