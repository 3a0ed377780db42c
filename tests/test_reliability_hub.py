"""Issue 12, item 3: the hub and local-looking paths. A hub that never answers gives a clear error
instead of hanging; local-looking paths and FIFOs never go to the hub; a shipped name never shadows
a local folder; downloads take only what loading needs.
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
from pathlib import Path

import pytest
import torch
from conftest import logits_of, weights_folder

from hooked_llava import CheckpointError, HookedLlava
from hooked_llava.loading import resolve as resolve_module
from hooked_llava.loading.resolve import HUB_TIMEOUT_S, _within, hub_timeout, resolve

# --- item 3: the hub, local-looking paths, FIFOs -------------------------------------------------


@pytest.fixture
def stalled_hub(monkeypatch):
    """A TCP server on 127.0.0.1 that accepts connections and never answers; HF_ENDPOINT points at it."""
    server = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                accepted.append(server.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
    monkeypatch.setenv("HOOKED_LLAVA_HUB_TIMEOUT", "1")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    yield accepted
    server.close()
    for conn in accepted:
        conn.close()


def test_a_hub_that_never_answers_gives_a_clear_error_instead_of_hanging(stalled_hub):
    with pytest.raises(FileNotFoundError) as info:
        HookedLlava.from_pretrained("someorg/some-llava")
    message = str(info.value)
    assert stalled_hub, "the request must have reached the stalled endpoint (HF_ENDPOINT honoured)"
    assert "did not answer within 1 s" in message and "127.0.0.1" in message
    assert "no local folder of that name exists" in message
    assert "HF_HUB_OFFLINE" in message and "local directory" in message


def test_the_default_hub_deadline_is_at_most_60_s_and_configurable(monkeypatch):
    monkeypatch.delenv("HOOKED_LLAVA_HUB_TIMEOUT", raising=False)
    assert 0 < hub_timeout() == HUB_TIMEOUT_S <= 60
    monkeypatch.setenv("HOOKED_LLAVA_HUB_TIMEOUT", "2.5")
    assert hub_timeout() == 2.5
    monkeypatch.setenv("HOOKED_LLAVA_HUB_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="HOOKED_LLAVA_HUB_TIMEOUT='soon'"):
        hub_timeout()


def test_the_deadline_holds_even_if_the_hub_client_ignores_its_timeout():
    never = threading.Event()
    with pytest.raises(TimeoutError, match="no answer within 0.2 s"):
        _within(0.2, never.wait)
    assert _within(5.0, lambda x: x + 1, 1) == 2
    with pytest.raises(KeyError):
        _within(5.0, {}.__getitem__, "missing")


@pytest.mark.parametrize(
    "name",
    [
        "./missing-model",
        "../missing-model",
        "~/missing-model-xyz",
        "models/llava/v1",
        "org/name/",
        "weights.safetensors",
        "org/model.json",
        "C:\\models\\llava",
        ".hidden-model",
        "shapes-lava",
    ],
)
def test_local_looking_paths_never_go_to_the_hub(name, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(resolve_module, "download", lambda repo: pytest.fail(f"{repo!r} was sent to the hub"))
    with pytest.raises(FileNotFoundError, match="no such directory"):
        HookedLlava.from_pretrained(name)


def test_a_path_object_never_goes_to_the_hub(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(resolve_module, "download", lambda repo: pytest.fail(f"{repo!r} was sent to the hub"))
    with pytest.raises(FileNotFoundError, match="no such directory"):
        resolve(Path("someorg/some-llava"))


def test_an_org_name_string_with_dots_goes_to_the_hub(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    asked = []
    monkeypatch.setattr(resolve_module, "download", lambda repo: asked.append(repo) or tmp_path)
    assert resolve("llava-hf/llava-1.5-7b-hf") == tmp_path and asked == ["llava-hf/llava-1.5-7b-hf"]


def test_a_local_folder_wins_over_the_shipped_model_of_the_same_name(tiny, saved, monkeypatch, tmp_path, batch):
    model, _ = tiny
    shutil.copytree(saved, tmp_path / "shapes-llava")
    monkeypatch.chdir(tmp_path)
    with pytest.warns(UserWarning, match="local folder .*shapes-llava, not the shipped model"):
        loaded = HookedLlava.from_pretrained("shapes-llava")
    assert loaded.cfg.d_model == model.cfg.d_model
    assert torch.equal(logits_of(loaded, batch), logits_of(model, batch))


def test_a_local_folder_without_config_says_the_shipped_model_was_not_used(monkeypatch, tmp_path):
    (tmp_path / "shapes-llava").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.warns(UserWarning), pytest.raises(FileNotFoundError, match="no config.json.*shipped model"):
        HookedLlava.from_pretrained("shapes-llava")


@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "tokenizer.json"])
def test_a_fifo_is_refused_instead_of_blocking(name, saved, state, tmp_path):
    path = weights_folder(saved, tmp_path / "m", {"model.safetensors": state} if name != "model.safetensors" else {})
    if name == "tokenizer.json":
        (path / "tokenizer_config.json").write_text((saved / "tokenizer_config.json").read_text())
    (path / name).unlink(missing_ok=True)
    os.mkfifo(path / name)
    with pytest.raises(CheckpointError, match=f"{name} is not a regular file"):
        HookedLlava.from_pretrained(path)


def test_an_unreachable_hub_falls_back_to_a_complete_cached_copy(stalled_hub, monkeypatch, tmp_path):
    import huggingface_hub

    calls = []

    def cached(repo_id, allow_patterns=None, local_files_only=False):
        calls.append((repo_id, local_files_only))
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", cached)
    assert resolve("someorg/some-llava") == tmp_path
    assert stalled_hub and calls == [("someorg/some-llava", True)]


def test_offline_mode_reads_only_the_cache(monkeypatch, tmp_path):
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda **kw: pytest.fail("offline mode must not ask the hub"))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo, allow_patterns, local_files_only: tmp_path)
    assert resolve("someorg/some-llava") == tmp_path


def test_a_hub_download_takes_only_top_level_config_tokenizer_and_weight_files(monkeypatch, tmp_path):
    import huggingface_hub
    from huggingface_hub.hf_api import RepoSibling

    names = ["config.json", "model.safetensors", "tokenizer.model", "README.md", "sub/model.safetensors", "x.bin"]
    info = type("Info", (), {"sha": "a" * 40, "siblings": [RepoSibling(rfilename=n) for n in names]})()
    api = type("Api", (), {"model_info": lambda self, repo, timeout: info})
    fetched = []

    def download(repo_id, filename, revision, endpoint, etag_timeout):
        fetched.append((filename, revision, endpoint, etag_timeout))
        return str(tmp_path / "snapshot" / filename)

    monkeypatch.setenv("HF_ENDPOINT", "http://mirror.invalid")
    monkeypatch.setenv("HOOKED_LLAVA_HUB_TIMEOUT", "7")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda endpoint: api())
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    assert resolve("org/name") == tmp_path / "snapshot"
    expected = ["config.json", "model.safetensors", "tokenizer.model"]
    assert fetched == [(n, "a" * 40, "http://mirror.invalid", 7.0) for n in expected]
