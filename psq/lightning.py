"""``PsqLayerSync``: psq in PyTorch Lightning, where ``sync_batchnorm=True`` would go.

::

    trainer = Trainer(strategy="ddp", devices=2, plugins=[PsqLayerSync(frontend="tcp://host:5555", job="resnet")])

Lightning calls :meth:`PsqLayerSync.apply` once the process group exists and before DDP wraps
the model: it starts a :class:`~psq.loop.WorkerLoop` for this rank (worker ``rank<N>``) and
converts the model's batch norm.  At the end of fitting it calls :meth:`PsqLayerSync.revert`:
the last step's history is waited for, the layers go back to ``nn.BatchNorm*d`` with the
cluster's statistics in their buffers, and the loop stops.  Needs ``pip install psq[lightning]``.
"""

from __future__ import annotations

import logging
from typing import Any

import torch.distributed as dist
from lightning.pytorch.plugins import LayerSync
from torch import nn

from psq.config import DEFAULT_FRONTEND, endpoint, name
from psq.loop import DEFAULT_PUSH_CPU_SHARE, DEFAULT_PUSH_INTERVAL_S, WorkerLoop
from psq.pacing import PushPacer
from psq.security import ClientKeys
from psq.torch import check_options, convert_batchnorm, revert_batchnorm

log = logging.getLogger("psq.lightning")


class PsqLayerSync(LayerSync):
    """Share every batch norm's statistics through psq instead of synchronizing them.

    Lightning calls a layer-sync plugin under its DDP and FSDP strategies (``strategy="ddp"``);
    a single-device run ignores it.

    ``frontend``, ``job``, ``keys``, ``push_interval_s`` and ``push_cpu_share`` go to each rank's WorkerLoop;
    ``wait_for_service_s`` bounds how long :meth:`apply` waits for the statistics service (then
    training starts regardless, on batch statistics until it answers); ``flush_timeout_s`` how
    long :meth:`revert` waits for the last step's history; ``prefix`` goes to
    :func:`~psq.torch.convert_batchnorm`, ``options`` to every :class:`~psq.torch.PSBatchNorm`.
    After fitting, ``loop`` is the rank's stopped WorkerLoop: its ``summary()`` and
    ``history(name)`` stay readable.  The plugin pickles to spawned ranks without its loop.
    """

    def __init__(
        self,
        frontend: str = DEFAULT_FRONTEND,
        *,
        job: str,
        keys: ClientKeys | None = None,
        push_interval_s: float = DEFAULT_PUSH_INTERVAL_S,
        push_cpu_share: float = DEFAULT_PUSH_CPU_SHARE,
        wait_for_service_s: float = 30.0,
        flush_timeout_s: float = 10.0,
        prefix: str = "",
        **options: Any,
    ) -> None:
        # refused here, not in every rank's setup
        check_options(options)
        endpoint(frontend), name(job)
        for what, value in (("wait_for_service_s", wait_for_service_s), ("flush_timeout_s", flush_timeout_s)):
            if not 0 < value < float("inf"):
                raise ValueError(f"{what} must be a positive number of seconds, got {value!r}")
        PushPacer(push_interval_s, push_cpu_share)  # the loop's own checks, before any rank starts
        self.frontend, self.job, self.keys = frontend, job, keys
        self.push_interval_s, self.push_cpu_share = push_interval_s, push_cpu_share
        self.wait_for_service_s, self.flush_timeout_s = wait_for_service_s, flush_timeout_s
        self.prefix, self.options = prefix, options
        self.loop: WorkerLoop | None = None
        self._running = False

    def __getstate__(self) -> dict[str, Any]:
        # a loop's thread and sockets stay in their process
        return {**self.__dict__, "loop": None, "_running": False}

    def apply(self, model: nn.Module) -> nn.Module:
        """Start this rank's WorkerLoop and convert ``model``'s batch norm against it."""
        if self._running:
            raise RuntimeError("PsqLayerSync.apply: this plugin already runs a WorkerLoop; revert() first")
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        loop = WorkerLoop(
            self.frontend,
            job=self.job,
            worker=f"rank{rank}",
            keys=self.keys,
            push_interval_s=self.push_interval_s,
            push_cpu_share=self.push_cpu_share,
        ).start()
        if not loop.wait_ready(self.wait_for_service_s):
            log.warning(
                "psq: no statistics service at %s after %.0f s; training starts on batch statistics",
                self.frontend,
                self.wait_for_service_s,
            )
        self.loop, self._running = loop, True
        return convert_batchnorm(model, loop, prefix=self.prefix, **self.options)

    def revert(self, model: nn.Module) -> nn.Module:
        """Wait for the last step's history, restore ``nn.BatchNorm*d`` (buffers holding the
        cluster's statistics), stop the loop."""
        loop, running, self._running = self.loop, self._running, False
        if loop is not None and running and not loop.flush(self.flush_timeout_s):
            log.warning("psq: the last step's history did not arrive in %.0f s", self.flush_timeout_s)
        try:
            return revert_batchnorm(model)
        finally:
            if loop is not None:
                loop.stop()
