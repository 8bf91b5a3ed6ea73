"""Robust aggregation (server/strategies.py) against a poisoning site: three tiny hospitals
train one round from the same global model, the third sends its update scaled by -10.  FedAvg's
external AUC falls; FedMedian, the trimmed mean, Krum and MultiKrum stay within 0.02 of the
clean FedAvg round.  (bench/secagg.py runs the same on the demo's model.)"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import TINY, write_tiny_cache
from flwr.app import Context, Message, MessageType, MetricRecord, RecordDict
from secagg_grid import LAYOUT, global_state, make_grid, write_sites

import fedct.client.app as hospital
from fedct.client.local import train_site
from fedct.client.site_data import resolve_site
from fedct.common.cache.dataset import CacheDataset
from fedct.common.federation.messages import TrainInstruction
from fedct.common.federation.transport import conform, dtypes_of, to_record
from fedct.common.model.classifier import build_model, load_travelling_state
from fedct.common.training.loop import score_split
from fedct.server.app import main
from fedct.server.settings import ServerSettings
from fedct.server.strategies import ROBUST_STRATEGIES, build_strategy

POISON_SCALE = -10.0


@pytest.fixture(scope="module")
def hospitals(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_sites(tmp_path_factory.mktemp("robust"), ("r1", "r2", "r3"))


@pytest.fixture(scope="module")
def external(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A larger external set (40 scans): an AUC step is 1/400, fine enough for 0.02."""
    return write_tiny_cache(tmp_path_factory.mktemp("ext"), {"test": {0: 20, 2: 20}}, seed=99)


def _strategy(name: str, sites: int) -> Any:
    return build_strategy(
        name,
        fraction_train=1.0,
        min_train_nodes=sites,
        min_available_nodes=sites,
        proximal_mu=0.0,
        server_lr=0.01,
        client_lr=0.01,
        statistics_keys=(),
        malicious_sites=1,
    )


def _auc(state: dict[str, np.ndarray], external: Path) -> float:
    """The external AUC; 0.5 for a model whose outputs are not finite (a poisoned running
    variance turns negative): it ranks nothing."""
    model = build_model(TINY)
    load_travelling_state(model, state, TINY)
    try:
        scores, _ = score_split(model, CacheDataset(external), "ext", batch_size=8, device="cpu")
    except ValueError:  # "probs contain NaN or infinite values"
        return 0.5
    return scores["ext-auc_covid"]


def test_robust_strategies_withstand_one_poisoning_site(
    hospitals: dict[str, Path], external: Path, run_config: dict[str, Any], task_identity: None
) -> None:
    # Five local epochs: each site alone then ranks the external set right (AUC 1.0 here).
    settings = ServerSettings.from_run_config({**run_config, "local-epochs": 5, "lr": 0.003})
    instruction = TrainInstruction.from_record(
        settings.train_instruction("k", 1, LAYOUT.fingerprint)
    )
    start = global_state()
    packed = LAYOUT.pack(start, "float32")
    updates = []
    for cache in hospitals.values():
        arrays, metrics = train_site(
            resolve_site({"data-path": str(cache)}, {}), instruction, packed
        )
        updates.append((LAYOUT.unpack(arrays), metrics))

    def replies(poisoned: bool) -> list[Message]:
        out = []
        for i, (state, metrics) in enumerate(updates):
            if poisoned and i == len(updates) - 1:
                state = {
                    k: start[k] + POISON_SCALE * (v - start[k]) if v.dtype.kind == "f" else v
                    for k, v in state.items()
                }
            content = RecordDict({"arrays": to_record(state), "metrics": metrics})
            out.append(Message(content, dst_node_id=10 + i, message_type=MessageType.TRAIN))
        return out

    dtypes = dtypes_of(to_record(start))

    def aggregated(name: str, poisoned: bool) -> float:
        arrays, _ = _strategy(name, 3).aggregate_train(1, replies(poisoned))
        state = {k: a.numpy() for k, a in conform(arrays, dtypes).items()}
        return _auc(state, external)

    clean = aggregated("fedavg", poisoned=False)
    results = {name: aggregated(name, poisoned=True) for name in ("fedavg", *ROBUST_STRATEGIES)}
    print(
        f"external AUC: clean FedAvg {clean:.3f}; one site's update x {POISON_SCALE:g}: {results}"
    )
    assert clean > 0.8 and results["fedavg"] < clean - 0.1
    for name in ROBUST_STRATEGIES:
        assert abs(results[name] - clean) <= 0.02, name


def test_robust_strategies_run_in_the_round_loop_and_keep_the_local_models(
    hospitals: dict[str, Path], run_config: dict[str, Any], tmp_path: Path, task_identity: None
) -> None:
    """FedMedian takes the arrays out of the replies it aggregates: the round loop gives it
    its own records, so cross-site validation still has every site's own model."""
    config = {**run_config, "num-server-rounds": 1, "strategy": "fedmedian", "cross-site": True}
    config = {**config, "min-train-nodes": 3, "run-dir": str(tmp_path / "median")}
    grid = make_grid(hospital.app, hospitals, config)
    main(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=config))
    matrix = json.loads((tmp_path / "median" / "cross_site.json").read_text())
    assert matrix["models"] == ["global", "r1", "r2", "r3"]
    own = [matrix["auc_covid"][i][i + 1] for i in range(3)]  # each site on its own model
    assert all(value is not None for value in own)


def test_each_strategy_says_when_too_few_sites_replied(
    caplog: pytest.LogCaptureFixture, task_identity: None
) -> None:
    state = global_state()

    def replies() -> list[Message]:  # fresh: FedTrimmedAvg takes the arrays out of its replies
        return [
            Message(
                RecordDict(
                    {
                        "arrays": to_record(state),
                        "metrics": MetricRecord({"num-examples": 8, "train-loss": 1.0}),
                    },
                ),
                dst_node_id=10 + i,
                message_type=MessageType.TRAIN,
            )
            for i in range(3)
        ]

    for name in ("fedtrimmedavg", "krum", "multikrum"):
        arrays, _ = _strategy(name, 3).aggregate_train(1, replies())
        assert arrays is not None
    assert "krum: 3 sites replied; withstanding 1 malicious site(s) needs 5" in caplog.text
    assert "fedtrimmedavg: 3 sites replied" not in caplog.text  # 3 > 2f: enough
