"""Hospital ClientApp functions and the ServerApp over an in-process grid (the real ``flwr run``
simulation of two sites is in tests/test_simulate_console.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Array, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from safetensors.numpy import load_file

import fedct.client.app as hospital
from fedct.client.fedbn import local_bn_path
from fedct.client.local import evaluate_site, model_for, train_site
from fedct.client.site_data import SiteConfigError, resolve_site
from fedct.common.federation.messages import EvaluateInstruction, TrainInstruction
from fedct.common.federation.site_error import fixed_reason
from fedct.common.federation.transport import FLOATING, Layout
from fedct.common.model.classifier import ModelConfig, bn_state_keys, build_model, travelling_state
from fedct.server.app import main
from fedct.server.replies import NodeWaitTimeout
from fedct.server.settings import ServerSettings, SettingsError

TINY = ModelConfig(backbone="test_efficientnet")


def _global_state(seed: int = 0) -> dict[str, np.ndarray]:
    torch.manual_seed(seed)
    return {k: v.numpy() for k, v in travelling_state(build_model(TINY), TINY).items()}


LAYOUT = Layout.of(_global_state())


def _config(run_config: dict[str, Any], *, train: bool, **overrides: Any) -> Any:
    """An instruction as a site parses it from the coordinator's round loop."""
    settings = ServerSettings.from_run_config({**run_config, **overrides})
    if train:
        return TrainInstruction.from_record(settings.train_instruction("k1", 1, LAYOUT.fingerprint))
    record = settings.evaluate_instruction("k1", 1, LAYOUT.fingerprint)
    return EvaluateInstruction.from_record(record)


def _run(grid: Any, run_config: dict[str, Any]) -> None:
    context = Context(
        run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config
    )
    main(grid, context)


def test_site_comes_from_node_config_or_simulation_partition(
    site_caches: dict[str, Path], run_config: dict[str, Any]
) -> None:
    site = resolve_site({"data-path": str(site_caches["site_b"]), "site": "B"}, run_config)
    assert site.name == "B" and site.device == "auto"  # the run config's is for simulation
    assert site.state_dir == site_caches["site_b"] / "fedct-state"
    simulated = resolve_site({"partition-id": 1, "num-partitions": 2}, run_config)
    assert simulated.cache_dir == site_caches["site_b"] and simulated.name == "site_b"
    assert simulated.device == "cpu"
    with pytest.raises(SiteConfigError, match="site-caches lists 2"):
        resolve_site({"partition-id": 2}, run_config)
    with pytest.raises(SiteConfigError, match="lacks data-path"):
        resolve_site({}, run_config)
    with pytest.raises(SiteConfigError, match="no manifest.csv"):
        resolve_site({"data-path": str(site_caches["site_b"] / "scans")}, run_config)


def test_client_train_and_evaluate_on_tiny_caches(
    site_caches: dict[str, Path], run_config: dict[str, Any], tmp_path: Path
) -> None:
    sites = [
        resolve_site({"data-path": str(site_caches[name]), "state-dir": str(tmp_path)}, run_config)
        for name in ("site_a", "site_b")
    ]
    state = _global_state()
    arrays = LAYOUT.pack(state, "float32")
    config = _config(run_config, train=True, **{"transport-dtype": "float16"})
    trained, metrics = train_site(sites[0], config, arrays)
    assert trained[FLOATING].dtype == "float16"
    back = LAYOUT.unpack(trained)
    assert set(back) == set(state)
    assert back["head.weight"].tolist() != state["head.weight"].tolist()
    assert metrics["num-examples"] == 8 and set(metrics) == {
        "num-examples",
        "train-loss",
        "train-accuracy",
        "train-seconds",
    }

    replies = [evaluate_site(site, _config(run_config, train=False), arrays) for site in sites]
    assert set(replies[0]) == set(replies[1])  # or the ServerApp would die
    assert replies[0]["tune-n"] == 4 and replies[0]["test-n"] == 2
    assert replies[0]["num-examples"] == 6 and 0.0 <= replies[0]["tune-auc_covid"] <= 1.0
    assert replies[1]["tune-n"] == 0 and np.isnan(replies[1]["tune-auc_covid"])
    assert np.isnan(replies[1]["tune-loss"]) and replies[1]["test-n"] == 3


