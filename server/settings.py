"""The coordinator's settings, read from the run config (``[tool.flwr.app.config]``).

Every key has its default in server/flower_app.toml (and the same in pyproject.toml, which
``flwr run .`` reads); Flower merges ``--run-config`` overrides into
those, so a missing key means the app's pyproject.toml is older than this code.  Relative
paths are resolved against the working directory of the ServerApp process.
"""

from __future__ import annotations

import math
import time
import tomllib
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, UserConfig

from fedct.common.cache.scan_index import verify_cache
from fedct.common.cache.store import CacheError
from fedct.common.federation.messages import MAX_BINS, EvaluateInstruction, TrainInstruction
from fedct.common.federation.secagg import MAX_SITES
from fedct.common.federation.site_error import SchemaError
from fedct.common.federation.transport import TRANSPORT_DTYPES
from fedct.common.metrics.pooled_operating_point import HIST_RULES
from fedct.common.model.classifier import ModelConfig
from fedct.common.model.weights import WeightsError, check_weights_available, weights_spec
from fedct.common.training.loop import TrainConfig
from fedct.common.training.privacy import DPSettings
from fedct.server.strategies import ROBUST_STRATEGIES, STRATEGIES

FLOWER_APP_FILE = "flower_app.toml"
LR_SCHEDULES = ("constant", "cosine")


def flower_app_text() -> str:
    """The installed package's ``[tool.flwr.app]`` table (server/flower_app.toml), as TOML."""
    return resources.files(__package__).joinpath(FLOWER_APP_FILE).read_text(encoding="utf-8")


def flower_app() -> dict[str, Any]:
    """The ``[tool.flwr.app]`` table: publisher, components and run-config defaults."""
    return dict(tomllib.loads(flower_app_text())["tool"]["flwr"]["app"])


def app_defaults() -> dict[str, Any]:
    """The run-config defaults of the installed package (pyproject.toml's
    ``[tool.flwr.app.config]`` holds the same, for ``flwr run .``)."""
    return dict(flower_app()["config"])


class SettingsError(ValueError):
    """The run config is incomplete or holds an invalid value."""


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "true or false"
    if isinstance(value, int):
        return "a whole number"
    return "a number" if isinstance(value, float) else "a string"


def check_types(run_config: UserConfig, defaults: dict[str, Any]) -> None:
    """Refuse a run-config value of another type than its default's (``lr = "abc"``),
    naming the key; an int is taken where a float is expected."""
    for key, default in defaults.items():
        if key not in run_config:
            continue
        value = run_config[key]
        fits = (
            isinstance(value, bool)
            if isinstance(default, bool)
            else not isinstance(value, bool)
            and isinstance(value, (int, float) if isinstance(default, float) else type(default))
        )
        if not fits:
            raise SettingsError(
                f"run config: {key} = {value!r} must be {_kind(default)} (default {default!r})"
            )


def _get(run_config: UserConfig, key: str) -> Any:
    try:
        return run_config[key]
    except KeyError as exc:
        raise SettingsError(
            f"run config lacks {key!r}: is [tool.flwr.app.config] in pyproject.toml up to date?"
        ) from exc


def _path(text: str) -> Path:
    return Path(text).expanduser().resolve()


def parse_external_caches(text: str) -> dict[str, Path]:
    """``"name=path, path2"`` → {name: path}; an entry without a name is named after its folder."""
    caches: dict[str, Path] = {}
    for entry in (part.strip() for part in text.split(",")):
        if not entry:
            continue
        name, sep, path = entry.partition("=")
        if not sep:
            name, path = Path(entry).name, entry
        name = name.strip()
        if not name or name in caches:
            raise SettingsError(f"external-caches: empty or repeated name in {entry!r}")
        caches[name] = _path(path.strip())
    return caches


