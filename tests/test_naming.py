"""Display ids and project prefixes, as the server reads and makes them."""

from __future__ import annotations

import pytest

from pluto_server.naming import MAX_RUN_NUMBER, parse_display_id, project_prefix


@pytest.mark.parametrize(("ref", "parsed"), [("MMP-4", ("MMP", 4)), ("mmp-4", ("MMP", 4)),
                                             ("BN-0", ("BN", 0)), ("R2D2-7", ("R2D2", 7))])
def test_a_display_id_is_read_in_either_case(ref: str, parsed: tuple[str, int]) -> None:
    assert parse_display_id(ref) == parsed


@pytest.mark.parametrize("ref", ["MMP", "MMP-", "-4", "MMP-x", "TOOLONGPREFIX-1", "MMP-4\n",
                                 f"MMP-{MAX_RUN_NUMBER + 1}",
                                 "\ufb03-1",  # upper-cases to "FFI-1"
                                 "MMP-\u00b9", "MMP-\u0663"])
def test_anything_else_is_no_display_id(ref: str) -> None:
    assert parse_display_id(ref) is None


@pytest.mark.parametrize(("name", "prefix"), [("my-model-project", "MMP"), ("mnist", "MNI"),
                                              ("BigNet", "BN"), ("---", "RUN")])
def test_the_prefix_is_initials_or_the_first_letters(name: str, prefix: str) -> None:
    assert project_prefix(name) == prefix
