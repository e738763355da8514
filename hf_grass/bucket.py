"""A bucket: items gathered up to a byte cap and handed on together, the rest when a backward ends.

Data parallelism (:mod:`hf_grass.distributed`) forms its fixed all-reduce buckets with it and
ends each backward pass with it; layer-wise updates (:mod:`hf_grass.layerwise`) step the
parameters whose gradients are ready in its buckets.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

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
    """

    def __init__(
        self,
        cap_bytes: int,
        on_flush: Callable[[list[T]], None],
        on_backward_end: Callable[[], None] | None = None,
    ):
        self.cap_bytes = cap_bytes
        self.on_flush = on_flush
        self.on_backward_end = on_backward_end
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
            Variable._execution_engine.queue_callback(self._end_of_backward)
            self._end_queued = True

    def _end_of_backward(self) -> None:
        self._end_queued = False
        self.flush()
        if self.on_backward_end is not None:
            self.on_backward_end()
