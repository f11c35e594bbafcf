"""The checkpoint format shared by training, evaluation, adaptation and the operator.

A checkpoint is a directory with two files:

* ``policy.pt``: the actor-critic's ``state_dict``, tensors only, so it loads with
  ``torch.load(..., weights_only=True)`` (no pickle of arbitrary objects: a checkpoint from
  elsewhere cannot run code);
* ``policy.json``: everything needed to rebuild and trust it: format version, network shape,
  the observation and action spec, scenario, hyperparameters, git revision and the final
  evaluation metrics.

A policy only makes sense on the observation and action layout it was trained on; loading it
against another layout fails with the name of the field that differs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from policies.network import ActorCritic
from policies.observation import (
    DFAAS_FEATURES,
    MESH_LOCAL_FEATURES,
    MESH_NEIGHBOUR_FEATURES,
    mesh_feature_dim,
)

FORMAT_VERSION = 1
WEIGHTS_FILE = "policy.pt"
META_FILE = "policy.json"


class CheckpointError(ValueError):
    """A checkpoint is missing, malformed, or does not fit the environment."""


def spec_for(action_mode: str, max_degree: int) -> dict:
    """The observation and action layout of an environment (what a checkpoint must match)."""
    if action_mode == "split3":
        obs = {"schema": "dfaas", "features": list(DFAAS_FEATURES), "dim": len(DFAAS_FEATURES)}
        entries = ["local", "forward", "reject"]
    else:
        obs = {
            "schema": "mesh",
            "local_features": list(MESH_LOCAL_FEATURES),
            "neighbour_features": list(MESH_NEIGHBOUR_FEATURES),
            "max_degree": max_degree,
            "dim": mesh_feature_dim(max_degree),
        }
        entries = ["local", *(f"neighbour_{i + 1}" for i in range(max_degree)), "reject"]
    return {
        "observation": obs,
        "action": {"mode": action_mode, "entries": entries, "dim": len(entries)},
    }


def check_spec(meta: dict, expected: dict, where: str) -> None:
    """Raise naming the first field whose value differs between checkpoint and environment."""

    def walk(have, want, path):
        if isinstance(want, dict):
            if not isinstance(have, dict):
                raise CheckpointError(f"{where}: field {path!r} is missing or not a mapping")
            for key, value in want.items():
                walk(have.get(key), value, f"{path}.{key}" if path else key)
        elif have != want:
            raise CheckpointError(
                f"{where}: field {path!r} is {have!r} in the checkpoint but {want!r} in the "
                "environment; train a policy for this layout or pick a matching scenario"
            )

    walk(meta, expected, "")


def save(directory: str | Path, model: ActorCritic, meta: dict) -> Path:
    """Write ``policy.pt`` and ``policy.json`` atomically (temp file, then rename)."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    full = {
        "format_version": FORMAT_VERSION,
        "network": {
            "obs_dim": model.obs_dim,
            "action_dim": model.action_dim,
            "hidden": model.actor[0].out_features,
            "layers": sum(isinstance(m, torch.nn.Linear) for m in model.actor) - 1,
            "critic": model.critic_kind,
        },
        **meta,
    }
    tmp = out / (WEIGHTS_FILE + ".tmp")
    torch.save(model.state_dict(), tmp)
    tmp.replace(out / WEIGHTS_FILE)
    tmp = out / (META_FILE + ".tmp")
    tmp.write_text(json.dumps(full, indent=2, sort_keys=True) + "\n")
    tmp.replace(out / META_FILE)
    return out / WEIGHTS_FILE


@dataclass
class LoadedPolicy:
    """A checkpoint ready to act: numpy in, numpy out, deterministic (the Dirichlet mean)."""

    model: ActorCritic
    meta: dict
    path: Path

    def __call__(self, obs: np.ndarray, mask: np.ndarray) -> np.ndarray:
        o = torch.as_tensor(obs, dtype=torch.float32)
        m = torch.as_tensor(np.broadcast_to(mask, (*obs.shape[:-1], mask.shape[-1])).copy())
        return self.model.act(o, m).numpy().astype(np.float64)

    def check(self, action_mode: str, max_degree: int) -> None:
        check_spec(self.meta, spec_for(action_mode, max_degree), f"checkpoint {self.path}")


BUNDLED = Path(__file__).resolve().parent / "checkpoints"
"""Small default policies shipped with the package, one per scenario family (see the
``checkpoints`` target of the Makefile for the commands that reproduce them)."""


def bundled_for(action_mode: str, max_degree: int) -> Path:
    """The bundled checkpoint whose layout fits an environment, or an error listing them."""
    want = spec_for(action_mode, max_degree)
    found = []
    for meta_file in sorted(BUNDLED.glob(f"*/{META_FILE}")):
        meta = json.loads(meta_file.read_text())
        found.append(
            f"{meta_file.parent.name} ({meta['action']['mode']}, obs {meta['observation']['dim']})"
        )
        if meta.get("observation") == want["observation"] and meta.get("action") == want["action"]:
            return meta_file.parent
    raise CheckpointError(
        f"no bundled checkpoint fits action mode {action_mode!r} with max degree {max_degree}; "
        f"bundled: {found or 'none'}; train one with python -m simulator.train"
    )


def resolve(path: str | Path) -> Path:
    """Accept the directory, ``policy.pt`` or ``policy.json``; return the directory."""
    p = Path(path)
    directory = p if p.is_dir() else p.parent
    for name in (WEIGHTS_FILE, META_FILE):
        if not (directory / name).is_file():
            raise CheckpointError(
                f"checkpoint {p}: {directory / name} not found (a checkpoint is a directory "
                f"with {WEIGHTS_FILE} and {META_FILE}, as written by simulator.train)"
            )
    return directory


def load(path: str | Path) -> LoadedPolicy:
    directory = resolve(path)
    try:
        meta = json.loads((directory / META_FILE).read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"checkpoint {directory}: {META_FILE} is not JSON: {exc}") from exc
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {directory}: field 'format_version' is "
            f"{meta.get('format_version')!r}, this code reads {FORMAT_VERSION}"
        )
    net = meta.get("network", {})
    try:
        model = ActorCritic(
            net["obs_dim"], net["action_dim"], net["hidden"], net["layers"], net["critic"]
        )
    except KeyError as exc:
        raise CheckpointError(
            f"checkpoint {directory}: field 'network.{exc.args[0]}' missing"
        ) from exc
    state = torch.load(directory / WEIGHTS_FILE, weights_only=True, map_location="cpu")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(
            f"checkpoint {directory}: weights do not fit the network: {exc}"
        ) from exc
    model.eval()
    return LoadedPolicy(model, meta, directory)
