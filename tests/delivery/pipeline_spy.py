"""Counts how many transactions took the pipelined path (ReplyReader.install calls)."""

from __future__ import annotations

import pytest

from relaygate.delivery import pipeline


def count_installs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A one-element list holding the number of ReplyReader.install calls from now on."""
    count = [0]
    real = pipeline.ReplyReader.install.__func__  # type: ignore[attr-defined]

    def install(cls: type[pipeline.ReplyReader], transport: object) -> pipeline.ReplyReader:
        count[0] += 1
        return real(cls, transport)

    monkeypatch.setattr(pipeline.ReplyReader, "install", classmethod(install))
    return count
