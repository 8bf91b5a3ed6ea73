"""Coordinator pieces below the ServerApp: arrays, aggregation, guards, run directory."""

from __future__ import annotations

import math
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedct.client.local import outgoing_arrays
from fedct.common.federation.transport import FLOATING, INTEGER, Layout, conform, payload_bytes
from fedct.common.model.classifier import (
    ModelConfig,
    build_model,
    load_travelling_state,
    travelling_state,
)
from fedct.common.run.directory import CheckpointError, RunDirectory
from fedct.server.replies import NodeWaitTimeout, shortfall, wait_for_nodes
from fedct.server.settings import (
    ServerSettings,
    SettingsError,
    parse_external_caches,
)
from fedct.server.strategies import (
    aggregate_metrics,
    build_strategy,
    restore_strategy_state,
    strategy_state,
)

TINY = ModelConfig(backbone="test_efficientnet", channels_last=False)


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(TINY)


def _strategy(name: str, **overrides: object):
    options = {
        "fraction_train": 1.0,
        "min_train_nodes": 2,
        "min_available_nodes": 2,
        "proximal_mu": 0.1,
        "server_lr": 0.1,
        "client_lr": 0.01,
        "statistics_keys": {"bn.running_var"},
        **overrides,
    }
    return build_strategy(name, **options)


def _replies(arrays: list[dict[str, np.ndarray]], metrics: list[dict[str, float]]) -> list[Message]:
    """Train replies as Flower delivers them, to instructions sent to nodes 10, 11, ..."""
    replies = []
    for node, (values, numbers) in enumerate(zip(arrays, metrics, strict=True), start=10):
        instruction = Message(RecordDict({"config": ConfigRecord()}), node, "train")
        record = ArrayRecord({k: Array(v) for k, v in values.items()})
        content = RecordDict({"arrays": record, "metrics": MetricRecord(numbers)})
        replies.append(Message(content, reply_to=instruction))
    return replies


@pytest.mark.parametrize("transport", ["float32", "float16"])
def test_sent_weights_load_back_with_the_model_dtypes(transport: str) -> None:
    sender, receiver = _model(0), _model(1)
    sender.train()(torch.rand(2, 2, 1, 32, 32), torch.ones(2, 2, dtype=torch.bool))
    layout = Layout.of(travelling_state(receiver, TINY))

    sent = outgoing_arrays(sender, transport)
    assert sent[FLOATING].dtype == transport and sent[INTEGER].dtype == "int64"
    full_size = payload_bytes(outgoing_arrays(sender, "float32"))
    assert payload_bytes(sent) <= (0.5 * full_size + 256 if transport == "float16" else full_size)
    load_travelling_state(receiver, layout.unpack(sent), TINY)

    want, got = sender.state_dict(), receiver.state_dict()
    assert {k: v.dtype for k, v in got.items()} == {k: v.dtype for k, v in want.items()}
    tolerance = 0 if transport == "float32" else 2e-3
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, rtol=tolerance, atol=tolerance)
    batches = [k for k in want if k.endswith("num_batches_tracked")]
    assert batches and all(got[k].dtype == torch.int64 and got[k].item() == 1 for k in batches)


def test_averaged_batch_counts_come_back_as_integers(task_identity: None) -> None:
    counts = [np.array(3, dtype=np.int64), np.array(4, dtype=np.int64)]
    replies = _replies([{"n": c} for c in counts], [{"num-examples": 1}, {"num-examples": 1}])
    averaged, _ = _strategy("fedavg").aggregate_train(1, replies)
    assert averaged["n"].dtype == "float64"
    restored = conform(averaged, {"n": np.dtype(np.int64)})["n"].numpy()
    assert restored.dtype == np.int64 and restored == 4  # 3.5 rounds to even


def test_fedavg_weighting_matches_a_hand_computed_average(task_identity: None) -> None:
    a = {"w": np.array([1.0, 2.0, -4.0], np.float32), "b": np.array(10.0, np.float32)}
    b = {"w": np.array([5.0, 0.0, 8.0], np.float32), "b": np.array(-2.0, np.float32)}
    metrics = [{"num-examples": 30, "train-loss": 1.0}, {"num-examples": 10, "train-loss": 3.0}]
    averaged, aggregated = _strategy("fedavg").aggregate_train(1, _replies([a, b], metrics))
    np.testing.assert_allclose(averaged["w"].numpy(), [2.0, 1.5, -1.0], rtol=1e-6)
    np.testing.assert_allclose(averaged["b"].numpy(), 7.0, rtol=1e-6)
    assert aggregated["train-loss"] == pytest.approx(1.5)
    assert aggregated["num-examples"] == 40


