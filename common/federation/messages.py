"""Every instruction the coordinator sends a site, and the reply each one allows: the schema.

The coordinator builds its train and evaluate messages from :class:`TrainInstruction` and
:class:`EvaluateInstruction` (``to_record``); a site parses what arrives with ``from_message``
before it touches anything, and its egress guard (client/egress.py) holds the reply to
:func:`reply_rules` of the instruction it answers.  A site treats every message as hostile
input: the message proposes, the site's policy (client/site_policy.py) decides.

A message holds exactly two records: ``arrays`` (the packed weights,
common/federation/transport.py) and ``config``, whose keys are exactly its instruction's.  An
unknown or missing key, a value of another type, a number that is not finite or lies outside
its bounds, a string that is not one of its choices: each is refused with a
:class:`~fedct.common.federation.site_error.SchemaError` naming the key.  The bounds here are
the protocol's sanity limits; the tighter limits a site accepts are its own policy.

What the keys mean (docs/federated.md has the run-config keys they come from):

* every message: ``server-round``, ``run-key`` (names the run's state at the site, only ever
  through :attr:`Instruction.state_name`, a hash), ``seed``, ``layout`` (the packed weights'
  fingerprint), ``transport-dtype``, ``fedbn``, ``batch-size`` and the model keys of
  :data:`fedct.common.model.classifier.CONFIG_KEYS`.  No key names a file: the starting
  weights of a frozen backbone are the site's own (its node config), never the message's;
* train: the optimisation keys of :data:`fedct.common.training.loop.CONFIG_KEYS`,
  ``proximal-mu`` (Flower's FedProx sets it; 0 otherwise), ``train-max-slices`` and the DP
  keys of :data:`fedct.common.training.privacy.CONFIG_KEYS`;
* evaluate: ``splits`` (``tune`` and/or ``test``) and, to ask for the operating point's score
  histograms, ``tune-histogram-bins``;
* secure aggregation (:class:`SecAggStage`, at the end of this module): four stages per phase,
  message types ``train.secagg_*`` and ``evaluate.secagg_*``, each with its own keys and the
  reply it allows (``reply_problems``); the masked-input stage carries a train or evaluate
  instruction as above plus the sealed shares forwarded to the site.
"""

from __future__ import annotations

import hashlib
import math
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Self

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType

from fedct.common.config_keys import fits, kind_text
from fedct.common.federation.secagg import (
    CIPHERTEXT_BYTES,
    KEY_BYTES,
    MAX_SITES,
    PHASES,
    SHARE_BYTES,
    instance_id,
    valid_degree,
)
from fedct.common.federation.site_error import SchemaError, number
from fedct.common.federation.transport import LAYOUT_KEY, TRANSPORT_DTYPES
from fedct.common.metrics.classification import SUMMARY_KEYS
from fedct.common.model.classifier import ModelConfig
from fedct.common.training.accounting import ACCOUNTANTS
from fedct.common.training.loop import AT_HALF, RATES, TrainConfig
from fedct.common.training.privacy import DPSettings

ARRAYS_RECORD = "arrays"
CONFIG_RECORD = "config"
METRICS_RECORD = "metrics"
SITE_RECORD = "site"
SITE_KEY = "name"
SPLITS = ("tune", "test")
# The evaluate key by which the coordinator asks for score histograms of this many bins, and
# the metric keys of a site's reply (common/metrics/pooled_operating_point.py).
BINS_KEY = "tune-histogram-bins"
COVID_KEY = "tune-hist-covid"
OTHER_KEY = "tune-hist-other"
HISTOGRAM_KEYS = (COVID_KEY, OTHER_KEY)
WEIGHT_KEY = "num-examples"
TRAIN_METRICS = (WEIGHT_KEY, "train-loss", "train-accuracy", "train-seconds")
DP_METRICS = ("dp-epsilon", "dp-delta")
INTERVAL_KEYS = ("auc_covid_low", "auc_covid_high")
# A site scores its splits before the federated operating point is chosen, so its rates are at
# 0.5 and named so (score_split's ``sens_covid_at_0.5``, ``spec_covid_at_0.5``).
SPLIT_METRICS = (
    *(f"{key}{AT_HALF}" if key in RATES else key for key in SUMMARY_KEYS),
    "loss",
    *INTERVAL_KEYS,
)
MAX_ROUNDS = 100_000
MAX_BINS = 100_000
_RUN_KEY = re.compile(r"[A-Za-z0-9._-]{1,128}")
_LAYOUT = re.compile(r"[0-9a-f]{16}")
_BACKBONE = re.compile(r"[a-z0-9_.]{1,64}")
_SHOWN_KEY = re.compile(r"[A-Za-z0-9_.-]{1,40}")


