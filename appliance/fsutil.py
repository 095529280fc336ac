"""atomic_write for the host side: the one implementation lives in the on-device package, the
lowest layer, which the image ships on its own."""

from .dataplane.atomic import atomic_write

__all__ = ["atomic_write"]