def test_metric_aggregation_skips_nan_and_weights_by_split_counts() -> None:
    records = [
        RecordDict({"m": MetricRecord(m)})
        for m in (
            {"num-examples": 6, "tune-n": 4, "tune-auc_covid": 0.5, "test-n": 2, "test-loss": 1.0},
            {
                "num-examples": 2,
                "tune-n": 0,
                "tune-auc_covid": math.nan,
                "test-n": 2,
                "test-loss": 3.0,
            },
            {
                "num-examples": 2,
                "tune-n": 1,
                "tune-auc_covid": 1.0,
                "test-n": 0,
                "test-loss": math.nan,
            },
        )
    ]
    out = aggregate_metrics(records, "num-examples")
    assert out["tune-auc_covid"] == pytest.approx((4 * 0.5 + 1 * 1.0) / 5)
    assert out["test-loss"] == pytest.approx(2.0)
    assert out["tune-n"] == 5 and out["num-examples"] == 10
    nothing = aggregate_metrics(records[1:2], "num-examples")
    assert math.isnan(nothing["tune-auc_covid"])


def test_fedadam_steps_parameters_but_averages_running_statistics(task_identity: None) -> None:
    strategy = _strategy("fedadam")
    start = {"bn.weight": np.ones(2, np.float32), "bn.running_var": np.full(2, 0.05, np.float32)}
    record = ArrayRecord({k: Array(v) for k, v in start.items()})
    strategy.configure_train(1, record, ConfigRecord(), _Grid([10, 11]))
    low = {"bn.weight": np.full(2, 0.9, np.float32), "bn.running_var": np.full(2, 0.01, np.float32)}
    high = {
        "bn.weight": np.full(2, 0.9, np.float32),
        "bn.running_var": np.full(2, 0.03, np.float32),
    }
    metrics = [{"num-examples": 1}, {"num-examples": 3}]
    arrays, _ = strategy.aggregate_train(1, _replies([low, high], metrics))
    np.testing.assert_allclose(arrays["bn.running_var"].numpy(), 0.025, rtol=1e-6)
    assert np.all(arrays["bn.weight"].numpy() < 0.95)  # an Adam step of about eta

    saved = strategy_state(strategy)
    assert set(saved) == {
        "m_t/bn.weight",
        "m_t/bn.running_var",
        "v_t/bn.weight",
        "v_t/bn.running_var",
    }
    fresh = _strategy("fedadam")
    restore_strategy_state(fresh, saved)
    np.testing.assert_array_equal(fresh.m_t["bn.weight"], strategy.m_t["bn.weight"])
    with pytest.raises(ValueError, match="optimiser state"):
        restore_strategy_state(_strategy("fedavg"), saved)
    assert strategy_state(_strategy("fedprox")) == {}


class _Grid:
    """Nodes that connect one per call of get_node_ids, or all at once."""

    def __init__(self, nodes: list[int], one_per_call: bool = False) -> None:
        self.nodes = nodes
        self.calls = 0
        self.one_per_call = one_per_call

    def get_node_ids(self) -> list[int]:
        self.calls += 1
        return self.nodes[: self.calls] if self.one_per_call else self.nodes


def test_wait_for_nodes_returns_once_enough_connect_and_times_out_clearly() -> None:
    assert wait_for_nodes(_Grid([1, 2, 3], True), 2, 10, sleep=lambda _: None) == [1, 2]
    now = [0.0]

    def sleep(seconds: float) -> None:
        now[0] += seconds

    with pytest.raises(NodeWaitTimeout, match="only 1 of 3 nodes connected after 5 s"):
        wait_for_nodes(_Grid([1]), 3, 5, clock=lambda: now[0], sleep=sleep)


def test_shortfall_names_the_counts() -> None:
    assert shortfall(2, 3, 2) is None
    assert "only 1 of 3 train replies succeeded, min-train-replies is 2" in shortfall(1, 3, 2)


def _save(run: RunDirectory, server_round: int, value: float, loss: float) -> str:
    arrays = {"w": np.full(3, float(server_round), np.float32), "n": np.array(server_round)}
    metrics = {"federated": {"tune-auc_covid": value}, "central": {"ext-loss": loss}}
    return run.save_round(server_round, arrays, {"note": "x"}, metrics, {})


