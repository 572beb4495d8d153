"""load_pipeline: offline by construction; an unavailable hub id fails at once with instructions."""
from __future__ import annotations

import time

import pytest

from dgq_utils.model import loading


def test_unknown_hub_id_fails_fast_with_instructions():
    t0 = time.time()
    with pytest.raises(FileNotFoundError) as err:
        loading.load_pipeline("dgq-nonexistent-org/never-downloaded-model")
    assert time.time() - t0 < 10
    msg = str(err.value)
    assert "is not available offline" in msg and "huggingface-cli download" in msg and "HF_HOME" in msg
    assert isinstance(err.value, loading.ModelNotAvailableOffline)


def test_sd14_id_without_cache_fails_fast():
    try:
        loading.resolve_model_path("CompVis/stable-diffusion-v1-4")
        pytest.skip("CompVis/stable-diffusion-v1-4 is in the local Hugging Face cache on this machine")
    except loading.ModelNotAvailableOffline as err:
        assert str(err).startswith("'CompVis/stable-diffusion-v1-4' is not available offline.")


def test_missing_local_folder_and_non_pipeline_folder(tmp_path):
    with pytest.raises(FileNotFoundError):
        loading.load_pipeline(tmp_path / "nowhere" / "sd")
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        loading.load_pipeline(tmp_path)


def test_missing_embedded_model_message(tmp_path, monkeypatch):
    monkeypatch.setattr(loading, "EMBEDDED_PIPELINE_DIR", tmp_path / "pipeline")
    with pytest.raises(FileNotFoundError, match="train_embedded.py"):
        loading.load_pipeline()


def test_no_network_attempt_for_unknown_id(monkeypatch):
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError("load_pipeline tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    with pytest.raises(loading.ModelNotAvailableOffline):
        loading.load_pipeline("dgq-nonexistent-org/other-model")
