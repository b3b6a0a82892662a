"""Shared fixtures (the helpers they use, and the tests' other shared code, are in tests/helpers/)."""

from __future__ import annotations

import pytest

from tests.helpers.checkpoints import (
    CHATGLM_V1_HF,
    CHATGLM_V2_HF,
    thudm_v1_state_dict,
    thudm_v2_state_dict,
    write_folder,
)


@pytest.fixture
def chatglm_v1_dir(tmp_path):
    return write_folder(tmp_path / "chatglm", CHATGLM_V1_HF, thudm_v1_state_dict(CHATGLM_V1_HF))


@pytest.fixture
def chatglm_v2_dir(tmp_path):
    return write_folder(tmp_path / "chatglm2", CHATGLM_V2_HF, thudm_v2_state_dict(CHATGLM_V2_HF))
