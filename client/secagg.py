"""The site's side of secure aggregation (SecAgg+, Bell et al. 2020): four stages, each checked
against what the site itself saw before anything leaves.

The coordinator runs one aggregation (an *instance*: run key, round, phase) per train and
per evaluate phase, in four messages (common/federation/messages.py):

1. ``keys``: the site makes two X25519 key pairs for this instance and sends their public
   halves, if the aggregation is as strong as its policy asks (client/site_policy.py: enough
   participants, graph degree and threshold);
2. ``shares``: it draws a fresh self-mask seed, splits the seed and its mask secret key into
   Shamir shares among itself and its neighbours (whom it computes itself from the
   participants: common/federation/secagg.py) and seals each neighbour's shares for it;
3. ``masked``: it opens the shares its neighbours sealed for it, trains (or scores) as the
   message's instruction asks, and sends only its input (common/federation/secure_vector.py)
   plus its self mask and the masks it shares with those neighbours, in the field; the
   pairwise masks are bound to the weights and instruction it received, so a coordinator
   that sends sites different models gets a sum that does not unmask;
4. ``unmask``: for the sites the coordinator names as survivors it sends the self-mask seed
   shares it holds, for those it names as dropped the mask-key shares; never both for one
   site, and only once per instance.

Between messages the site keeps the instance in ``context.state`` (Flower keeps it per run
and node, in the SuperNode's memory on the deployment engine and in the simulation engine's
node state: never on disk, never named by a message).  A stage out of order, of another
instance, naming sites the protocol does not allow, or inconsistent with an earlier stage is
refused in fixed words (``privacy: secure aggregation: …``).  A site sends at most one masked
input per instance, even across a restarted protocol: two inputs masked differently would let
the coordinator unmask one from the other.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import replace
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from fedct.client.local import evaluate_site, train_site
from fedct.client.model_layout import local_entries, model_layout
from fedct.client.site_data import Site
from fedct.client.site_policy import SitePolicy
from fedct.common.federation.messages import (
    MASKED_ARRAY,
    MASKED_RECORD,
    SECAGG_RECORD,
    SecAggKeys,
    SecAggMasked,
    SecAggShares,
    SecAggStage,
    SecAggUnmask,
    TrainInstruction,
)
from fedct.common.federation.secagg import (
    KeyPair,
    add_into,
    mask,
    neighbours,
    open_shares,
    pairwise_seed,
    pairwise_sign,
    quantize,
    received_digest,
    seal_shares,
    shared_key,
    split_secret,
)
from fedct.common.federation.secure_vector import VectorSpec
from fedct.common.federation.site_error import PrivacyRefusal

SENT = "secagg-sent"  # instances this site has sent a masked input for
SHARE_KEY = "share-encryption"


def _record_name(phase: str) -> str:
    return f"secagg-{phase}"


def _refuse(reason: str) -> PrivacyRefusal:
    return PrivacyRefusal(f"secure aggregation: {reason}")


def _sent(state: RecordDict) -> list[bytes]:
    record = state.config_records.get(SENT)
    return list(record["instances"]) if record is not None else []


def _current(state: RecordDict, stage: SecAggStage, expected: str) -> ConfigRecord:
    """The site's record of ``stage``'s instance, which must be at stage ``expected``."""
    record = state.config_records.get(_record_name(stage.phase))
    if record is None or record["instance"] != stage.instance:
        raise _refuse("a stage of an aggregation this site has not joined")
    if record["stage"] != expected:
        raise _refuse("a stage out of order")
    return record


def start(stage: SecAggKeys, node: int, state: RecordDict, policy: SitePolicy) -> ConfigRecord:
    """Stage 1: the public keys of this instance's two fresh key pairs."""
    policy.check_secure_aggregation(stage)
    if node not in stage.participants:
        raise _refuse("this site is not among the participants")
    if stage.instance in _sent(state):
        raise _refuse("this site already sent its input to this aggregation")
    encryption, masking = KeyPair.generate(), KeyPair.generate()
    state[_record_name(stage.phase)] = ConfigRecord(
        {
            "instance": stage.instance,
            "stage": "keys",
            "node": node,
            "participants": list(stage.participants),
            "degree": stage.degree,
            "threshold": stage.threshold,
            "encryption-private": encryption.private,
            "mask-private": masking.private,
        }
    )
    return ConfigRecord({"encryption-key": encryption.public, "mask-key": masking.public})


