"""Every error visual-memory raises on purpose derives from `VisualMemoryError`.

Each names the offending file, value or record and, where there is one, what to
do next. Raising one of these from a mutation guarantees the memory is exactly
as it was before the call.
"""


SHOW_FAILURES = 10  # failures named one by one in an error message; the rest are counted


def list_failures(failures: list[str], *, total: int, what: str = "image(s)") -> str:
    """One message naming every failure of an all-or-nothing call (the first `SHOW_FAILURES`; the rest counted).

    >>> print(list_failures(["a.jpg: file is empty (0 bytes), not an image"], total=3))
    a.jpg: file is empty (0 bytes), not an image; nothing was added
    >>> print(list_failures(["a.jpg: file is empty", "b.png: no such file"], total=3))
    2 of 3 image(s) cannot be used; nothing was added:
      a.jpg: file is empty
      b.png: no such file
    """
    if len(failures) == 1:
        return f"{failures[0]}; nothing was added"
    lines = [f"{len(failures)} of {total} {what} cannot be used; nothing was added:"]
    lines += [f"  {f}" for f in failures[:SHOW_FAILURES]]
    if len(failures) > SHOW_FAILURES:
        lines.append(f"  ... and {len(failures) - SHOW_FAILURES} more")
    return "\n".join(lines)


class VisualMemoryError(Exception):
    """Base class: catch this to handle any error visual-memory raises on purpose."""


class ImageError(VisualMemoryError, ValueError):
    """An image could not be decoded or failed validation (names the source)."""


class EncoderError(VisualMemoryError):
    """An encoder name is unknown, or its weights cannot be found or loaded."""


class EncoderMismatchError(VisualMemoryError):
    """Vectors or a memory come from a different encoder than expected."""


class VectorError(VisualMemoryError, ValueError):
    """Embeddings have the wrong shape or dtype, or hold NaN/inf/zero vectors."""


class NotAMemoryError(VisualMemoryError, FileNotFoundError):
    """A path is not a visual-memory directory."""


class MemoryExistsError(VisualMemoryError, FileExistsError):
    """`create` was asked to create a memory where one already exists."""


class DuplicateIdError(VisualMemoryError, ValueError):
    """Records with these ids already exist (or an input repeats an id)."""


class UnknownIdError(VisualMemoryError, KeyError):
    """No record has this id."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable.
        return str(self.args[0]) if self.args else ""


class MemoryLockedError(VisualMemoryError):
    """Another writer holds the memory's write lock."""


class SelectorError(VisualMemoryError, ValueError):
    """A record selector is empty, malformed, or matches nothing it should."""


class ErasureError(VisualMemoryError):
    """A `forget` could not prove its erasure: the verification scan found bytes of forgotten records.

    ``receipt`` holds the `ForgetReceipt` with the hits. The records no longer
    vote; the erasure is retried on the next write.
    """

    def __init__(self, message: str, receipt=None) -> None:
        super().__init__(message)
        self.receipt = receipt