def test_fedbn_keeps_the_site_batchnorm_state(
    site_caches: dict[str, Path], run_config: dict[str, Any], tmp_path: Path
) -> None:
    site = resolve_site(
        {"data-path": str(site_caches["site_a"]), "state-dir": str(tmp_path)}, run_config
    )
    arrays = LAYOUT.pack(_global_state(), "float32")
    packed, _ = train_site(site, _config(run_config, train=True, strategy="fedbn"), arrays)
    trained = LAYOUT.unpack(packed)
    stored = load_file(local_bn_path(tmp_path, _config(run_config, train=True).state_name))
    bn_keys = bn_state_keys(build_model(TINY))
    assert set(stored) == bn_keys
    for key in bn_keys:
        np.testing.assert_array_equal(stored[key], trained[key])

    # A new global model arrives: the site scores it with its own BatchNorm state, which
    # differs from the global one, while every other weight is the global one.
    shifted = {
        key: value + 0.5 if value.dtype.kind == "f" else value
        for key, value in _global_state(seed=5).items()
    }
    moved = LAYOUT.pack(shifted, "float32")
    fedbn = evaluate_site(site, _config(run_config, train=False, strategy="fedbn"), moved)
    plain = evaluate_site(site, _config(run_config, train=False), moved)
    assert fedbn["test-loss"] != plain["test-loss"]


def test_min_train_replies_keeps_the_previous_model_when_a_site_fails(
    site_caches: dict[str, Path],
    run_config: dict[str, Any],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    task_identity: None,
    make_grid: Any,
) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    nodes = [
        {"data-path": str(site_caches["site_a"]), "site": "A"},
        {"data-path": str(broken), "site": "C"},
    ]
    config = {**run_config, "num-server-rounds": 1, "min-train-replies": 2}
    _run(make_grid(nodes, config), config)
    run_dir = Path(config["run-dir"])
    card = json.loads((run_dir / "round_001.card.json").read_text())
    assert (
        "only 1 of 2 train replies succeeded, min-train-replies is 2"
        in (card["train"]["kept_previous_model"])
    )
    # The coordinator reads a fixed reason; the site's own log names the missing manifest.
    (failure,) = card["train"]["failures"]
    assert failure["reason"] == "site 'C': " + fixed_reason("site")
    assert "no manifest.csv" in caplog.text and str(broken) not in json.dumps(card)
    assert [p["site"] for p in card["train"]["participants"]] == ["A"]
    before, after = (load_file(run_dir / f"round_00{r}.safetensors") for r in (0, 1))
    assert all(np.array_equal(before[k], after[k]) for k in before)
    line = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()][1]
    assert line["kept_previous_model"] and line["failures"] == 1

    # With one successful reply allowed, the round takes site A's weights.
    config = {**config, "min-train-replies": 1, "run-dir": str(tmp_path / "run2")}
    _run(make_grid(nodes, config), config)
    after = load_file(tmp_path / "run2" / "round_001.safetensors")
    assert not np.array_equal(before["head.weight"], after["head.weight"])


