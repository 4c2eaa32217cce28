from __future__ import annotations

import pytest

from ..helpers import ARCHS, Case, replacement_case


@pytest.fixture(params=ARCHS)
def case(request) -> Case:
    """The replacement-model case of every tiny architecture (``test_replacement`` adds the shipped model)."""
    return replacement_case(request.param)


@pytest.fixture(params=ARCHS)
def tiny(request) -> Case:
    """The replacement-model case of every tiny architecture."""
    return replacement_case(request.param)
