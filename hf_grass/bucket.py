"""A bucket: items gathered up to a byte cap and handed on together, the rest when a backward ends.

Data parallelism (:mod:`hf_grass.distributed`) forms its fixed all-reduce buckets with it and
ends each backward pass with it; layer-wise updates (:mod:`hf_grass.layerwise`) step the
parameters whose gradients are ready in its buckets. :func:`at_end_of_backward` is the end of a
backward pass they and the optimizer's clipping check share: the outermost one, also under
reentrant checkpointing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

import torch
from torch.autograd import Variable

T = TypeVar("T")


class Bucket(Generic[T]):
    """Items kept in the order added and handed to ``on_flush`` together once they hold
    ``cap_bytes``.

    - ``add(item, nbytes)`` keeps ``item``; when the bytes kept reach ``cap_bytes``,
      ``on_flush`` gets the items kept and the bucket is empty again. A bucket closes at the item
      that brings it to the cap (DDP's rule): an item of ``cap_bytes`` or more added to an empty
      bucket goes alone, and with ``cap_bytes=0`` every item goes alone.
    - ``flush()`` hands on the items kept now; ``on_flush`` never gets an empty list.
    - ``flush_after_backward()``, called during a backward pass (any number of times, whether
      or not items were added), makes ``flush()`` and then ``on_backward_end()`` run once, when
      the autograd engine finishes that pass (a callback queued as DDP queues its own). The next
      backward pass needs a call of its own.

    Two kinds of backward pass do not end where that callback is queued:

    - a backward nested in another one (reentrant checkpointing, ``use_reentrant=True``, runs
      each segment's backward inside the outer one): its end is not the end of the pass, so the
      callback moves on to the end of the enclosing backward (a one-shot hook on the node that
      ran the nested one), and ``on_backward_end()`` still runs once, after every segment;
    - a backward that raised (an out-of-memory error that the training loop catches and
      retries with a smaller batch): autograd drops its callbacks unrun. The items it kept are
      dropped with it (the pass is void) and ``on_backward_failed()`` is told, so that the next
      pass starts clean instead of finding the end already queued and never flushing.
    """

    def __init__(
        self,
        cap_bytes: int,
        on_flush: Callable[[list[T]], None],
        on_backward_end: Callable[[], None] | None = None,
        on_backward_failed: Callable[[], None] | None = None,
    ):
        self.cap_bytes = cap_bytes
        self.on_flush = on_flush
        self.on_backward_end = on_backward_end
        self.on_backward_failed = on_backward_failed
        self.items: list[T] = []
        self.nbytes = 0
        self._end_queued = False

    def add(self, item: T, nbytes: int) -> None:
        self.items.append(item)
        self.nbytes += nbytes
        if self.nbytes >= self.cap_bytes:
            self.flush()

    def flush(self) -> None:
        items, self.items, self.nbytes = self.items, [], 0
        if items:
            self.on_flush(items)

    def flush_after_backward(self) -> None:
        if not self._end_queued:
            at_end_of_backward(self._end_of_backward, self._backward_failed)
            self._end_queued = True

    def _end_of_backward(self) -> None:
        self._end_queued = False
        self.flush()
        if self.on_backward_end is not None:
            self.on_backward_end()

    def _backward_failed(self) -> None:
        self._end_queued = False
        self.items, self.nbytes = [], 0
        if self.on_backward_failed is not None:
            self.on_backward_failed()


def at_end_of_backward(fn: Callable[[], None], dropped: Callable[[], None] | None = None) -> None:
    """Run ``fn`` when the backward pass running now ends, as DDP runs its own end.

    Called inside a backward nested in another one (reentrant checkpointing runs each segment's
    backward inside the outer one), ``fn`` waits for the end of the outermost one. When the
    backward raises instead, autograd drops the callback unrun, and ``dropped`` is called.
    """
    Variable._execution_engine.queue_callback(_EndOfBackward(fn, dropped))


class _EndOfBackward:
    """The callback :func:`at_end_of_backward` queues."""

    def __init__(self, fn: Callable[[], None], dropped: Callable[[], None] | None):
        self.fn, self.dropped = fn, dropped
        self.ran = False

    def __call__(self) -> None:
        self.ran = True
        # Inside a node of an enclosing backward, the backward that ended was a nested one:
        # queue again when that node is done, in the enclosing backward.
        node = torch._C._current_autograd_node()
        if node is None:
            self.fn()
            return
        handle = None

        def queue_in_enclosing_backward(*_) -> None:
            handle.remove()
            at_end_of_backward(self.fn, self.dropped)

        handle = node.register_hook(queue_in_enclosing_backward)

    def __del__(self) -> None:
        if not self.ran and self.dropped is not None:  # autograd dropped it: the backward raised
            self.dropped()
