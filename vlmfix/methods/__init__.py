"""vlmfix methods: each is a config dataclass plus the hooks that apply it (see `base.Method`)."""

from .base import Method

__all__ = ["Method"]
