"""vlmfix: attention-sink tools for transformers VLMs (find sinks, mitigate hallucination, prune tokens).

    import vlmfix
    with vlmfix.attach(model, processor, [methods...]) as fixed:
        fixed.generate(**inputs)
"""

from .adapters import VlmfixInputError, supported_families
from .attach import Attached, VlmfixError, attach
from .methods import GIFT, VAR, Method
from .sinks import find_sink_dims, scaled_tau, sink_scores
from .state import CallState

__version__ = "0.1.0"

__all__ = [
    "Attached",
    "CallState",
    "GIFT",
    "Method",
    "VAR",
    "VlmfixError",
    "VlmfixInputError",
    "attach",
    "find_sink_dims",
    "scaled_tau",
    "sink_scores",
    "supported_families",
]
