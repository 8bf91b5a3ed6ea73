"""SecAgg+ (Bell et al., CCS 2020): the arithmetic and cryptography a site and the coordinator
share.  The protocol's stages are fedct's own (client/secagg.py at a site, server/secagg.py at
the coordinator, their messages in common/federation/messages.py); this module holds what
both ends must compute identically.

* **The field** is Z_{2^64}: numpy ``uint64`` arithmetic wraps exactly there.  A site's input
  is a vector of reals (its example-weighted update, counts, weighted metrics, histograms),
  clipped to ±:data:`ENTRY_BOUND` and quantised to fixed point with :data:`FRACTION_BITS`
  fractional bits by unbiased stochastic rounding, so that the sum of up to :data:`MAX_SITES`
  inputs never wraps and decodes exactly to the sum of the quantised values.
* **The graph**: each site exchanges pairwise masks with, and gives shares of its secrets to,
  ``degree`` neighbours on a ring lattice (a Harary graph) over the participants in an order
  drawn from the instance's hash, or with every other site when ``degree`` reaches
  ``participants - 1`` (the complete graph of the original SecAgg).  Every site computes its
  own neighbours: the coordinator does not choose them.
* **Keys**: X25519 key pairs (``cryptography``), one for encrypting shares and one for the
  pairwise masks; every shared key comes out of HKDF-SHA256 bound to its purpose and to the
  instance (run key, round, phase), so no key serves two aggregations.
* **Shares**: Shamir's secret sharing of the 32-byte self-mask seed and mask secret key
  (Flower's ``flwr.common.secure_aggregation.crypto.shamir``: GF(2^128), 52-byte shares),
  encrypted pairwise with AES-256-GCM, the instance and both node ids as associated data.
* **Masks**: AES-256-CTR key streams (a cryptographic pseudo-random generator; Flower's
  ``pseudo_rand_gen`` reduces its seed to 32 bits, which a coordinator could search).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)
from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares

PHASES = ("train", "evaluate")
FIELD_DTYPE = np.dtype("<u8")
FRACTION_BITS = 20
MAX_SITES = 1024
# |entry| of one site's input: MAX_SITES of them sum to less than 2^63 in fixed point.
ENTRY_BOUND = float(2 ** (63 - FRACTION_BITS - int(math.log2(MAX_SITES))))
KEY_BYTES = 32
SECRET_BYTES = 32
SHARE_BYTES = 52  # Flower's share of a 32-byte secret: a 4-byte index and 3 × 16 bytes
NONCE_BYTES = 12
TAG_BYTES = 16
CIPHERTEXT_BYTES = NONCE_BYTES + 2 * SHARE_BYTES + TAG_BYTES
NODE_BYTES = 8
_SCALE = float(2**FRACTION_BITS)


def instance_id(run_key: str, server_round: int, phase: str) -> bytes:
    """The 32 bytes naming one aggregation: the run key, the round and the phase."""
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}")
    return hashlib.sha256(f"fedct-secagg|{run_key}|{server_round}|{phase}".encode()).digest()


def effective_degree(requested: int, sites: int) -> int:
    """The graph degree used among ``sites`` participants for a ``requested`` degree: the
    complete graph (``sites - 1``) when ``requested`` is 0 or reaches it, else ``requested``
    rounded down to an even number (a ring lattice links k/2 sites on each side), at least 2."""
    if sites < 2:
        raise ValueError("secure aggregation needs at least two participants")
    if requested <= 0 or requested >= sites - 1:
        return sites - 1
    return max(2, requested - requested % 2)


def valid_degree(degree: int, sites: int) -> bool:
    """Whether ``degree`` is one :func:`effective_degree` can give among ``sites``."""
    return sites >= 2 and (degree == sites - 1 or (2 <= degree < sites - 1 and degree % 2 == 0))


def threshold_of(fraction: float, holders: int) -> int:
    """Shares needed to rebuild a secret split among ``holders``: ⌈fraction · holders⌉, and
    always a strict majority, so no two disjoint sets of holders can both rebuild it."""
    return min(holders, max(holders // 2 + 1, math.ceil(fraction * holders - 1e-9)))


def neighbours(node: int, participants: Sequence[int], degree: int, instance: bytes) -> list[int]:
    """The sites ``node`` exchanges masks and shares with, in increasing node order."""
    if node not in participants or not valid_degree(degree, len(participants)):
        raise ValueError("the node or the degree does not fit the participants")
    if degree == len(participants) - 1:
        return sorted(p for p in participants if p != node)
    ring = sorted(participants, key=lambda p: hashlib.sha256(instance + _node(p)).digest())
    at, size = ring.index(node), len(ring)
    near = {ring[(at + step) % size] for d in range(1, degree // 2 + 1) for step in (d, -d)}
    return sorted(near)


def _node(node: int) -> bytes:
    return node.to_bytes(NODE_BYTES, "little")


@dataclass(frozen=True)
class KeyPair:
    """An X25519 key pair, both halves raw (32 bytes each)."""

    private: bytes
    public: bytes

    @classmethod
    def generate(cls) -> KeyPair:
        key = X25519PrivateKey.generate()
        private = key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        return cls(private, key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))


def public_of(private: bytes) -> bytes:
    """The raw public key of a raw X25519 private key."""
    key = X25519PrivateKey.from_private_bytes(private)
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def shared_key(private: bytes, public: bytes, purpose: str, instance: bytes) -> bytes:
    """32 bytes both ends of a key agreement derive, for ``purpose`` in ``instance``.
    ValueError for a public key that gives no usable shared secret (a low-order point)."""
    secret = X25519PrivateKey.from_private_bytes(private).exchange(
        X25519PublicKey.from_public_bytes(public)
    )
    info = f"fedct-secagg|{purpose}|".encode() + instance
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)


def _associated(instance: bytes, source: int, destination: int) -> bytes:
    return instance + _node(source) + _node(destination)


def seal_shares(
    key: bytes, instance: bytes, source: int, destination: int, seed_share: bytes, key_share: bytes
) -> bytes:
    """``source``'s shares for ``destination``, encrypted (AES-256-GCM) under their shared key."""
    if len(seed_share) != SHARE_BYTES or len(key_share) != SHARE_BYTES:
        raise ValueError("a share has the wrong size")
    nonce = os.urandom(NONCE_BYTES)
    sealed = AESGCM(key).encrypt(
        nonce, seed_share + key_share, _associated(instance, source, destination)
    )
    return nonce + sealed


