"""The checkpoint format shared by training, evaluation, adaptation and the operator.

A checkpoint is a directory with two files:

* ``policy.pt``: the actor-critic's ``state_dict``, tensors only, so it loads with
  ``torch.load(..., weights_only=True)`` or, without torch, with
  :func:`policies.tensor_archive.load_state_dict` (no pickle of arbitrary objects either way:
  a checkpoint from elsewhere cannot run code);
* ``policy.json``: everything needed to rebuild and trust it: format version, network shape,
  the observation and action spec, scenario, hyperparameters, git revision and the final
  evaluation metrics.

Acting (:func:`load`, what evaluation and the operator use) is numpy only, so this module does
not import torch: the operator process never loads it. Training and resuming get the torch
module from :func:`load_module`; :func:`save` needs torch and imports it when called.

A policy only makes sense on the observation and action layout it was trained on; loading it
against another layout fails with the name of the field that differs.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from policies.actor import NumpyActor, state_layout
from policies.observation import (
    DFAAS_FEATURES,
    MESH_LOCAL_FEATURES,
    MESH_NEIGHBOUR_FEATURES,
    mesh_feature_dim,
)
from policies.tensor_archive import ArchiveError, load_state_dict

if TYPE_CHECKING:
    from policies.network import ActorCritic

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


def network_of(model: ActorCritic) -> dict:
    """The ``network`` section of ``policy.json``: what rebuilds ``model``'s architecture."""
    from torch import nn

    return {
        "obs_dim": model.obs_dim,
        "action_dim": model.action_dim,
        "hidden": model.actor[0].out_features,
        "layers": sum(isinstance(m, nn.Linear) for m in model.actor) - 1,
        "critic": model.critic_kind,
    }


