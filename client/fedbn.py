"""FedBN at a site: its BatchNorm weights, biases and running statistics stay its own.

After local training the site stores its BatchNorm entries; whenever a global model arrives
(for training or evaluation) they replace the averaged ones before use.  Until a site has
trained once it uses the global entries.  The entries are kept as safetensors under the
site's state dir, named by the run's state name (a hash of the run key the coordinator sends,
``Instruction.state_name``: no message chooses a file name), so a resumed run finds them
again and a new run starts afresh.
"""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load, save
from torch import nn

from fedct.common.cache.store import atomic_open
from fedct.common.model.classifier import bn_state_keys


def local_bn_path(state_dir: Path, state_name: str) -> Path:
    if not state_name.isalnum():
        raise ValueError("a state name is a hash, letters and digits only")
    return Path(state_dir) / f"fedbn-{state_name}.safetensors"


def save_local_bn(model: nn.Module, path: Path) -> None:
    """Store ``model``'s BatchNorm entries at ``path``."""
    keys = bn_state_keys(model)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k in keys}
    with atomic_open(path, "wb") as handle:
        handle.write(save(state))


def restore_local_bn(model: nn.Module, path: Path) -> bool:
    """Overwrite ``model``'s BatchNorm entries with those stored at ``path``, if any."""
    if not path.exists():
        return False
    model.load_state_dict(load(path.read_bytes()), strict=False)
    return True