def share(stage: SecAggShares, node: int, state: RecordDict) -> ConfigRecord:
    """Stage 2: this site's secrets split among itself and its neighbours, each neighbour's
    shares sealed for it."""
    record = _current(state, stage, "keys")
    graph = neighbours(node, record["participants"], record["degree"], stage.instance)
    if not set(stage.nodes) <= set(graph):
        raise _refuse("the message names a site that is not this site's neighbour")
    holders = sorted([*stage.nodes, node])
    threshold = record["threshold"]
    if len(holders) < threshold:
        raise _refuse("fewer neighbours left than the threshold")
    seed = os.urandom(32)
    seed_shares = split_secret(seed, threshold, len(holders))
    key_shares = split_secret(record["mask-private"], threshold, len(holders))
    sealed = []
    for other, public in zip(stage.nodes, stage.encryption_keys, strict=True):
        position = holders.index(other)
        key = _agreed(record["encryption-private"], public, stage.instance)
        sealed.append(
            seal_shares(
                key, stage.instance, node, other, seed_shares[position], key_shares[position]
            )
        )
    own = holders.index(node)
    record.update(
        {
            "stage": "shares",
            "neighbour-nodes": list(stage.nodes),
            "neighbour-encryption-keys": list(stage.encryption_keys),
            "neighbour-mask-keys": list(stage.mask_keys),
            "seed": seed,
            "own-seed-share": seed_shares[own],
            "own-key-share": key_shares[own],
        }
    )
    return ConfigRecord({"nodes": list(stage.nodes), "shares": sealed})


def _agreed(private: bytes, public: bytes, instance: bytes, received: bytes = b"") -> bytes:
    """The key agreed with a neighbour's public key: for sealing shares, or (given the
    digest of what this site ``received``) the seed of the mask the two share."""
    try:
        if received:
            return pairwise_seed(private, public, instance, received)
        return shared_key(private, public, SHARE_KEY, instance)
    except ValueError:
        raise _refuse("a neighbour's public key gives no shared key") from None


def masked_input(
    site: Site,
    stage: SecAggMasked,
    arrays: ArrayRecord,
    node: int,
    state: RecordDict,
    policy: SitePolicy,
) -> ArrayRecord:
    """Stage 3: train or score as the instruction asks, and send the input masked."""
    record = _current(state, stage, "shares")
    if stage.instance in _sent(state):
        raise _refuse("this site already sent its input to this aggregation")
    known = dict(
        zip(
            record["neighbour-nodes"],
            zip(record["neighbour-encryption-keys"], record["neighbour-mask-keys"], strict=True),
            strict=True,
        )
    )
    if not set(stage.nodes) <= set(known):
        raise _refuse("the message forwards shares of a site this site did not share with")
    if len(stage.nodes) + 1 < record["threshold"]:
        raise _refuse("fewer neighbours left than the threshold")
    held = {}
    for other, sealed in zip(stage.nodes, stage.shares, strict=True):
        key = _agreed(record["encryption-private"], known[other][0], stage.instance)
        try:
            held[other] = open_shares(key, stage.instance, other, node, sealed)
        except ValueError:
            raise _refuse("a neighbour's sealed shares do not open") from None
    received = received_digest(
        stage.instruction.to_config(), ((name, a.data) for name, a in arrays.items())
    )
    vector = _input(site, stage, arrays, policy)
    masked = quantize(vector, np.random.default_rng(secrets.randbits(128)))
    add_into(masked, mask(record["seed"], masked.size))
    for other in stage.nodes:
        seed = _agreed(record["mask-private"], known[other][1], stage.instance, received)
        add_into(masked, mask(seed, masked.size), pairwise_sign(node, other))
    state[SENT] = ConfigRecord({"instances": [*_sent(state), stage.instance]})
    record.update(
        {
            "stage": "masked",
            "masked-nodes": list(stage.nodes),
            "held-seed-shares": [held[other][0] for other in stage.nodes],
            "held-key-shares": [held[other][1] for other in stage.nodes],
        }
    )
    return ArrayRecord({MASKED_ARRAY: Array(masked)})