@dataclass(frozen=True)
class Key:
    """One config key of the schema: its type, and a check of its value with the words that
    say what the check wants."""

    kind: type
    check: Callable[[Any], bool] = lambda value: True
    wants: str = ""
    kind_words: str = ""  # how a reason names ``kind`` where kind_text has no words for it


def _range(kind: type, low: float, high: float, *, open_low: bool = False) -> Key:
    def check(value: Any) -> bool:
        return (low < value if open_low else low <= value) and value <= high

    return Key(kind, check, f"in {'(' if open_low else '['}{number(low)}, {number(high)}]")


def _choice(*options: str) -> Key:
    return Key(str, lambda value: value in options, f"one of {', '.join(options)}")


def _pattern(pattern: re.Pattern[str], wants: str) -> Key:
    return Key(str, lambda value: pattern.fullmatch(value) is not None, wants)


def _splits_ok(value: str) -> bool:
    parts = value.split(",")
    return 0 < len(parts) == len(set(parts)) and set(parts) <= set(SPLITS)


COMMON_KEYS: dict[str, Key] = {
    "server-round": _range(int, 1, MAX_ROUNDS),
    "run-key": _pattern(_RUN_KEY, "1 to 128 letters, digits, '.', '_' or '-'"),
    "seed": _range(int, 0, 2**63 - 1),
    LAYOUT_KEY: _pattern(_LAYOUT, "16 hexadecimal digits"),
    "transport-dtype": _choice(*TRANSPORT_DTYPES),
    "fedbn": Key(bool),
    "batch-size": _range(int, 1, 4096),
    "backbone": _pattern(_BACKBONE, "a timm model name"),
    "pool": _choice("mean", "max"),
    "norm": _choice("batch", "group"),
    "freeze-backbone": Key(bool),
    "freeze-bn": Key(bool),
    "dropout": Key(float, lambda value: 0 <= value < 1, "in [0, 1)"),
    "slice-chunk": _range(int, 1, 4096),
}
TRAIN_KEYS: dict[str, Key] = {
    **COMMON_KEYS,
    "local-epochs": _range(int, 1, 1000),
    "lr": _range(float, 0, 10, open_low=True),
    "optimizer": _choice("adamw", "sgd"),
    "weight-decay": _range(float, 0, 10),
    "class-weighting": _choice("balanced", "none"),
    "proximal-mu": _range(float, 0, 1e6),
    "train-max-slices": _range(int, 0, 100_000),
    "dp": Key(bool),
    "dp-noise-multiplier": _range(float, 0, 1e6, open_low=True),
    "dp-target-epsilon": _range(float, 0, 1e6),
    "dp-max-grad-norm": _range(float, 0, 1e6, open_low=True),
    "dp-delta": Key(float, lambda value: 0 <= value < 1, "in [0, 1)"),
    "dp-sample-rate": _range(float, 0, 1),
    "dp-accountant": _choice(*ACCOUNTANTS),
    "num-server-rounds": _range(int, 1, MAX_ROUNDS),
}
EVALUATE_KEYS: dict[str, Key] = {
    **COMMON_KEYS,
    "splits": Key(str, _splits_ok, f"a comma-separated subset of {', '.join(SPLITS)}"),
}
OPTIONAL_EVALUATE_KEYS: dict[str, Key] = {BINS_KEY: _range(int, 1, MAX_BINS)}


def _shown(key: str) -> str:
    """A key name the coordinator chose, as a reason may show it."""
    return repr(key) if _SHOWN_KEY.fullmatch(key) else "(a key with other characters)"


