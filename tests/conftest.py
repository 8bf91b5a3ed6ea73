"""Shared fixtures of the federated tests: tiny site caches, a run config, a fake Grid."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Context, Error, Message, MessageType, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from fedct.common.cache.store import write_manifest, write_scan, write_settings
from fedct.common.federation.transport import Layout
from fedct.common.model.classifier import ModelConfig, build_model, travelling_state
from fedct.server.settings import ServerSettings
from fedct.server.settings import app_defaults as read_app_defaults

TINY = ModelConfig(backbone="test_efficientnet")

# Bright slices for COVID-19, dark for normal, mid for pneumonia: learnable in a round or two.
CLASS_LEVELS = {0: 40, 1: 120, 2: 210}


def write_tiny_cache(
    cache_dir: Path,
    counts: dict[str, dict[int, int]],
    *,
    seed: int,
    size: int = 32,
    slices: int = 3,
) -> Path:
    """A cache with ``counts[split][class_index]`` scans of noisy class-coded slices."""
    rng = np.random.default_rng(seed)
    rows = []
    for split, per_class in counts.items():
        for class_index, n in per_class.items():
            for i in range(n):
                scan_id = f"{split}-{class_index}-{i}"
                level = CLASS_LEVELS[class_index]
                noise = rng.normal(0, 25, (slices, size, size))
                write_scan(cache_dir, scan_id, np.clip(level + noise, 0, 255).astype(np.uint8))
                rows.append(
                    {
                        "scan_id": scan_id,
                        "patient_id": f"patient-{scan_id}",
                        "class_index": class_index,
                        "split": split,
                    }
                )
    write_manifest(cache_dir, rows)
    write_settings(cache_dir, {"size": size, "fraction": 0.5, "normalize": "ai-corona"})
    return cache_dir


@pytest.fixture(scope="session")
def site_caches(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two hospitals (the second without a tune split) and an external binary set."""
    root = tmp_path_factory.mktemp("caches")
    train = {0: 3, 1: 2, 2: 3}
    return {
        "site_a": write_tiny_cache(
            root / "site_a", {"train": train, "tune": {0: 2, 2: 2}, "test": {0: 1, 2: 1}}, seed=1
        ),
        "site_b": write_tiny_cache(
            root / "site_b", {"train": train, "test": {0: 1, 1: 1, 2: 1}}, seed=2
        ),
        "external": write_tiny_cache(root / "external", {"test": {0: 4, 2: 4}}, seed=3),
    }


@pytest.fixture(scope="session")
def app_defaults() -> dict[str, Any]:
    """The run-config defaults of pyproject.toml."""
    return read_app_defaults()


@pytest.fixture
def run_config(
    app_defaults: dict[str, Any], site_caches: dict[str, Path], tmp_path: Path
) -> dict[str, Any]:
    """Defaults made tiny: test_efficientnet, two sites, one external set, CPU."""
    return {
        **app_defaults,
        "num-server-rounds": 2,
        "backbone": "test_efficientnet",
        "image-size": 32,
        "batch-size": 4,
        "lr": 0.01,
        "device": "cpu",
        "site-caches": f"{site_caches['site_a']},{site_caches['site_b']}",
        "external-caches": f"ext={site_caches['external']}",
        "run-dir": str(tmp_path / "run"),
        "node-wait-timeout": 5.0,
    }


def instruction_message(
    run_config: dict[str, Any], message_type: str, cfg: ModelConfig = TINY, **overrides: Any
) -> Message:
    """A train or evaluate message of round 3 as the coordinator's round loop sends it: the
    instruction of ``run_config`` (with ``cfg``'s model keys and ``overrides``) and the packed
    weights of a seeded model of ``cfg``."""
    settings = ServerSettings.from_run_config({**run_config, **cfg.to_config(), **overrides})
    torch.manual_seed(0)
    state = travelling_state(build_model(cfg), cfg)
    layout = Layout.of(state)
    if message_type == MessageType.TRAIN:
        config = settings.train_instruction("k1", 3, layout.fingerprint)
    else:
        config = settings.evaluate_instruction("k1", 3, layout.fingerprint)
    arrays = layout.pack(state, settings.transport_dtype)
    return Message(
        RecordDict({"arrays": arrays, "config": config}), dst_node_id=10, message_type=message_type
    )


@pytest.fixture
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let Flower build instruction messages outside a running Flower process."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 1)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


class FakeGrid(Grid):
    """Delivers messages to a ClientApp in-process, one node per site config.

    A handler that raises becomes an error reply, as on a real SuperNode.  Nodes in
    ``silent`` are connected but never reply (a dead ClientApp behind a live SuperNode).
    """

    def __init__(self, app: Any, node_configs: list[dict[str, Any]], run_config: dict) -> None:
        self.app = app
        self.contexts = {
            node_id: Context(
                run_id=1,
                node_id=node_id,
                node_config=config,
                state=RecordDict(),
                run_config=run_config,
            )
            for node_id, config in enumerate(node_configs, start=10)
        }
        self.sent: list[Message] = []
        self.silent: set[int] = set()
        self._replies: dict[str, Message] = {}

    def set_run(self, run: Any) -> None:
        raise NotImplementedError

    @property
    def run(self) -> Any:
        raise NotImplementedError

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            self.sent.append(message)
            message.metadata.__dict__["_message_id"] = message_id = uuid.uuid4().hex
            ids.append(message_id)
            if message.metadata.dst_node_id not in self.silent:
                self._replies[message_id] = self._handle(message)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]

    def _handle(self, message: Message) -> Message:
        try:
            return self.app(message, self.contexts[message.metadata.dst_node_id])
        except Exception as exc:  # any handler failure becomes an error reply
            error = Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=repr(exc))
            return Message(error, reply_to=message)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))


@pytest.fixture
def make_grid() -> Any:
    """``make_grid(node_configs, run_config)``: a FakeGrid of the hospital ClientApp."""
    from fedct.client.app import app  # lazily: only the federated tests need the ClientApp

    def make(node_configs: list[dict[str, Any]], run_config: dict[str, Any]) -> FakeGrid:
        return FakeGrid(app, node_configs, run_config)

    return make
