"""Count the aten operators a piece of model code runs: the host-side cost of eager decoding.

Eager decoding on a GPU is bound by the host, not the chip: a 7B decoder's weights are read in
about 3 ms per token on a modern GPU, while an eager step takes 23-28 ms, nearly all of it Python
and dispatch time. Each operator counted here is at most one kernel launch (views launch none), so
the operator count of a decode step is what an eager GPU waits on; a host read (`.item()`,
`nonzero`, boolean-mask indexing, ...) is worse, as it synchronises the device and drains the
launch queue.

    counter = count_ops(model, input_ids=ids, cache=cache)
    counter.total, counter.compute, counter.host_reads, counter.counts.most_common(5)

Device-to-host copies count as host reads only when their source is on an accelerator (`.cpu()`
of a CPU tensor dispatches nothing), so on the CPU the count is a lower bound.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

#: operators that always read tensor values on the host (synchronising an accelerator); item and
#: is_nonzero count only where they are not decomposed into _local_scalar_dense
HOST_READS = frozenset({
    "aten._local_scalar_dense", "aten.item", "aten.is_nonzero", "aten.equal", "aten.allclose", "aten.nonzero",
    "aten.masked_select", "aten.bincount",
})
#: view-like operators that `is_view` (alias annotations) misses
_EXTRA_VIEWS = frozenset({"aten._unsafe_view", "aten.detach_"})
_BOOL_INDEXING = frozenset({"aten.index", "aten.index_put", "aten.index_put_", "aten._index_put_impl_"})
_COPIES = frozenset({"aten._to_copy", "aten.copy_"})


def _is_host_read(packet: str, args: tuple, kwargs: dict) -> bool:
    if packet in HOST_READS or packet.startswith(("aten.unique", "aten._unique")):
        return True
    if packet in _BOOL_INDEXING:  # indexing with a boolean mask computes its nonzero positions
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None)
    if packet == "aten.repeat_interleave":  # the output size comes from the repeats' values
        return isinstance(args[0], torch.Tensor) and kwargs.get("output_size") is None
    if packet in _COPIES:
        src, dst = (args[0], kwargs.get("device")) if packet == "aten._to_copy" else (args[1], args[0].device)
        return src.device.type != "cpu" and dst is not None and torch.device(dst).type == "cpu"
    return False


class OpCounter(TorchDispatchMode):
    """A dispatch mode counting the aten operators called while it is active.

    - `counts`: calls per operator overload ("aten.mm.default");
    - `total`: all calls; `views`: the view operators among them (no kernel, metadata only);
      `compute`: total - views;
    - `host_reads`: calls that read tensor values on the host (see `HOST_READS`, unique, boolean
      indexing, repeat_interleave without output_size, device-to-host copies).
    """

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()
        self.total = 0
        self.views = 0
        self.host_reads = 0

    @property
    def compute(self) -> int:
        return self.total - self.views

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        # Under inference_mode composite operators (reshape, einsum, item, ...) reach the mode whole:
        # run their decomposition under it, so that it counts what runs, as it does outside.
        if torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), "CompositeImplicitAutograd"):
            with self:
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        packet = str(func.overloadpacket)
        self.counts[str(func)] += 1
        self.total += 1
        self.views += func.is_view or packet in _EXTRA_VIEWS
        self.host_reads += _is_host_read(packet, args, kwargs)
        return func(*args, **kwargs)


def count_ops(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> OpCounter:
    """Run `fn(*args, **kwargs)` under a fresh `OpCounter` and return the counter."""
    with OpCounter() as counter:
        fn(*args, **kwargs)
    return counter
