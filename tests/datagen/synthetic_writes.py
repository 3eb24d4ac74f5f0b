"""Watching (and killing) the image writes of a synthetic-set generator, for the resume tests."""
from __future__ import annotations

from dfqkern.datagen.store import SyntheticSetWriter


def watch_writes(monkeypatch, kill_when=None) -> list[int]:
    """Patch ``SyntheticSetWriter.write_image`` to append each written index to the returned list; with
    ``kill_when(index, written)`` true it raises KeyboardInterrupt (a simulated kill) instead of writing.
    A later call replaces the earlier watch (both wrap the real method)."""
    real = getattr(SyntheticSetWriter.write_image, "__wrapped__", SyntheticSetWriter.write_image)
    written: list[int] = []

    def write_image(self, index, image):
        if kill_when is not None and kill_when(index, written):
            raise KeyboardInterrupt("simulated kill")
        written.append(index)
        real(self, index, image)

    write_image.__wrapped__ = real
    monkeypatch.setattr(SyntheticSetWriter, "write_image", write_image)
    return written