def _input(site: Site, stage: SecAggMasked, arrays: ArrayRecord, policy: SitePolicy) -> Any:
    """The site's secure-aggregation input for the stage's instruction (unmasked, reals)."""
    instruction = stage.instruction
    cfg = instruction.model
    layout = model_layout(cfg)
    spec = VectorSpec.for_instruction(instruction, layout, local_entries(cfg, instruction.fedbn))
    if not isinstance(instruction, TrainInstruction):
        return spec.encode(evaluate_site(site, instruction, arrays, policy))
    # Full precision out: the update is taken against the weights as the site received them.
    exact = replace(instruction, transport_dtype="float32")
    trained, metrics = train_site(site, exact, arrays, policy)
    before, after = layout.unpack(arrays), layout.unpack(trained)
    update = {
        name: after[name].astype(np.float64) - before[name].astype(np.float64)
        for name, _ in spec.weights
    }
    return spec.encode(metrics, update)


def unmask(stage: SecAggUnmask, node: int, state: RecordDict) -> ConfigRecord:
    """Stage 4: the self-mask seed shares held for survivors, the mask-key shares held for the
    dropped; then the instance's secrets are forgotten."""
    record = _current(state, stage, "masked")
    survivors, dropped = set(stage.survivors), set(stage.dropped)
    if node not in survivors:
        raise _refuse("the coordinator names this site as dropped")
    if len(survivors) < record["threshold"]:
        raise _refuse("fewer survivors than the threshold")
    if not survivors | dropped <= set(record["participants"]):
        raise _refuse("the message names sites that did not take part")
    masked = record["masked-nodes"]
    if not set(masked) <= survivors | dropped:
        raise _refuse("the message leaves out a neighbour this site masked with")
    graph = neighbours(node, record["participants"], record["degree"], stage.instance)
    if not set(graph) & survivors <= set(masked):
        raise _refuse("a surviving neighbour never shared its keys with this site")
    seed_nodes, seed_shares = [node], [record["own-seed-share"]]
    key_nodes, key_shares = [], []
    for other, seed_share, key_share in zip(
        masked, record["held-seed-shares"], record["held-key-shares"], strict=True
    ):
        if other in survivors:
            seed_nodes.append(other)
            seed_shares.append(seed_share)
        else:
            key_nodes.append(other)
            key_shares.append(key_share)
    order = sorted(range(len(seed_nodes)), key=seed_nodes.__getitem__)
    state[_record_name(stage.phase)] = ConfigRecord(
        {
            "instance": stage.instance,
            "stage": "done",
            "node": node,
            "masked-nodes": masked,
            "survivors": list(stage.survivors),
            "dropped": list(stage.dropped),
        }
    )
    return ConfigRecord(
        {
            "seed-nodes": [seed_nodes[i] for i in order],
            "seed-shares": [seed_shares[i] for i in order],
            "key-nodes": key_nodes,
            "key-shares": key_shares,
        }
    )


def revealable(state: RecordDict, stage: SecAggUnmask) -> tuple[set[int], set[int]] | None:
    """For the egress guard: the sites whose seed shares and whose key shares this site may
    reveal in its reply to ``stage``; None when it has no finished record of the instance."""
    record = state.config_records.get(_record_name(stage.phase))
    if record is None or record["instance"] != stage.instance or record["stage"] != "done":
        return None
    masked = set(record["masked-nodes"])
    survivors, dropped = set(stage.survivors), set(stage.dropped)
    return ({record["node"]} | masked) & survivors, masked & dropped


def handle(
    stage: SecAggStage,
    arrays: ArrayRecord | None,
    site: Site,
    node: int,
    state: RecordDict,
    policy: SitePolicy,
) -> tuple[str, ConfigRecord | ArrayRecord]:
    """The reply record (name, record) of ``stage``."""
    if isinstance(stage, SecAggKeys):
        return SECAGG_RECORD, start(stage, node, state, policy)
    if isinstance(stage, SecAggShares):
        return SECAGG_RECORD, share(stage, node, state)
    if isinstance(stage, SecAggMasked):
        assert arrays is not None
        return MASKED_RECORD, masked_input(site, stage, arrays, node, state, policy)
    assert isinstance(stage, SecAggUnmask)
    return SECAGG_RECORD, unmask(stage, node, state)
