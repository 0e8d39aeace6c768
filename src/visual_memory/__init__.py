"""visual-memory: an image classifier you can edit like a database.

A frozen encoder embeds images; a durable memory stores labelled embeddings;
a query is classified by its nearest neighbours voting (Geirhos et al.,
"Towards flexible perception with visual memory", ICML 2025).

>>> import visual_memory as vm
>>> sorted(vm.VOTES)
['distance', 'plurality', 'rank', 'softmax']
"""

from .encoders import create_encoder, list_encoders
from .errors import (
    DuplicateIdError,
    EncoderError,
    EncoderMismatchError,
    ErasureError,
    ImageError,
    MemoryExistsError,
    MemoryLockedError,
    NotAMemoryError,
    SelectorError,
    UnknownIdError,
    VectorError,
    VisualMemoryError,
)
from .memory import Memory, create, open
from .memory.preview import EditPreview, ProbeChange, ProbeDiff, RecordChange
from .results import AddResult, EditResult, EvalResult, ForgetReceipt, Neighbor, OptimizeResult, Prediction, RemoveResult
from .vote import VOTES

__version__ = "0.1.0"

__all__ = [
    "AddResult",
    "DuplicateIdError",
    "EncoderError",
    "EditPreview",
    "EditResult",
    "EncoderMismatchError",
    "ErasureError",
    "EvalResult",
    "ForgetReceipt",
    "ImageError",
    "Memory",
    "MemoryExistsError",
    "MemoryLockedError",
    "Neighbor",
    "NotAMemoryError",
    "OptimizeResult",
    "Prediction",
    "ProbeChange",
    "ProbeDiff",
    "RecordChange",
    "RemoveResult",
    "SelectorError",
    "UnknownIdError",
    "VOTES",
    "VectorError",
    "VisualMemoryError",
    "create",
    "create_encoder",
    "list_encoders",
    "open",
]