def test_run_directory_checkpoints_cards_pointers_and_resume(tmp_path: Path) -> None:
    run = RunDirectory(tmp_path / "run")
    run.claim()
    digest = _save(run, 0, math.nan, 2.0)
    _save(run, 1, 0.7, 1.5)
    card = run.read_json("round_000.card.json")
    assert (
        card["sha256"] == digest
        and card["round"] == 0
        and card["checkpoint"].endswith(".safetensors")
    )
    assert run.metrics()[0]["federated"]["tune-auc_covid"] is None  # NaN written as null

    assert not run.update_best(0, "tune-auc_covid", math.nan)
    assert run.update_best(1, "tune-auc_covid", 0.7)
    assert not run.update_best(2, "tune-auc_covid", 0.6)
    assert run.update_best(2, "ext-loss", 1.4) and not run.update_best(3, "ext-loss", 1.45)
    assert run.read_json("best.json")["round"] == 2

    with pytest.raises(CheckpointError, match="already holds a run"):
        RunDirectory(run.path).claim()
    latest = run.load_latest()
    assert latest.round == 1 and latest.arrays["w"].tolist() == [1.0, 1.0, 1.0]

    # A round that crashed after its metrics line but before latest.json is redone cleanly.
    with open(run.path / "metrics.jsonl", "a") as handle:
        handle.write('{"round": 2}\n')
    _save(run, 2, 0.8, 1.2)
    assert [line["round"] for line in run.metrics()] == [0, 1, 2]

    run.weights_path(2).write_bytes(b"tampered")
    with pytest.raises(CheckpointError, match="sha256"):
        run.load_latest()


def test_the_packaged_defaults_are_the_flower_apps_run_config(
    app_defaults: dict[str, object],
) -> None:
    """``flwr run`` reads pyproject.toml, an installed fedct its packaged defaults: one table."""
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    assert (
        tomllib.loads(pyproject.read_text(encoding="utf-8"))["tool"]["flwr"]["app"]["config"]
        == app_defaults
    )


def test_settings_from_the_app_defaults_and_bad_values(
    app_defaults: dict[str, object], tmp_path: Path
) -> None:
    config = {**app_defaults, "run-dir": str(tmp_path / "r")}
    settings = ServerSettings.from_run_config(config)
    assert settings.strategy == "fedavg" and settings.min_nodes == 2
    assert (
        settings.model.backbone == "efficientnet_b3" and settings.model.pretrained_weights is None
    )
    train = settings.train_instruction("key", 1, "0123456789abcdef")
    assert train["run-key"] == "key" and train["fedbn"] is False and "lr" in train
    assert train["proximal-mu"] == 0.0  # only FedProx trains with the proximal term
    evaluate = settings.evaluate_instruction("key", 1, "0123456789abcdef")
    assert evaluate["splits"] == "tune,test" and evaluate["tune-histogram-bins"] == 50
    with pytest.raises(SettingsError, match="'batch-size' 5000 is not in \\[1, 4096\\]"):
        ServerSettings.from_run_config({**config, "batch-size": 5000})

    resumed = ServerSettings.from_run_config({**config, "resume-from": str(tmp_path / "old")})
    assert resumed.run_dir == tmp_path / "old"
    with pytest.raises(SettingsError, match="strategy must be one of"):
        ServerSettings.from_run_config({**config, "strategy": "fedsgd"})
    with pytest.raises(SettingsError, match="optimizer must be"):
        ServerSettings.from_run_config({**config, "optimizer": "lion"})
    with pytest.raises(SettingsError, match="min-train-replies cannot exceed"):
        ServerSettings.from_run_config({**config, "min-train-replies": 3})
    with pytest.raises(SettingsError, match="lacks 'seed'"):
        ServerSettings.from_run_config({k: v for k, v in config.items() if k != "seed"})
    lite0 = {**config, "backbone": "tf_efficientnet_lite0", "pretrained-weights": "imagenet"}
    assert ServerSettings.from_run_config(lite0).model.pretrained_weights == "imagenet"
    absent = {**config, "pretrained-weights": str(tmp_path / "b3.pth")}
    with pytest.raises(SettingsError, match=r"pretrained-weights: .*b3\.pth: no such weights file"):
        ServerSettings.from_run_config(absent)
    with pytest.raises(SettingsError, match="dp needs norm"):
        ServerSettings.from_run_config({**config, "dp": True, "class-weighting": "none"})
    frozen_dp = {**config, "dp": True, "class-weighting": "none", "freeze-bn": True}
    assert ServerSettings.from_run_config(frozen_dp).model.freeze_bn
    assert parse_external_caches(f"mosmed={tmp_path}/m, {tmp_path}/other") == {
        "mosmed": tmp_path / "m",
        "other": tmp_path / "other",
    }
