"""The coordinator's copy of the global model: the weights that travel, the full state that
is checkpointed, and the names of the BatchNorm running statistics."""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import ArrayRecord

from fedct.common.model.classifier import (
    ModelConfig,
    build_model,
    load_travelling_state,
    travelling_state,
)


class GlobalModel:
    """The model of ``cfg``, initialised from ``seed``.

    Sites build theirs from the same seed, so that with a frozen, randomly initialised
    backbone (only the head travels) every site holds the same backbone.
    """

    def __init__(self, cfg: ModelConfig, seed: int) -> None:
        self.cfg = cfg
        torch.manual_seed(seed)
        self.model = build_model(cfg)
        self.model.eval()

    def arrays(self) -> ArrayRecord:
        """The travelling state (everything, or the head when the backbone is frozen)."""
        return ArrayRecord(travelling_state(self.model, self.cfg))

    def load_arrays(self, arrays: ArrayRecord) -> None:
        load_travelling_state(self.model, arrays.to_torch_state_dict(), self.cfg)

    def full_state(self) -> dict[str, np.ndarray]:
        """Every entry of the state dict, as contiguous numpy arrays, for a checkpoint."""
        return {
            key: np.asarray(value.detach().cpu().numpy(), order="C")
            for key, value in self.model.state_dict().items()
        }

    def load_full_state(self, state: dict[str, np.ndarray]) -> None:
        self.model.load_state_dict({key: torch.from_numpy(value) for key, value in state.items()})

    def statistics_keys(self) -> set[str]:
        """State entries that are buffers (running statistics, batch counts), not parameters."""
        return {name for name, _ in self.model.named_buffers()}