def read_config(
    config: Mapping[str, Any], keys: Mapping[str, Key], optional: Mapping[str, Key] | None = None
) -> dict[str, Any]:
    """The values of ``config``, checked against ``keys`` (all required) and ``optional``:
    exactly those keys, each of its type and within its bounds; SchemaError otherwise."""
    optional = optional or {}
    if unknown := sorted(set(config) - set(keys) - set(optional)):
        raise SchemaError(f"unknown key {_shown(unknown[0])}")
    if missing := sorted(set(keys) - set(config)):
        raise SchemaError(f"missing key {missing[0]!r}")
    values = {}
    for key in sorted(config):
        spec = keys.get(key) or optional[key]
        value = config[key]
        if not fits(value, spec.kind):
            raise SchemaError(f"{key!r} must be {spec.kind_words or kind_text(spec.kind)}")
        if not spec.check(value):
            shown = f" {number(value)}" if spec.kind in (int, float) else ""
            raise SchemaError(f"{key!r}{shown} is not {spec.wants}")
        values[key] = spec.kind(value)
    return values


def _records(message: Message) -> tuple[ArrayRecord, ConfigRecord]:
    content = message.content
    kinds = {name: type(record).__name__ for name, record in content.items()}
    wanted = {ARRAYS_RECORD: "ArrayRecord", CONFIG_RECORD: "ConfigRecord"}
    if kinds != wanted:
        raise SchemaError("a message holds exactly an ArrayRecord 'arrays' and a ConfigRecord")
    return content.array_records[ARRAYS_RECORD], content.config_records[CONFIG_RECORD]


def _built(build: Callable[[], Any]) -> Any:
    """The dataclass ``build`` makes from checked values; a combination its own checks refuse
    becomes a SchemaError (their text names keys and the coordinator's own values)."""
    try:
        return build()
    except ValueError as exc:
        raise SchemaError(f"keys that do not fit together: {exc}"[:200]) from None


@dataclass(frozen=True)
class Instruction(ABC):
    """What every message carries; its subclasses add their type's keys."""

    message_type: ClassVar[str]
    keys: ClassVar[Mapping[str, Key]]

    server_round: int
    run_key: str
    seed: int
    layout: str
    transport_dtype: str
    fedbn: bool
    batch_size: int
    model: ModelConfig

    @property
    def state_name(self) -> str:
        """The name of this run's state at a site (FedBN entries, the DP ledger's entry): a
        hash of the run key, so no message chooses a file name."""
        return hashlib.sha256(self.run_key.encode()).hexdigest()[:32]

    def _common(self) -> dict[str, Any]:
        return {
            "server-round": self.server_round,
            "run-key": self.run_key,
            "seed": self.seed,
            LAYOUT_KEY: self.layout,
            "transport-dtype": self.transport_dtype,
            "fedbn": self.fedbn,
            "batch-size": self.batch_size,
            **self.model.to_config(),
        }

    @classmethod
    def _common_fields(cls, values: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "server_round": values["server-round"],
            "run_key": values["run-key"],
            "seed": values["seed"],
            "layout": values[LAYOUT_KEY],
            "transport_dtype": values["transport-dtype"],
            "fedbn": values["fedbn"],
            "batch_size": values["batch-size"],
            "model": _built(lambda: ModelConfig.from_config(values)),
        }

    def to_record(self) -> ConfigRecord:
        """The message's config record; checked against the schema, so the coordinator
        cannot send what a site would refuse for its form."""
        record = ConfigRecord(self.to_config())
        read_config(record, self.keys, OPTIONAL_EVALUATE_KEYS)
        return record

    @abstractmethod
    def to_config(self) -> dict[str, Any]:
        """The message's config keys and values."""

    @classmethod
    @abstractmethod
    def from_record(cls, config: ConfigRecord) -> Instruction:
        """The instruction of a message's config; SchemaError if it breaks the schema."""

    @classmethod
    def from_message(cls, message: Message) -> tuple[Self, ArrayRecord]:
        """The instruction and weights of a message of this type; SchemaError if it breaks
        the schema."""
        if message.metadata.message_type != cls.message_type:
            raise SchemaError(f"a {cls.message_type} handler got another message type")
        arrays, config = _records(message)
        return cls.from_record(config), arrays  # type: ignore[return-value]


