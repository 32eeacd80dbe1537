"""The receive path's byte checks against their plain definitions (hypothesis)."""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from relaygate.smtp.message import has_bare_cr_or_lf

_BARE = re.compile(rb"\r(?!\n)|(?<!\r)\n")


@settings(max_examples=1000, deadline=None)
@given(st.lists(st.sampled_from([b"\r", b"\n", b"\r\n", b"a", b"\n\r", b"."]), max_size=30))
def test_has_bare_cr_or_lf_matches_its_definition(parts: list[bytes]) -> None:
    content = b"".join(parts)
    assert has_bare_cr_or_lf(content) == bool(_BARE.search(content))
