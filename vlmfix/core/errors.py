"""The error vlmfix raises for a misuse of attach (its message says what to do instead)."""


class VlmfixError(RuntimeError):
    """Misuse of attach/detach or of an attached model (the message says what to do instead)."""