@dataclass(frozen=True)
class TrainInstruction(Instruction):
    """Train the model on the site's train split and send the new weights."""

    message_type: ClassVar[str] = MessageType.TRAIN
    keys: ClassVar[Mapping[str, Key]] = TRAIN_KEYS

    training: TrainConfig
    train_max_slices: int
    privacy: DPSettings

    def to_config(self) -> dict[str, Any]:
        return {
            **self._common(),
            **self.training.to_config(),
            "proximal-mu": self.training.proximal_mu,
            "train-max-slices": self.train_max_slices,
            **self.privacy.to_config(),
        }

    @classmethod
    def from_record(cls, config: ConfigRecord) -> TrainInstruction:
        """The instruction of a train message's config; SchemaError if it breaks the schema."""
        values = read_config(config, TRAIN_KEYS)
        return cls(
            **cls._common_fields(values),
            training=_built(
                lambda: TrainConfig.from_config(values, proximal_mu=values["proximal-mu"])
            ),
            train_max_slices=values["train-max-slices"],
            privacy=_built(lambda: DPSettings.from_config(values)),
        )


@dataclass(frozen=True)
class EvaluateInstruction(Instruction):
    """Score the model on the site's ``splits``; with ``histogram_bins``, also send the tune
    split's score histograms for the pooled operating point (cross-site validation asks for
    the test split alone, without histograms)."""

    message_type: ClassVar[str] = MessageType.EVALUATE
    keys: ClassVar[Mapping[str, Key]] = EVALUATE_KEYS

    splits: tuple[str, ...]
    histogram_bins: int | None = None

    @property
    def scored_splits(self) -> tuple[str, ...]:
        """The splits a site scores: ``splits``, and the tune split for the histograms."""
        if self.histogram_bins is not None and "tune" not in self.splits:
            return (*self.splits, "tune")
        return self.splits

    def to_config(self) -> dict[str, Any]:
        config = {**self._common(), "splits": ",".join(self.splits)}
        if self.histogram_bins is not None:
            config[BINS_KEY] = self.histogram_bins
        return config

    @classmethod
    def from_record(cls, config: ConfigRecord) -> EvaluateInstruction:
        """The instruction of an evaluate message's config; SchemaError if it breaks the
        schema."""
        values = read_config(config, EVALUATE_KEYS, OPTIONAL_EVALUATE_KEYS)
        return cls(
            **cls._common_fields(values),
            splits=tuple(values["splits"].split(",")),
            histogram_bins=values.get(BINS_KEY),
        )


INSTRUCTIONS: dict[str, type[TrainInstruction] | type[EvaluateInstruction]] = {
    MessageType.TRAIN: TrainInstruction,
    MessageType.EVALUATE: EvaluateInstruction,
}


def read_instruction(message: Message) -> tuple[Instruction, ArrayRecord]:
    """The instruction of a train or evaluate message; SchemaError for any other type or a
    message that breaks the schema."""
    kind = INSTRUCTIONS.get(message.metadata.message_type)
    if kind is None:
        raise SchemaError("a site answers only train and evaluate messages")
    return kind.from_message(message)


# What a reply may hold: each metric's rule on its value.
ValueRule = Callable[[Any], bool]


def _count(value: Any) -> bool:
    return (
        not isinstance(value, bool)
        and isinstance(value, int | float)
        and math.isfinite(value)
        and value >= 0
        and float(value).is_integer()
    )


def _share_or_nan(value: Any) -> bool:
    return fits(value, float) and 0 <= value <= 1 or _nan(value)


def _non_negative_or_nan(value: Any) -> bool:
    return fits(value, float) and value >= 0 or _nan(value)


def _nan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


def _split_rule(metric: str) -> ValueRule:
    if metric == "n":
        return _count
    return _non_negative_or_nan if metric == "loss" else _share_or_nan