def save(directory: str | Path, model: ActorCritic, meta: dict) -> Path:
    """Write ``policy.pt`` and ``policy.json`` atomically (temp file, then rename)."""
    import torch

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    full = {"format_version": FORMAT_VERSION, "network": network_of(model), **meta}
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

    actor: NumpyActor
    meta: dict = field(default_factory=dict)
    path: Path = Path(".")

    @classmethod
    def from_module(cls, model: ActorCritic) -> LoadedPolicy:
        """The numpy policy of a live torch module (evaluation during training acts exactly
        as the saved checkpoint will)."""
        state = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
        network = network_of(model)
        check_state(state, network, "module")
        return cls(NumpyActor.from_state_dict(state, network["layers"]))

    def __call__(self, obs: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """``obs (..., A, D)``, ``mask (A, K)`` or broadcastable -> float64 ``(..., A, K)``."""
        return self.actor(obs, mask)

    def check(self, action_mode: str, max_degree: int) -> None:
        mode = (self.meta.get("action") or {}).get("mode")
        if mode is not None and mode != action_mode:
            raise CheckpointError(
                f"checkpoint {self.path}: field 'action.mode' is {mode!r} in the checkpoint "
                f"but {action_mode!r} in the environment (simulator.evaluate runs it with "
                f"--action-mode {mode}; simulator.adapt and the operator route per neighbour, "
                "so they need one trained with --action-mode neighbours)"
            )
        check_spec(self.meta, spec_for(action_mode, max_degree), f"checkpoint {self.path}")


BUNDLED = Path(__file__).resolve().parent / "checkpoints"
"""Small default policies shipped with the package, one per scenario family (see the
``checkpoints`` target of the Makefile for the commands that reproduce them)."""


def bundled_for(action_mode: str, max_degree: int, larger: bool = False) -> Path:
    """The bundled checkpoint whose layout fits an environment; with ``larger``, routing per
    neighbour, the one of the smallest degree above if none has this one (a mesh then gives
    each node as many neighbour slots, the extra ones masked, as the operator does); or an
    error listing them."""
    bundled = [
        (path, json.loads(path.read_text())) for path in sorted(BUNDLED.glob(f"*/{META_FILE}"))
    ]
    degrees = sorted(
        m["observation"]["max_degree"]
        for _, m in bundled
        if m["action"]["mode"] == "neighbours" and m["observation"]["max_degree"] >= max_degree
    )
    fitting = [max_degree, *degrees[:1]] if larger and action_mode == "neighbours" else [max_degree]
    for degree in fitting:
        want = spec_for(action_mode, degree)
        for meta_file, meta in bundled:
            if all(meta.get(key) == want[key] for key in ("observation", "action")):
                return meta_file.parent
    found = [
        f"{f.parent.name} ({meta['action']['mode']}, obs {meta['observation']['dim']})"
        for f, meta in bundled
    ]
    raise CheckpointError(
        f"no bundled checkpoint fits action mode {action_mode!r} with max degree {max_degree}; "
        f"bundled: {found or 'none'}; train one with python -m simulator.train"
    )


def neighbour_slots(path: str | Path) -> int | None:
    """How many neighbour slots the checkpoint at ``path`` routes over (None where it routes
    per node, or cannot be read: loading it says why)."""
    try:
        meta = read_meta(resolve(path))
    except CheckpointError:
        return None
    if (meta.get("action") or {}).get("mode") != "neighbours":
        return None
    return int(meta["observation"]["max_degree"])


def resolve(path: str | Path) -> Path:
    """Accept the directory, ``policy.pt`` or ``policy.json``; return the directory."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(
            f"checkpoint {p}: no such file or directory (a checkpoint is a directory with "
            f"{WEIGHTS_FILE} and {META_FILE}, as written by simulator.train)"
        )
    if not p.is_dir() and p.name not in (WEIGHTS_FILE, META_FILE):
        # Its directory's policy.pt is not this file: a snapshot kept beside it (say
        # policy-100k.pt) would be swapped silently for the latest policy.
        raise CheckpointError(
            f"checkpoint {p}: a checkpoint is a directory with {WEIGHTS_FILE} and {META_FILE} "
            f"(as written by simulator.train), named by the directory or one of those two "
            f"files; to use this file, copy it as {WEIGHTS_FILE} with its {META_FILE} into "
            "a directory of its own"
        )
    directory = p if p.is_dir() else p.parent
    for name in (WEIGHTS_FILE, META_FILE):
        if not (directory / name).is_file():
            raise CheckpointError(
                f"checkpoint {p}: {directory / name} not found (a checkpoint is a directory "
                f"with {WEIGHTS_FILE} and {META_FILE}, as written by simulator.train)"
            )
    return directory


def _positive(value: Any, integer: bool) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return value >= 1 if integer else math.isfinite(value) and value > 0


def _check_sections(meta: dict, directory: Path) -> None:
    """The sections besides ``network`` that readers of a checkpoint rely on, where present:
    what it observes and how it acts (a per-neighbour policy must say for how many
    neighbours), and the ``environment`` an operator reads its step and reject price from.
    A field off its type is named here, not met later as a crash."""

    def fail(field: str, value: Any, want: str) -> CheckpointError:
        return CheckpointError(f"checkpoint {directory}: field '{field}' is {value!r}, {want}")

    for name in ("observation", "action", "environment"):
        if name in meta and not isinstance(meta[name], dict):
            raise fail(name, meta[name], "expected an object")
    observation, action = meta.get("observation", {}), meta.get("action", {})
    for name, section in (("observation", observation), ("action", action)):
        if section and not _positive(section.get("dim"), integer=True):
            raise fail(f"{name}.dim", section.get("dim"), "expected a positive integer")
    if action and not isinstance(action.get("mode"), str):
        raise fail("action.mode", action.get("mode"), "expected a string")
    degree = observation.get("max_degree")
    if action.get("mode") == "neighbours" and not _positive(degree, integer=True):
        raise fail("observation.max_degree", degree, "expected a positive integer")
    environment = meta.get("environment", {})
    for key in ("step_seconds", "reject_penalty"):
        if key in environment and not _positive(environment[key], integer=False):
            raise fail(f"environment.{key}", environment[key], "expected a positive number")


def read_meta(directory: Path) -> dict:
    """``policy.json``, checked for its format version, a usable ``network`` section and the
    sections readers use besides (see ``_check_sections``)."""
    try:
        meta = json.loads((directory / META_FILE).read_text())
    except OSError as exc:
        message = f"checkpoint {directory}: {META_FILE} cannot be read: {exc}"
        raise CheckpointError(message) from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise CheckpointError(f"checkpoint {directory}: {META_FILE} is not JSON: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        version = meta.get("format_version") if isinstance(meta, dict) else None
        raise CheckpointError(
            f"checkpoint {directory}: field 'format_version' is "
            f"{version!r}, this code reads {FORMAT_VERSION}"
        )
    net = meta.get("network")
    if not isinstance(net, dict):
        raise CheckpointError(f"checkpoint {directory}: field 'network' missing")
    for key in ("obs_dim", "action_dim", "hidden", "layers", "critic"):
        if key not in net:
            raise CheckpointError(f"checkpoint {directory}: field 'network.{key}' missing")
        value = net[key]
        ok = (
            value in ("mappo", "ippo")
            if key == "critic"
            else isinstance(value, int) and not isinstance(value, bool) and value >= 1
        )
        if not ok:
            want = "'mappo' or 'ippo'" if key == "critic" else "a positive integer"
            raise CheckpointError(
                f"checkpoint {directory}: field 'network.{key}' is {value!r}, expected {want}"
            )
    _check_sections(meta, directory)
    for name, key in (("observation", "obs_dim"), ("action", "action_dim")):
        dim = meta.get(name, {}).get("dim")
        if dim is not None and dim != net[key]:
            raise CheckpointError(
                f"checkpoint {directory}: field 'network.{key}' is {net[key]}, but "
                f"'{name}.dim' says the policy {name.replace('observation', 'observe')}s "
                f"{dim} numbers: the network was not trained for this {name}"
            )
    return meta


def check_state(state: dict[str, np.ndarray], network: dict, where: str) -> None:
    """Raise naming the first weight that is missing, unexpected, misshapen or not floating
    point (the strictness of torch's ``load_state_dict``)."""
    if network["layers"] > len(state):  # each layer has weights: no layout of millions
        raise CheckpointError(
            f"{where}: field 'network.layers' is {network['layers']}, but the weights hold "
            f"only {len(state)} tensors"
        )
    layout = state_layout(
        network["obs_dim"],
        network["action_dim"],
        network["hidden"],
        network["layers"],
        network["critic"],
    )
    for key, shape in layout.items():
        if key not in state:
            raise CheckpointError(f"{where}: field {key!r} missing from the weights")
        have = state[key]
        if tuple(have.shape) != shape:
            raise CheckpointError(
                f"{where}: field {key!r} has shape {tuple(have.shape)} but the network in "
                f"{META_FILE} needs {shape}"
            )
        if not np.issubdtype(have.dtype, np.floating):
            raise CheckpointError(f"{where}: field {key!r} is {have.dtype}, not floating point")
    unexpected = sorted(set(state) - set(layout))
    if unexpected:
        raise CheckpointError(
            f"{where}: field {unexpected[0]!r} is not part of the network in {META_FILE}"
        )


def load(path: str | Path) -> LoadedPolicy:
    """The numpy policy of a checkpoint (directory, ``policy.pt`` or ``policy.json``), read
    without torch and without running anything from the file."""
    directory = resolve(path)
    meta = read_meta(directory)
    where = f"checkpoint {directory}"
    try:
        state = load_state_dict(directory / WEIGHTS_FILE)
    except ArchiveError as exc:
        raise CheckpointError(f"{where}: {exc}") from exc
    check_state(state, meta["network"], where)
    return LoadedPolicy(
        NumpyActor.from_state_dict(state, meta["network"]["layers"]), meta, directory
    )


def load_module(path: str | Path) -> ActorCritic:
    """The torch actor-critic of a checkpoint, for training and inspection (weights only)."""
    import pickle

    import torch

    from policies.network import ActorCritic

    directory = resolve(path)
    net = read_meta(directory)["network"]
    model = ActorCritic(
        net["obs_dim"], net["action_dim"], net["hidden"], net["layers"], net["critic"]
    )
    try:
        state = torch.load(directory / WEIGHTS_FILE, weights_only=True, map_location="cpu")
        model.load_state_dict(state)
    except (RuntimeError, pickle.UnpicklingError) as exc:
        raise CheckpointError(
            f"checkpoint {directory}: weights do not fit the network: {exc}"
        ) from exc
    return model.eval()