def open_shares(
    key: bytes, instance: bytes, source: int, destination: int, ciphertext: bytes
) -> tuple[bytes, bytes]:
    """(self-mask seed share, secret-key share) that ``source`` sealed for ``destination``;
    ValueError when the ciphertext was not sealed so (tampered, replayed from another instance
    or pair, or of the wrong size)."""
    if len(ciphertext) != CIPHERTEXT_BYTES:
        raise ValueError("a sealed share has the wrong size")
    try:
        plain = AESGCM(key).decrypt(
            ciphertext[:NONCE_BYTES],
            ciphertext[NONCE_BYTES:],
            _associated(instance, source, destination),
        )
    except Exception:  # noqa: BLE001 — InvalidTag: any tampering looks the same
        raise ValueError("a sealed share does not open") from None
    return plain[:SHARE_BYTES], plain[SHARE_BYTES:]


def split_secret(secret: bytes, threshold: int, holders: int) -> list[bytes]:
    """Shamir shares of a 32-byte ``secret``, any ``threshold`` of the ``holders`` rebuild it;
    share i (0-based) carries the index i + 1."""
    if len(secret) != SECRET_BYTES or not 1 <= threshold <= holders:
        raise ValueError("a secret is 32 bytes and 1 <= threshold <= holders")
    return create_shares(secret, threshold, holders)


def share_index(share: bytes) -> int:
    return int.from_bytes(share[:4], "little")


def combine_secret(shares: Sequence[bytes], threshold: int) -> bytes:
    """The secret ``threshold`` distinct shares rebuild; ValueError if there are fewer, or
    they do not rebuild a secret of the protocol's size."""
    distinct = {share_index(s): s for s in shares if len(s) == SHARE_BYTES}
    if len(distinct) < threshold:
        raise ValueError(f"{len(distinct)} shares, {threshold} needed")
    chosen = [distinct[i] for i in sorted(distinct)[:threshold]]
    secret = combine_shares(chosen)
    if len(secret) != SECRET_BYTES:
        raise ValueError("the shares do not rebuild a secret")
    return secret


def mask(seed: bytes, length: int) -> np.ndarray:
    """``length`` uniform elements of the field from a 32-byte ``seed`` (AES-256-CTR)."""
    stream = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor()
    out = bytearray(8 * length + 15)  # update_into wants a block's room beyond the data
    stream.update_into(bytes(8 * length), out)
    return np.frombuffer(out, dtype=FIELD_DTYPE, count=length)


def pairwise_seed(
    own_private: bytes, other_public: bytes, instance: bytes, received: bytes
) -> bytes:
    """The seed of the mask two sites share (each derives it from its own mask key), bound to
    ``received``, the digest of the weights and instruction the site was sent
    (:func:`received_digest`): two sites sent different models derive different seeds, their
    masks do not cancel, and the sum is noise.  (A coordinator that sent one site a model
    whose update shows, and every other site one whose update vanishes, would otherwise read
    that site's update off the sum: Pasquini et al., CCS 2022.)"""
    return shared_key(own_private, other_public, "pairwise-mask", instance + received)


def received_digest(config: dict[str, object], arrays: Iterable[tuple[str, bytes]]) -> bytes:
    """SHA-256 of an instruction's config and the (name, bytes) of the weights sent with it."""
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for name, data in sorted(arrays):
        digest.update(len(name).to_bytes(4, "little") + name.encode())
        digest.update(len(data).to_bytes(8, "little") + data)
    return digest.digest()


def pairwise_sign(node: int, other: int) -> int:
    """+1 if ``node`` adds the mask it shares with ``other``, -1 if it subtracts it: the two
    signs are opposite, so the pair's masks cancel in the sum."""
    return 1 if node < other else -1


def quantize(values: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``values`` (reals) clipped to ±:data:`ENTRY_BOUND`, in fixed point, stochastically
    rounded (unbiased: the expected value is exact), as field elements."""
    clipped = np.clip(np.asarray(values, np.float64), -ENTRY_BOUND, ENTRY_BOUND)
    fixed = np.floor(clipped * _SCALE + rng.random(clipped.shape))
    return fixed.astype(np.int64).view(FIELD_DTYPE)


def dequantize(total: np.ndarray) -> np.ndarray:
    """The reals a sum of :func:`quantize`-d vectors stands for."""
    return np.asarray(total, FIELD_DTYPE).view(np.int64).astype(np.float64) / _SCALE


def quantisation_bound(sites: int, total_weight: float) -> float:
    """The most a weighted mean decoded from a secure sum of ``sites`` inputs can differ from
    the exact one, per coordinate, when no value was clipped: each site's rounding moves its
    weighted value by less than 2^-FRACTION_BITS, the mean divides by ``total_weight``."""
    return sites / _SCALE / total_weight if total_weight > 0 else math.inf


def add_into(total: np.ndarray, term: np.ndarray, sign: int = 1) -> None:
    """``total += sign · term`` in the field (wrapping)."""
    if sign > 0:
        np.add(total, term, out=total)
    else:
        np.subtract(total, term, out=total)
