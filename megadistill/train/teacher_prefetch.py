"""Teacher prefetch (distill.teacher_prefetch): micro-batch i+1's data and teacher output are issued before the student
backward of micro-batch i, on a CUDA side stream, so the teacher never waits on student work it does not depend on.

The teacher output of a micro-batch depends on its token ids and the frozen teacher weights only. With prefetch the
trainer asks for it right after the student forward of the micro-batch before (`issue`), also across the optimizer
step: the first micro-batch of step s+1 is issued before the last backward of step s. On CUDA the host-to-device
copies (non_blocking, from pinned memory) and the teacher forward go on a dedicated stream; the student's stream waits
on one event just before the forward that consumes them, and every tensor made on the side stream is recorded on the
student's stream (record_stream) so the caching allocator cannot hand its memory back to the side stream while the
student still reads it.

Kept on the student's stream (same prefetched order, no concurrency):
- a ZeRO-3 teacher (distill.teacher_zero3): its forward all-gathers parameters over the DP group through DeepSpeed's
  coordinator, which works on the current stream and must see the same order on every rank;
- CPU (no streams): the order changes, the arithmetic does not (bit-identical to teacher_prefetch=false).
With parallel.tp_size > 1 the teacher's TP collectives (all-reduce; all-gather / reduce-scatter with
parallel.sequence_parallel) go over ParallelGroups.teacher_tp_group, the same ranks in a process group of their own
(the trainer builds it when prefetch is on): on NCCL that is a communicator and stream of its own, so a student
collective never queues behind a teacher one. Each group's collectives stay in host order on every rank (no deadlock).

The cached teacher (distill.teacher=cache:DIR) has no forward: reading its shards (file read, digest, stack) is the
work, done ahead on a background thread, the copy issued on the side stream from there.

Loader state: while a micro-batch is prefetched the loader is one batch ahead; state_dict() is the state from before
that batch (what a resume must serve next), so checkpoints are the same with prefetch on or off.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Union

import torch

from megadistill.config import Config
from megadistill.parallel.vocab_parallel import check_targets
from megadistill.train import teacher_cache
from megadistill.train.objective import teacher_outputs


@dataclass
class MicroBatch:
    """One micro-batch on the device: the student's inputs and the teacher's kwargs for Objective.forward."""

    ids: torch.Tensor  # [b, s]
    labels: torch.Tensor  # [b, s]
    doc_ids: Optional[torch.Tensor]  # [b, s] on the host, None without data.document_mask: each forward builds its
    # attention mask from them (attention.build_mask; flash-attn's run starts found without a sync)
    extra: Dict[str, torch.Tensor]  # teacher_logits | teacher_hidden + teacher_weight | teacher_ids/_logprobs/_tail
    ready: Optional["torch.cuda.Event"] = None  # recorded on the side stream after this batch's copies and forward
    made_on_side: List[torch.Tensor] = field(default_factory=list)  # tensors allocated on the side stream

    def wait(self) -> None:
        """The current stream waits for this micro-batch's side-stream work (no-op without a side stream)."""
        if self.ready is None:
            return
        stream = torch.cuda.current_stream(self.ids.device)
        stream.wait_event(self.ready)
        for t in self.made_on_side:  # freed only once `stream` has passed its reads of them
            t.record_stream(stream)
        self.ready, self.made_on_side = None, []


def side_stream_reason(cfg: Config, device: torch.device, teacher) -> Optional[str]:
    """Why the teacher work stays on the student's stream (None: it gets its own stream)."""
    if torch.device(device).type != "cuda":
        return "not a CUDA device"
    if getattr(teacher, "engine", None) is not None:
        return "distill.teacher_zero3=true: its parameter all-gathers must stay in order on the student's stream"
    return None