@dataclass(frozen=True)
class ServerSettings:
    num_rounds: int
    strategy: str
    fraction_train: float
    min_train_nodes: int
    min_train_replies: int
    min_available_nodes: int
    node_wait_timeout: float
    round_timeout: float
    training: TrainConfig
    server_lr: float
    model: ModelConfig
    transport_dtype: str
    external_caches: dict[str, Path]
    run_dir: Path
    resume_from: Path | None
    best_metric: str
    seed: int
    device: str
    operating_point_rule: str
    operating_point_min_specificity: float
    operating_point_bins: int
    cross_site: bool
    cross_site_local_models: bool
    privacy: DPSettings
    train_max_slices: int
    lr_schedule: str
    straggler_factor: float
    superlink_grace: float
    secure_aggregation: bool = False
    secagg_degree: int = 20
    secagg_threshold: float = 0.66
    secagg_stage_timeout: float = 300.0
    malicious_sites: int = 1

    @classmethod
    def from_run_config(cls, run_config: UserConfig) -> ServerSettings:
        """Parse and check the run config; raises :class:`SettingsError`."""

        def get(key: str) -> Any:
            return _get(run_config, key)

        check_types(run_config, app_defaults())
        try:
            if int(get("slice-chunk")) < 1:
                raise ValueError("slice-chunk must be at least 1 (slices per backbone pass)")
            model = ModelConfig.from_config(
                run_config, pretrained_weights=weights_spec(str(get("pretrained-weights")))
            )
            check_weights_available(model.backbone, model.pretrained_weights)
            # Checked here, so that a typo stops the run instead of failing at every site.
            # Flower's FedProx sends proximal-mu; every other strategy trains without the term.
            fedprox = str(get("strategy")).strip().lower() == "fedprox"
            mu = float(get("proximal-mu")) if fedprox else 0.0
            training = TrainConfig.from_config(run_config, proximal_mu=mu)
            privacy = DPSettings.from_config(run_config)
        except WeightsError as exc:
            raise SettingsError(f"pretrained-weights: {exc}") from exc
        except ValueError as exc:
            raise SettingsError(f"invalid run config: {exc}") from exc
        resume = str(get("resume-from")).strip()
        run_dir = str(get("run-dir")).strip() or f"runs/{time.strftime('%Y%m%d-%H%M%S')}"
        settings = cls(
            num_rounds=int(get("num-server-rounds")),
            strategy=str(get("strategy")).strip().lower(),
            fraction_train=float(get("fraction-train")),
            min_train_nodes=int(get("min-train-nodes")),
            min_train_replies=int(get("min-train-replies")),
            min_available_nodes=int(get("min-available-nodes")),
            node_wait_timeout=float(get("node-wait-timeout")),
            round_timeout=float(get("round-timeout")),
            training=training,
            server_lr=float(get("server-lr")),
            model=model,
            transport_dtype=str(get("transport-dtype")),
            external_caches=parse_external_caches(str(get("external-caches"))),
            run_dir=_path(resume or run_dir),
            resume_from=_path(resume) if resume else None,
            best_metric=str(get("best-metric")).strip(),
            seed=int(get("seed")),
            device=str(get("device")),
            operating_point_rule=str(get("operating-point-rule")).strip(),
            operating_point_min_specificity=float(get("operating-point-min-specificity")),
            operating_point_bins=int(get("operating-point-bins")),
            cross_site=bool(get("cross-site")),
            cross_site_local_models=bool(get("cross-site-local-models")),
            privacy=privacy,
            train_max_slices=int(get("train-max-slices")),
            lr_schedule=str(get("lr-schedule")).strip().lower(),
            straggler_factor=float(get("straggler-factor")),
            superlink_grace=float(get("superlink-grace")),
            secure_aggregation=bool(get("secure-aggregation")),
            secagg_degree=int(get("secagg-degree")),
            secagg_threshold=float(get("secagg-threshold")),
            secagg_stage_timeout=float(get("secagg-stage-timeout")),
            malicious_sites=int(get("malicious-sites")),
        )
        settings.check()
        settings.check_instructions()
        for cache in settings.external_caches.values():
            try:
                verify_cache(cache, run_config)
            except CacheError as exc:
                raise SettingsError(f"external cache: {exc}") from exc
        return settings

    def check(self) -> None:
        problems = []
        if self.strategy not in STRATEGIES:
            problems.append(f"strategy must be one of {', '.join(STRATEGIES)}")
        if self.transport_dtype not in TRANSPORT_DTYPES:
            problems.append(f"transport-dtype must be one of {', '.join(TRANSPORT_DTYPES)}")
        if self.num_rounds < 1:
            problems.append("num-server-rounds must be at least 1")
        if not 0.0 < self.fraction_train <= 1.0:
            problems.append("fraction-train must be in (0, 1]")
        if min(self.min_train_nodes, self.min_train_replies, self.min_available_nodes) < 1:
            problems.append("min-train-nodes, min-train-replies, min-available-nodes must be >= 1")
        if self.min_train_replies > self.min_train_nodes:
            problems.append("min-train-replies cannot exceed min-train-nodes")
        if self.node_wait_timeout <= 0 or self.round_timeout <= 0:
            problems.append("node-wait-timeout and round-timeout must be positive")
        if self.strategy == "fedprox" and self.training.proximal_mu <= 0:
            problems.append("fedprox needs a positive proximal-mu")
        if self.privacy.enabled and self.training.class_weighting != "none":
            problems.append("dp needs class-weighting = none (balanced weights use every patient)")
        if self.privacy.enabled and not self.model.batchnorm_frozen_or_absent:
            problems.append(
                'dp needs norm = "group", freeze-bn = true or freeze-backbone = true (BatchNorm '
                "in training mode mixes patients in a batch)"
            )
        if self.lr_schedule not in LR_SCHEDULES:
            problems.append(f"lr-schedule must be one of {', '.join(LR_SCHEDULES)}")
        if self.train_max_slices < 0:
            problems.append("train-max-slices must be >= 0 (0 = every selected slice)")
        if self.operating_point_rule not in HIST_RULES:
            problems.append(f"operating-point-rule must be one of {', '.join(HIST_RULES)}")
        if not 1 <= self.operating_point_bins <= MAX_BINS:
            problems.append(f"operating-point-bins must be in [1, {MAX_BINS}]")
        if not 0.0 <= self.operating_point_min_specificity <= 1.0:
            problems.append("operating-point-min-specificity must be in [0, 1]")
        if not (self.straggler_factor == 0 or self.straggler_factor >= 1):
            problems.append("straggler-factor must be 0 (off) or at least 1")
        if self.superlink_grace <= 0:
            problems.append("superlink-grace must be positive")
        if not 0 <= self.secagg_degree <= MAX_SITES - 1:
            problems.append(f"secagg-degree must be in [0, {MAX_SITES - 1}] (0: every other site)")
        if not 0.5 < self.secagg_threshold <= 1:
            problems.append("secagg-threshold must be in (0.5, 1]")
        if self.secagg_stage_timeout <= 0:
            problems.append("secagg-stage-timeout must be positive")
        if self.malicious_sites < 0:
            problems.append("malicious-sites must be >= 0")
        problems += self._secure_aggregation_conflicts()
        if problems:
            raise SettingsError("invalid run config: " + "; ".join(problems))

    def _secure_aggregation_conflicts(self) -> list[str]:
        """What secure aggregation cannot run with: whatever needs one site's model or
        metrics, and federations where the sum would show one site's update."""
        if not self.secure_aggregation:
            return []
        problems = []
        if self.strategy in ROBUST_STRATEGIES:
            problems.append(
                f"strategy {self.strategy} compares the sites' updates, which "
                "secure-aggregation hides from the coordinator: use fedavg, fedprox, fedadam "
                "or fedbn, or secure-aggregation = false"
            )
        if self.cross_site:
            problems.append(
                "cross-site validation scores each site's own model and reports each site's "
                "metrics, which secure-aggregation hides: set cross-site = false"
            )
        if self.min_train_nodes < 3:
            problems.append(
                "secure-aggregation needs min-train-nodes >= 3 (of two sites, each reads the "
                "other's update off the next global model)"
            )
        return problems

    @property
    def min_nodes(self) -> int:
        """Nodes that must be connected before a round starts."""
        return max(self.min_available_nodes, self.min_train_nodes)

    def _common(self, run_key: str, server_round: int, layout: str) -> dict[str, Any]:
        """The fields of every instruction (common/federation/messages.py)."""
        return {
            "server_round": server_round,
            "run_key": run_key,
            "seed": self.seed,
            "layout": layout,
            "transport_dtype": self.transport_dtype,
            "fedbn": self.strategy == "fedbn",
            "batch_size": self.training.batch_size,
            "model": self.model.without_weights(),
        }

    def round_lr(self, server_round: int) -> float:
        """The sites' learning rate in ``server_round`` (1-based): ``lr`` throughout, or with
        ``lr-schedule = "cosine"`` decayed from ``lr`` in round 1 along half a cosine over
        ``num-server-rounds`` (a resumed run continues the same curve)."""
        if self.lr_schedule == "constant":
            return self.training.lr
        progress = (server_round - 1) / self.num_rounds
        return self.training.lr * 0.5 * (1.0 + math.cos(math.pi * progress))

    def train_instruction(self, run_key: str, server_round: int, layout: str) -> ConfigRecord:
        """The config of every train message of ``server_round``.  ``run_key`` names the
        run's state at a site (FedBN, the DP ledger), ``layout`` is the packed weights'
        fingerprint (common/federation/transport.py)."""
        return TrainInstruction(
            **self._common(run_key, server_round, layout),
            training=replace(self.training, lr=self.round_lr(server_round)),
            train_max_slices=self.train_max_slices,
            privacy=self.privacy,
        ).to_record()

    def evaluate_instruction(self, run_key: str, server_round: int, layout: str) -> ConfigRecord:
        """The config of every evaluate message: the sites report on their tune and test
        splits, and send the histograms of their tune scores for the operating point."""
        return EvaluateInstruction(
            **self._common(run_key, server_round, layout),
            splits=("tune", "test"),
            histogram_bins=self.operating_point_bins,
        ).to_record()

    def cross_site_instruction(
        self, run_key: str, layout: str, *, global_model: bool
    ) -> ConfigRecord:
        """The config of a cross-site evaluate message: the test split only, after the last
        round.  A site's own model is scored as it is, BatchNorm included, wherever it goes;
        the global model as in every round (under FedBN with each site's BatchNorm)."""
        common = self._common(run_key, self.num_rounds, layout)
        common["fedbn"] = common["fedbn"] and global_model
        return EvaluateInstruction(**common, splits=("test",)).to_record()

    def check_instructions(self) -> None:
        """SettingsError for a run config whose messages the sites' schema would refuse
        (a value beyond the protocol's bounds, say ``batch-size = 10000``)."""
        try:
            self.train_instruction("check", 1, "0" * 16)
            self.evaluate_instruction("check", 1, "0" * 16)
        except SchemaError as exc:
            raise SettingsError(f"invalid run config: {exc}") from None