def reply_rules(instruction: Instruction) -> dict[str, ValueRule]:
    """Every metric key a reply to ``instruction`` holds, with the rule its value keeps.
    The histograms' own rule is :func:`histogram_fits`."""
    if isinstance(instruction, TrainInstruction):
        rules: dict[str, ValueRule] = {
            WEIGHT_KEY: _count,
            "train-loss": _non_negative_or_nan,
            "train-accuracy": _share_or_nan,
            "train-seconds": lambda value: fits(value, float) and value >= 0,
        }
        if instruction.privacy.enabled:
            rules["dp-epsilon"] = lambda value: fits(value, float) and value >= 0
            rules["dp-delta"] = lambda value: fits(value, float) and 0 < value < 1
        return rules
    assert isinstance(instruction, EvaluateInstruction)
    rules = {WEIGHT_KEY: _count}
    for split in instruction.scored_splits:
        rules.update({f"{split}-{metric}": _split_rule(metric) for metric in SPLIT_METRICS})
    if instruction.histogram_bins is not None:
        rules.update({key: lambda value: isinstance(value, list) for key in HISTOGRAM_KEYS})
    return rules


def histogram_fits(value: Any, bins: int) -> bool:
    """Whether a histogram of a reply is ``bins`` non-negative integer counts."""
    return (
        isinstance(value, list)
        and len(value) == bins
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
    )


# Secure aggregation (SecAgg+, common/federation/secagg.py): four stages per aggregation, each
# a message of type "<phase>.<stage>" (phase "train" or "evaluate").  The site keeps what it
# must remember between them (client/secagg.py) and checks every stage against it.
SECAGG_RECORD = "secagg"
MASKED_RECORD = "masked"
MASKED_ARRAY = "vector"
KEYS_STAGE, SHARES_STAGE, MASKED_STAGE, UNMASK_STAGE = (
    "secagg_keys",
    "secagg_shares",
    "secagg_masked",
    "secagg_unmask",
)
SECAGG_STAGES = (KEYS_STAGE, SHARES_STAGE, MASKED_STAGE, UNMASK_STAGE)
NODES_KEY = "secagg-nodes"
SHARES_KEY = "secagg-shares"
_MAX_NODE = 2**64 - 1