class TeacherFeed:
    """Serves the training micro-batches with their teacher outputs; issue() starts the next one ahead of time.

    prefetch=False reproduces the old order: next() pulls the batch, copies it and runs the teacher, then returns.
    """

    def __init__(self, loader, cfg: Config, device: torch.device, teacher=None, prefetch: bool = True):
        self.loader, self.cfg, self.device, self.teacher = loader, cfg, torch.device(device), teacher
        self.prefetch = prefetch
        self.cached = isinstance(teacher, teacher_cache.CachedTeacher)
        self.cuda = self.device.type == "cuda"
        self.stream = None
        if prefetch and teacher is not None and side_stream_reason(cfg, self.device, teacher) is None:
            self.stream = torch.cuda.Stream(self.device)
        self._synced = False  # the side stream has waited once for the student's stream (teacher weights loaded)
        self._pool = (ThreadPoolExecutor(max_workers=1, thread_name_prefix="megadistill-teacher-cache")
                      if prefetch and self.cached else None)
        self._pending: Union[None, MicroBatch, Future] = None
        self._state: Optional[dict] = None  # loader state from before the pending batch

    # ------------------------------------------------------------------------------------------------ serving
    def next(self) -> MicroBatch:
        """The next micro-batch (issued now unless issue() already did); call .wait() before consuming it."""
        if self._pending is None:
            self.issue()
        mb = self._pending.result() if isinstance(self._pending, Future) else self._pending
        self._pending, self._state = None, None
        return mb

    def issue(self) -> None:
        """Pull the next batch and issue its copies and teacher work now (no-op if one is already pending)."""
        if self._pending is not None:
            return
        self._state = self.loader.state_dict()
        if self.stream is not None and not self._synced:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))  # weights written on the default stream
            self._synced = True
        if self._pool is not None:
            self._pending = self._pool.submit(self._make)
        else:
            self._pending = self._make()

    def _make(self) -> MicroBatch:
        batch = next(self.loader)
        if self.stream is None:
            return self._on_current(batch)
        with torch.cuda.stream(self.stream):
            mb = self._on_current(batch)
            mb.ready = torch.cuda.Event()
            mb.ready.record(self.stream)
        mb.made_on_side = [t for t in (mb.ids, mb.labels, mb.doc_ids, *mb.extra.values())
                           if t is not None and t.device.type == "cuda" and not isinstance(t, torch.nn.Parameter)]
        return mb

    def _h2d(self, t: torch.Tensor) -> torch.Tensor:
        if not self.cuda:
            return t.to(self.device)
        return t.pin_memory().to(self.device, non_blocking=True)  # the pinned block is held until the copy is done

    def _on_current(self, batch: dict) -> MicroBatch:
        # on the host, before the copy: the loss's own check does not sync on a GPU (check_targets)
        check_targets(batch["labels"], self.cfg.model.vocab_size)
        ids, labels = self._h2d(batch["input_ids"]), self._h2d(batch["labels"])
        doc_ids = batch["doc_ids"] if self.cfg.data.document_mask else None  # on the host: attention.build_mask
        if "teacher_ids" in batch:
            extra = teacher_cache.cached_outputs(batch, self.device, to=self._h2d)
        elif self.teacher is not None:
            extra = teacher_outputs(self.teacher.module, self.cfg, ids, doc_ids)
        else:
            extra = {}
        return MicroBatch(ids, labels, doc_ids, extra)

    # ------------------------------------------------------------------------------------------------ state
    def discard(self) -> None:
        """Drop a pending micro-batch (its reader thread finished first); the loader is left where it is."""
        if isinstance(self._pending, Future):
            self._pending.exception()  # wait: it may be using the loader
        self._pending = None

    def state_dict(self) -> dict:
        """The loader's state as if nothing were prefetched (the next micro-batch a resume must serve)."""
        return self._state if self._pending is not None else self.loader.state_dict()

    def load_state_dict(self, d: dict) -> None:
        self.discard()
        self._state = None
        self.loader.load_state_dict(d)

    def close(self) -> None:
        self.discard()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