def test_server_run_checkpoints_and_resumes_with_optimiser_state(
    site_caches: dict[str, Path], run_config: dict[str, Any], task_identity: None, make_grid: Any
) -> None:
    nodes = [{"data-path": str(site_caches[s]), "site": s} for s in ("site_a", "site_b")]
    config = {**run_config, "num-server-rounds": 1, "strategy": "fedadam"}
    _run(make_grid(nodes, config), config)
    run_dir = Path(config["run-dir"])
    assert (run_dir / "round_001.strategy.safetensors").exists()
    card = json.loads((run_dir / "round_001.card.json").read_text())
    assert {p["site"]: p["num-examples"] for p in card["train"]["participants"]} == {
        "site_a": 8,
        "site_b": 8,
    }
    assert card["run_config"]["strategy"] == "fedadam" and len(card["sha256"]) == 64
    assert "ext-auc_covid" in card["central_evaluation"]
    assert json.loads((run_dir / "best.json").read_text())["round"] == 1

    resumed = {**config, "num-server-rounds": 2, "resume-from": str(run_dir)}
    grid = make_grid(nodes, resumed)
    _run(grid, resumed)
    assert [
        json.loads(x)["round"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()
    ] == [
        0,
        1,
        2,
    ]
    assert {int(m.content["config"]["server-round"]) for m in grid.sent} == {2}
    recorded = json.loads((run_dir / "run_config.json").read_text())
    assert recorded["first_round"] == 2


def test_too_few_nodes_fail_with_a_clear_error(
    site_caches: dict[str, Path], run_config: dict[str, Any], task_identity: None, make_grid: Any
) -> None:
    config = {**run_config, "node-wait-timeout": 1.0, "num-server-rounds": 1}
    grid = make_grid([{"data-path": str(site_caches["site_a"])}], config)
    with pytest.raises(NodeWaitTimeout, match="only 1 of 2 nodes connected after 1 s"):
        _run(grid, config)


def test_cosine_lr_schedule_decays_over_the_rounds(run_config: dict[str, Any]) -> None:
    constant = ServerSettings.from_run_config({**run_config, "num-server-rounds": 4})
    assert [constant.round_lr(r) for r in (1, 4)] == [0.01, 0.01]
    cosine = ServerSettings.from_run_config(
        {**run_config, "num-server-rounds": 4, "lr-schedule": "cosine"}
    )
    lrs = [cosine.round_lr(r) for r in range(1, 5)]
    assert lrs[0] == pytest.approx(0.01)
    assert lrs[2] == pytest.approx(0.005)
    assert all(a > b > 0 for a, b in zip(lrs, lrs[1:], strict=False))
    assert cosine.train_instruction("k1", 3, LAYOUT.fingerprint)["lr"] == pytest.approx(0.005)
    with pytest.raises(SettingsError, match="lr-schedule"):
        ServerSettings.from_run_config({**run_config, "lr-schedule": "step"})


def test_slice_chunk_travels_in_the_model_config(run_config: dict[str, Any]) -> None:
    """A coordinator sets the slices per backbone pass for every site (a memory/speed knob)."""

    def sent(config: dict[str, Any]) -> ModelConfig:
        record = ServerSettings.from_run_config(config).train_instruction(
            "k1", 1, LAYOUT.fingerprint
        )
        return TrainInstruction.from_record(record).model

    assert sent(run_config).slice_chunk == 16
    assert sent({**run_config, "slice-chunk": 64}).slice_chunk == 64


def test_a_site_sets_its_own_slice_chunk_without_changing_its_scores(
    site_caches: dict[str, Path], run_config: dict[str, Any], tmp_path: Path
) -> None:
    node = {"data-path": str(site_caches["site_a"]), "state-dir": str(tmp_path)}
    plain, small = (resolve_site(n, run_config) for n in (node, {**node, "slice-chunk": "1"}))
    assert (plain.slice_chunk, small.slice_chunk) == (None, 1)
    arrays = LAYOUT.pack(_global_state(), "float32")
    config = _config(run_config, train=False, **{"slice-chunk": 64})
    assert model_for(plain, config, arrays).cfg.slice_chunk == 64
    assert model_for(small, config, arrays).cfg.slice_chunk == 1
    scored = [evaluate_site(site, config, arrays) for site in (plain, small)]
    assert scored[0].keys() == scored[1].keys()
    for key, value in scored[0].items():
        assert scored[1][key] == pytest.approx(value, rel=1e-4, abs=1e-6, nan_ok=True), key
    with pytest.raises(SiteConfigError, match="slice-chunk must be a whole number"):
        resolve_site({**node, "slice-chunk": "0"}, run_config)


def test_a_reply_that_does_not_unpack_counts_as_a_failure(
    site_caches: dict[str, Path],
    run_config: dict[str, Any],
    task_identity: None,
    make_grid: Any,
) -> None:
    def train(message: Message, context: Context) -> Message:
        reply = hospital.train(message, context)
        if context.node_config["site"] == "B":
            floating = reply.content["arrays"][FLOATING].numpy()
            reply.content["arrays"][FLOATING] = Array(floating[:-1])
        return reply

    unguarded = ClientApp()  # a site without the egress guard (an old or altered install)
    unguarded.train()(train)
    unguarded.evaluate()(hospital.evaluate)
    nodes = [
        {"data-path": str(site_caches["site_a"]), "site": "A"},
        {"data-path": str(site_caches["site_b"]), "site": "B"},
    ]
    config = {**run_config, "num-server-rounds": 1, "min-train-replies": 1, "cross-site": False}
    grid = make_grid(nodes, config)
    grid.app = unguarded
    _run(grid, config)
    card = json.loads((Path(config["run-dir"]) / "round_001.card.json").read_text())
    assert [p["site"] for p in card["train"]["participants"]] == ["A"]
    (failure,) = card["train"]["failures"]
    assert "do not fit the model" in failure["reason"]
