"""Secure aggregation in fedct's round loop (the ServerApp over an in-process grid of three tiny
sites): it trains as plain FedAvg within the quantisation error, the coordinator's copy of a
site's masked input says nothing about that site's weights, dropouts after key sharing are
recovered and too many keep the global model, FedBN, FedAdam and DP compose, and what needs
one site's model is refused."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Context, RecordDict
from safetensors.numpy import load_file
from scipy.stats import chisquare
from secagg_grid import LAYOUT, make_grid, write_sites

import fedct.client.app as hospital
from fedct.common.federation import secagg
from fedct.common.federation.messages import MASKED_ARRAY, MASKED_RECORD, TrainInstruction
from fedct.common.federation.secure_vector import VectorSpec
from fedct.common.model.classifier import bn_state_keys, build_model
from fedct.server.app import main
from fedct.server.settings import ServerSettings, SettingsError
from fedct.server.strategies import ROBUST_STRATEGIES


@pytest.fixture(scope="module")
def caches(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_sites(tmp_path_factory.mktemp("federation"), ("h1", "h2", "h3"))


@pytest.fixture
def config(run_config: dict[str, Any], tmp_path: Path) -> dict[str, Any]:
    return {
        **run_config,
        "num-server-rounds": 1,
        "cross-site": False,
        "min-train-nodes": 3,
        "min-available-nodes": 3,
        # The grid answers as a message is pushed: a live site is never late.
        "secagg-stage-timeout": 1.0,
        "round-timeout": 1.0,
        "run-dir": str(tmp_path / "secure"),
        "secure-aggregation": True,
    }


def _run(grid: Any, config: dict[str, Any]) -> Path:
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=config)
    main(grid, context)
    return Path(config["run-dir"])


def _card(run_dir: Path, server_round: int) -> dict[str, Any]:
    return json.loads((run_dir / f"round_{server_round:03d}.card.json").read_text())


def test_secure_aggregation_trains_as_fedavg_and_shows_no_sites_weights(
    caches: dict[str, Path], config: dict[str, Any], tmp_path: Path, task_identity: None
) -> None:
    plain_config = {**config, "secure-aggregation": False, "run-dir": str(tmp_path / "plain")}
    plain_grid = make_grid(hospital.app, caches, plain_config)
    plain = _run(plain_grid, plain_config)
    secure_grid = make_grid(hospital.app, caches, config)
    secure = _run(secure_grid, config)

    card = _card(secure, 1)
    summary = card["train"]["secure_aggregation"]
    bound = summary["quantisation_bound"]
    print(f"quantisation bound per weight, 3 sites of 6 scans: {bound:.3g}")
    assert summary["survivors"] == 3 and summary["failed"] is None and bound < 1e-6
    assert card["train"]["sites"]["trained"] == ["h1", "h2", "h3"]
    before, expected, found = (
        load_file(d / f"round_00{r}.safetensors") for d, r in ((plain, 0), (plain, 1), (secure, 1))
    )
    for key, value in expected.items():
        ulp = np.spacing(np.abs(value).astype(np.float32)) if value.dtype.kind == "f" else 0
        assert np.all(np.abs(found[key].astype(float) - value) <= bound + 2 * ulp), key
    auc = [_card(d, 1)["central_evaluation"]["ext-auc_covid"] for d in (plain, secure)]
    assert abs(auc[0] - auc[1]) <= 0.005
    plain_train = _card(plain, 1)
    assert card["train"]["participants"][0]["num-examples"] is None  # only the sum is known
    totals = plain_train["federated_evaluation"]["aggregated"]
    assert card["federated_evaluation"]["aggregated"]["tune-n"] == totals["tune-n"]
    assert card["federated_evaluation"]["sites"] == []
    assert card["operating_point"] == plain_train["operating_point"]

    # What the coordinator holds of site h1's masked input against h1's real update.
    settings = ServerSettings.from_run_config(config)
    instruction = TrainInstruction.from_record(settings.train_instruction("k", 1, "0" * 16))
    spec = VectorSpec.for_instruction(instruction, LAYOUT)
    masked = next(
        r.content[MASKED_RECORD][MASKED_ARRAY].numpy()
        for r in secure_grid.replies_seen
        if r.metadata.message_type == "train.secagg_masked" and r.metadata.src_node_id == 10
    )[: spec.weights_size]
    trained = next(  # the round loop unpacked it in place
        {name: array.numpy() for name, array in r.content["arrays"].items()}
        for r in plain_grid.replies_seen
        if r.metadata.message_type == "train" and r.metadata.src_node_id == 10
    )
    update = np.concatenate(
        [(trained[name] - before[name]).astype(float).ravel() for name, _ in spec.weights]
    )
    stored = masked.astype(np.float64) / 2.0**64
    correlation = np.corrcoef(stored, update)[0, 1]
    uniform = chisquare(np.bincount(masked >> np.uint64(60), minlength=16)).pvalue
    unmasked = secagg.quantize(6 * update, np.random.default_rng(0))
    plain_test = chisquare(np.bincount(unmasked >> np.uint64(60), minlength=16)).pvalue
    print(
        f"masked input: correlation with h1's update {correlation:.4f}, uniform p = {uniform:.3f}"
    )
    assert abs(correlation) < 0.02 and uniform > 1e-3 and plain_test < 1e-12


def test_dropouts_are_recovered_too_many_keep_the_model_and_fedbn_keeps_its_layers(
    caches: dict[str, Path], config: dict[str, Any], task_identity: None
) -> None:
    config = {**config, "num-server-rounds": 2, "strategy": "fedbn"}
    grid = make_grid(hospital.app, caches, config)
    grid.drop_at[("train.secagg_masked", 1)] = {12}  # h3 dies after sharing its keys
    grid.drop_at[("train.secagg_masked", 2)] = {11}  # then h2: one survivor of three
    run_dir = _run(grid, config)

    first, second = _card(run_dir, 1), _card(run_dir, 2)
    summary = first["train"]["secure_aggregation"]
    assert (summary["survivors"], summary["recovered_dropouts"]) == (2, 1)
    assert first["train"]["sites"]["trained"] == ["h1", "h2"]
    assert first["train"]["kept_previous_model"] is None
    assert any("secure aggregation masked" in f["reason"] for f in first["train"]["failures"])
    assert second["train"]["kept_previous_model"] == (
        "secure aggregation failed: 1 of 3 sites sent their masked input, 2 needed: "
        "keeping the previous global model"
    )
    states = [load_file(run_dir / f"round_00{r}.safetensors") for r in range(3)]
    assert all(np.array_equal(states[1][k], states[2][k]) for k in states[1])
    # FedBN: the sites' BatchNorm entries stayed out of the sum; the rest moved.
    batchnorm = bn_state_keys(build_model(ServerSettings.from_run_config(config).model))
    assert all(np.array_equal(states[0][k], states[1][k]) for k in batchnorm)
    assert not np.array_equal(states[0]["head.weight"], states[1]["head.weight"])


def test_fedadam_and_patient_level_dp_work_on_the_sum(
    caches: dict[str, Path], config: dict[str, Any], task_identity: None
) -> None:
    config = {
        **config,
        "strategy": "fedadam",
        "dp": True,
        "freeze-bn": True,
        "class-weighting": "none",
    }
    run_dir = _run(make_grid(hospital.app, caches, config), config)
    card = _card(run_dir, 1)
    aggregated = card["train"]["aggregated"]
    assert aggregated["num-examples"] == 18 and aggregated["train-loss"] is None  # NaN: DP
    assert 0 < aggregated["dp-epsilon"] < 100 and aggregated["dp-delta"] > 0
    assert (run_dir / "round_001.strategy.safetensors").exists()


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        *(({"strategy": name}, f"strategy {name} compares") for name in ROBUST_STRATEGIES),
        ({"cross-site": True}, "cross-site validation scores each site's own model"),
        ({"min-train-nodes": 2}, "secure-aggregation needs min-train-nodes >= 3"),
        ({"secagg-threshold": 0.5}, "secagg-threshold must be in (0.5, 1]"),
    ],
)
def test_what_needs_one_sites_model_is_refused_in_one_line(
    config: dict[str, Any], overrides: dict[str, Any], words: str
) -> None:
    with pytest.raises(SettingsError, match="invalid run config") as refused:
        ServerSettings.from_run_config({**config, **overrides})
    assert words in str(refused.value) and "\n" not in str(refused.value)
