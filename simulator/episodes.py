"""Running policies over batches of episodes: the one loop that evaluation, comparison and
benchmarks share."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from tqdm import tqdm

from policies import checkpoint
from policies.baselines import Policy, PolicyContext, PolicyError, make_heuristic
from simulator.env import ActionMode, EdgeEnv, default_action_mode
from simulator.fluid import oracle_schedule
from simulator.scenario import Scenario

BOUNDS = ("global-node",)


def policy_context(env: EdgeEnv) -> PolicyContext:
    """Each agent's node's capacity and queue (agents are node-major, one per service): nodes
    differ, and a heuristic sized by one node would overfill the smaller ones."""
    services = env.topology.num_services
    nodes = env.scenario.nodes
    work = float(np.mean(env.mean_cost))
    return PolicyContext(
        action_mode=env.action_mode,
        max_degree=env.topology.max_degree,
        local_capacity=np.repeat([math.floor(n.cpu / work) for n in nodes], services),
        queue_capacity=np.repeat([float(n.queue_capacity) for n in nodes], services),
        services=services,
    )


def is_checkpoint(policy: str) -> bool:
    """Whether ``policy`` names a checkpoint rather than a heuristic: a path (no heuristic's
    name has a '/'), a weights or meta file, or a directory. A path that does not exist is
    one too, so that it is reported as the missing checkpoint it is."""
    return "/" in policy or policy.endswith((".pt", ".json")) or Path(policy).is_dir()


def fitted_scenario(
    scenario: Scenario, policy: str | Policy, action_mode: ActionMode | None = None
) -> Scenario:
    """``scenario`` as ``policy`` sees it: a checkpoint (the bundled default among them)
    trained on a mesh of higher degree routes this one with its extra neighbour slots
    masked, as the operator runs it on a smaller mesh. Anything else sees it as it is; so
    does a checkpoint that cannot be read (building the policy says why)."""
    if (
        not isinstance(policy, str)
        or (action_mode or default_action_mode(scenario)) != "neighbours"
    ):
        return scenario
    if policy == "default":
        try:
            policy = str(checkpoint.bundled_for("neighbours", scenario.max_degree, larger=True))
        except checkpoint.CheckpointError:
            return scenario
    elif not is_checkpoint(policy):
        return scenario
    slots = checkpoint.neighbour_slots(policy)
    return scenario.with_slots(slots) if slots and slots > scenario.max_degree else scenario


def build_policy(policy: str | Policy, env: EdgeEnv, seed: int) -> Policy:
    """Whatever ``policy`` names, ready to act on ``env``: a policy object as is;
    ``default``, the bundled checkpoint that fits; a checkpoint path (directory, ``policy.pt``
    or ``policy.json``), checked against the environment's layout; a heuristic by name; or
    ``oracle``, the fluid-model optimum of the current piece of the scenario (re-solved after
    every event), played open-loop."""
    if callable(policy):
        return policy
    if policy == "default":
        try:
            policy = str(checkpoint.bundled_for(env.action_mode, env.topology.max_degree))
        except checkpoint.CheckpointError as exc:
            raise PolicyError(str(exc)) from exc
    if is_checkpoint(policy):
        try:
            loaded = checkpoint.load(policy)
            loaded.check(env.action_mode, env.topology.max_degree)
        except checkpoint.CheckpointError as exc:
            raise PolicyError(str(exc)) from exc
        return loaded
    if policy != "oracle":
        others = " (or a checkpoint directory, 'default' or 'oracle')"
        return make_heuristic(policy, policy_context(env), seed=seed, others=others)
    if env.action_mode != "neighbours":
        raise PolicyError("policy 'oracle' routes per neighbour: use --action-mode neighbours")
    try:
        schedule = oracle_schedule(env.scenario, seed=seed)
    except ValueError as exc:
        raise PolicyError(f"policy 'oracle': {exc}") from exc

    def act(obs: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return np.broadcast_to(schedule.weights_at(env.t), (*obs.shape[:2], env.action_dim))

    return act


def episode_batch(num_envs: int, episodes: int) -> int:
    """How many episodes run at once: ``num_envs``, but never more than are asked for (the
    figure reports give, as it decides which episodes are drawn)."""
    return max(1, min(num_envs, episodes))


def run_episodes(
    scenario: Scenario,
    policy: str | Policy,
    episodes: int,
    seed: int,
    num_envs: int = 100,
    action_mode: ActionMode | None = None,
    progress: bool = False,
) -> dict[str, np.ndarray]:
    """Per-episode metrics of ``policy`` over ``episodes`` episodes (arrays of length episodes)."""
    if policy == "global-node":
        scenario, policy = scenario.pooled(), "apl"
    scenario = fitted_scenario(scenario, policy, action_mode)
    batch = episode_batch(num_envs, episodes)
    env = EdgeEnv(scenario, num_envs=batch, action_mode=action_mode, seed=seed)
    act = build_policy(policy, env, seed)
    results: dict[str, list[np.ndarray]] = {}
    rounds = math.ceil(episodes / batch)
    bar = tqdm(
        total=rounds * env.steps,
        desc=f"{scenario.name} {policy if isinstance(policy, str) else 'policy'}",
        disable=not progress,
        unit="step",
        leave=False,
    )
    for _ in range(rounds):
        obs, done = env.reset(), False
        while not done:
            obs, _, done, _ = env.step(act(obs, env.action_mask()))
            bar.update(1)
        for key, value in env.episode_metrics().items():
            results.setdefault(key, []).append(value)
    bar.close()
    return {k: np.concatenate(v)[:episodes] for k, v in results.items()}


def summarise(per_episode: dict[str, np.ndarray]) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, values in per_episode.items():
        known = values[~np.isnan(values)]  # NaN: no such figure that episode (no request)
        out[key] = float(known.mean()) if known.size else float("nan")
        out[f"{key}_std"] = float(known.std()) if known.size else float("nan")
    out["episodes"] = len(next(iter(per_episode.values())))
    return out