def _is_node(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= _MAX_NODE


def _nodes_ok(value: Any, low: int, high: int) -> bool:
    return (
        isinstance(value, list)
        and low <= len(value) <= high
        and all(_is_node(v) for v in value)
        and all(a < b for a, b in zip(value, value[1:], strict=False))
    )


def _bytes_ok(value: Any, size: int) -> bool:
    return (
        isinstance(value, list)
        and len(value) <= MAX_SITES
        and all(isinstance(v, bytes) and len(v) == size for v in value)
    )


def _node_list(low: int) -> Key:
    return Key(
        list,
        lambda value: _nodes_ok(value, low, MAX_SITES),
        f"a list of {low} to {MAX_SITES} node ids in increasing order",
        "a list",
    )


def _byte_list(size: int) -> Key:
    return Key(
        list, lambda value: _bytes_ok(value, size), f"a list of {size}-byte values", "a list"
    )


SECAGG_COMMON_KEYS: dict[str, Key] = {
    "server-round": _range(int, 1, MAX_ROUNDS),
    "run-key": _pattern(_RUN_KEY, "1 to 128 letters, digits, '.', '_' or '-'"),
}


def _phase_of(message: Message, stage: str) -> str:
    category, _, action = message.metadata.message_type.partition(".")
    if action != stage or category not in PHASES:
        raise SchemaError(f"a {stage} handler got another message type")
    return category


def _reply_record(message: Message, name: str, kind: type) -> Any:
    record = message.content.get(name) if name in message.content else None
    return record if isinstance(record, kind) else None


@dataclass(frozen=True)
class SecAggStage(ABC):
    """One stage of a secure aggregation: its phase, round and run key name the instance
    (:func:`~fedct.common.federation.secagg.instance_id`)."""

    stage: ClassVar[str]
    keys: ClassVar[Mapping[str, Key]]
    # What the reply holds besides the ``site`` record: record name → record type.
    reply_records: ClassVar[Mapping[str, str]] = {SECAGG_RECORD: "ConfigRecord"}

    phase: str
    server_round: int
    run_key: str

    @property
    def message_type(self) -> str:
        return f"{self.phase}.{self.stage}"

    @property
    def instance(self) -> bytes:
        return instance_id(self.run_key, self.server_round, self.phase)

    def _common(self) -> dict[str, Any]:
        return {"server-round": self.server_round, "run-key": self.run_key}

    @abstractmethod
    def to_config(self) -> dict[str, Any]:
        """The message's config keys and values."""

    def to_record(self) -> ConfigRecord:
        """The message's config record, checked against the schema."""
        record = ConfigRecord(self.to_config())
        type(self).from_record(self.phase, record)
        return record

    @classmethod
    @abstractmethod
    def from_record(cls, phase: str, config: ConfigRecord) -> SecAggStage:
        """The stage of a message's config; SchemaError if it breaks the schema."""

    @classmethod
    def from_message(cls, message: Message) -> tuple[SecAggStage, ArrayRecord | None]:
        """The stage (and the weights, for the masked input) of a message of this stage."""
        phase = _phase_of(message, cls.stage)
        records = {name: type(record).__name__ for name, record in message.content.items()}
        if records != cls.message_records():
            raise SchemaError(f"a {cls.stage} message holds other records than the protocol's")
        arrays = message.content.array_records.get(ARRAYS_RECORD)
        return cls.from_record(phase, message.content.config_records[CONFIG_RECORD]), arrays

    @classmethod
    def message_records(cls) -> dict[str, str]:
        return {CONFIG_RECORD: "ConfigRecord"}

    @abstractmethod
    def reply_problems(self, reply: Message) -> list[str]:
        """The keys or arrays of a reply's stage record that break this stage's rules."""


@dataclass(frozen=True)
class SecAggKeys(SecAggStage):
    """Stage 1: make this instance's two key pairs and advertise their public halves.
    ``participants`` are the sampled sites, ``degree`` the graph's degree among them and
    ``threshold`` the shares (of the degree + 1 holders) that rebuild a secret."""

    stage: ClassVar[str] = KEYS_STAGE
    keys: ClassVar[Mapping[str, Key]] = {
        **SECAGG_COMMON_KEYS,
        "secagg-participants": _node_list(3),
        "secagg-degree": _range(int, 2, MAX_SITES - 1),
        "secagg-threshold": _range(int, 2, MAX_SITES),
    }

    participants: tuple[int, ...]
    degree: int
    threshold: int

    @property
    def holders(self) -> int:
        """Sites holding shares of a site's secrets: its neighbours and itself."""
        return self.degree + 1

    def to_config(self) -> dict[str, Any]:
        return {
            **self._common(),
            "secagg-participants": list(self.participants),
            "secagg-degree": self.degree,
            "secagg-threshold": self.threshold,
        }

    @classmethod
    def from_record(cls, phase: str, config: ConfigRecord) -> SecAggKeys:
        values = read_config(config, cls.keys)
        participants = tuple(values["secagg-participants"])
        degree, threshold = values["secagg-degree"], values["secagg-threshold"]
        if not valid_degree(degree, len(participants)):
            raise SchemaError(
                "'secagg-degree' must be the participants less one, or even and smaller"
            )
        if not (degree + 1) // 2 < threshold <= degree + 1:
            raise SchemaError("'secagg-threshold' must be a majority of the degree + 1 holders")
        return cls(
            phase, values["server-round"], values["run-key"], participants, degree, threshold
        )

    def reply_problems(self, reply: Message) -> list[str]:
        record = _reply_record(reply, SECAGG_RECORD, ConfigRecord)
        if record is None:
            return [SECAGG_RECORD]
        wanted = {"encryption-key", "mask-key"}
        problems = sorted(set(record) ^ wanted)
        problems += [
            key
            for key in sorted(wanted & set(record))
            if not (isinstance(record[key], bytes) and len(record[key]) == KEY_BYTES)
        ]
        return problems


@dataclass(frozen=True)
class SecAggShares(SecAggStage):
    """Stage 2: split this instance's secrets among the site and ``nodes`` (its neighbours
    that advertised keys, whose public keys come in the same order) and seal each
    neighbour's shares for it."""

    stage: ClassVar[str] = SHARES_STAGE
    keys: ClassVar[Mapping[str, Key]] = {
        **SECAGG_COMMON_KEYS,
        NODES_KEY: _node_list(1),
        "secagg-encryption-keys": _byte_list(KEY_BYTES),
        "secagg-mask-keys": _byte_list(KEY_BYTES),
    }

    nodes: tuple[int, ...]
    encryption_keys: tuple[bytes, ...]
    mask_keys: tuple[bytes, ...]

    def to_config(self) -> dict[str, Any]:
        return {
            **self._common(),
            NODES_KEY: list(self.nodes),
            "secagg-encryption-keys": list(self.encryption_keys),
            "secagg-mask-keys": list(self.mask_keys),
        }

    @classmethod
    def from_record(cls, phase: str, config: ConfigRecord) -> SecAggShares:
        values = read_config(config, cls.keys)
        nodes = tuple(values[NODES_KEY])
        encryption, masks = values["secagg-encryption-keys"], values["secagg-mask-keys"]
        if not len(nodes) == len(encryption) == len(masks):
            raise SchemaError(f"{NODES_KEY!r} and the key lists differ in length")
        return cls(
            phase,
            values["server-round"],
            values["run-key"],
            nodes,
            tuple(encryption),
            tuple(masks),
        )

    def reply_problems(self, reply: Message) -> list[str]:
        record = _reply_record(reply, SECAGG_RECORD, ConfigRecord)
        if record is None:
            return [SECAGG_RECORD]
        problems = sorted(set(record) ^ {"nodes", "shares"})
        if "nodes" in record and record["nodes"] != list(self.nodes):
            problems.append("nodes")
        shares = record.get("shares")
        if "shares" in record and not (
            _bytes_ok(shares, CIPHERTEXT_BYTES) and len(shares) == len(self.nodes)
        ):
            problems.append("shares")
        return problems


@dataclass(frozen=True)
class SecAggMasked(SecAggStage):
    """Stage 3: do what ``instruction`` asks (train, or score), and send the result as the
    protocol's input (common/federation/secure_vector.py) plus the self mask and the masks
    shared with ``nodes``, whose sealed shares for this site come in ``shares``."""

    stage: ClassVar[str] = MASKED_STAGE
    keys: ClassVar[Mapping[str, Key]] = {
        NODES_KEY: Key(
            list,
            lambda value: _nodes_ok(value, 0, MAX_SITES),
            f"a list of at most {MAX_SITES} node ids in increasing order",
            "a list",
        ),
        SHARES_KEY: _byte_list(CIPHERTEXT_BYTES),
    }
    reply_records: ClassVar[Mapping[str, str]] = {MASKED_RECORD: "ArrayRecord"}

    instruction: TrainInstruction | EvaluateInstruction
    nodes: tuple[int, ...]
    shares: tuple[bytes, ...]

    @classmethod
    def of(
        cls,
        instruction: TrainInstruction | EvaluateInstruction,
        nodes: tuple[int, ...],
        shares: tuple[bytes, ...],
    ) -> SecAggMasked:
        phase = "train" if isinstance(instruction, TrainInstruction) else "evaluate"
        return cls(phase, instruction.server_round, instruction.run_key, instruction, nodes, shares)

    def to_config(self) -> dict[str, Any]:
        return {
            **self.instruction.to_config(),
            NODES_KEY: list(self.nodes),
            SHARES_KEY: list(self.shares),
        }

    @classmethod
    def message_records(cls) -> dict[str, str]:
        return {ARRAYS_RECORD: "ArrayRecord", CONFIG_RECORD: "ConfigRecord"}

    @classmethod
    def from_record(cls, phase: str, config: ConfigRecord) -> SecAggMasked:
        own = {key: config[key] for key in cls.keys if key in config}
        values = read_config(own, cls.keys)
        rest = ConfigRecord({key: value for key, value in config.items() if key not in cls.keys})
        kind = TrainInstruction if phase == "train" else EvaluateInstruction
        nodes, shares = tuple(values[NODES_KEY]), tuple(values[SHARES_KEY])
        if len(nodes) != len(shares):
            raise SchemaError(f"{NODES_KEY!r} and {SHARES_KEY!r} differ in length")
        return cls.of(kind.from_record(rest), nodes, shares)

    def reply_problems(self, reply: Message) -> list[str]:
        """The vector's length is the guard's to check (it depends on the model)."""
        record = _reply_record(reply, MASKED_RECORD, ArrayRecord)
        if record is None:
            return [MASKED_RECORD]
        return sorted(set(record) ^ {MASKED_ARRAY})


@dataclass(frozen=True)
class SecAggUnmask(SecAggStage):
    """Stage 4: ``survivors`` sent their masked inputs, ``dropped`` shared keys and did not:
    send the self-mask seed shares held for survivors and the mask-key shares held for the
    dropped, never both for one site."""

    stage: ClassVar[str] = UNMASK_STAGE
    keys: ClassVar[Mapping[str, Key]] = {
        **SECAGG_COMMON_KEYS,
        "secagg-survivors": _node_list(2),
        "secagg-dropped": Key(
            list,
            lambda value: _nodes_ok(value, 0, MAX_SITES),
            f"a list of at most {MAX_SITES} node ids in increasing order",
            "a list",
        ),
    }

    survivors: tuple[int, ...]
    dropped: tuple[int, ...]

    def to_config(self) -> dict[str, Any]:
        return {
            **self._common(),
            "secagg-survivors": list(self.survivors),
            "secagg-dropped": list(self.dropped),
        }

    @classmethod
    def from_record(cls, phase: str, config: ConfigRecord) -> SecAggUnmask:
        values = read_config(config, cls.keys)
        survivors, dropped = tuple(values["secagg-survivors"]), tuple(values["secagg-dropped"])
        if set(survivors) & set(dropped):
            raise SchemaError("a site cannot both survive and drop out")
        return cls(phase, values["server-round"], values["run-key"], survivors, dropped)

    def reply_problems(self, reply: Message) -> list[str]:
        record = _reply_record(reply, SECAGG_RECORD, ConfigRecord)
        if record is None:
            return [SECAGG_RECORD]
        wanted = {"seed-nodes", "seed-shares", "key-nodes", "key-shares"}
        problems = sorted(set(record) ^ wanted)
        if problems:
            return problems
        for nodes, shares, allowed in (
            ("seed-nodes", "seed-shares", self.survivors),
            ("key-nodes", "key-shares", self.dropped),
        ):
            if not (_nodes_ok(record[nodes], 0, MAX_SITES) and set(record[nodes]) <= set(allowed)):
                problems.append(nodes)
            elif not (
                _bytes_ok(record[shares], SHARE_BYTES) and len(record[shares]) == len(record[nodes])
            ):
                problems.append(shares)
        return problems


SECAGG_STAGE_CLASSES: dict[str, type[SecAggStage]] = {
    cls.stage: cls for cls in (SecAggKeys, SecAggShares, SecAggMasked, SecAggUnmask)
}


def record_bytes(record: ArrayRecord | ConfigRecord | Any) -> int:
    """Bytes a record takes in a message: array data with their headers, or each key with
    its value (8 bytes a number).  (Flower's own count fails on an empty list.)"""
    if isinstance(record, ArrayRecord):
        return record.count_bytes()
    total = 0
    for key, value in record.items():
        values = value if isinstance(value, list) else [value]
        total += len(key) + sum(len(v) if isinstance(v, bytes | str) else 8 for v in values)
    return total


def read_message(message: Message) -> tuple[Instruction | SecAggStage, ArrayRecord | None]:
    """The instruction or secure-aggregation stage of any message a site answers;
    SchemaError for another type or a message that breaks the schema."""
    kind = message.metadata.message_type
    if kind in INSTRUCTIONS:
        return read_instruction(message)
    _, _, action = kind.partition(".")
    stage = SECAGG_STAGE_CLASSES.get(action)
    if stage is None:
        raise SchemaError("a site answers only train, evaluate and secure-aggregation messages")
    return stage.from_message(message)
