"""PettingZoo ``ParallelEnv`` view of one environment, for MARL libraries that expect it.

It wraps :class:`simulator.env.EdgeEnv` with ``num_envs=1``; the batched API stays the fast
path for training. Spaces are cached per agent, as PettingZoo's API test requires.
"""

from __future__ import annotations

import functools
from typing import ClassVar

import numpy as np
from gymnasium import spaces
from pettingzoo import ParallelEnv

from simulator.env import ActionMode, EdgeEnv
from simulator.scenario import Scenario, load_scenario


class EdgeParallelEnv(ParallelEnv):
    metadata: ClassVar[dict] = {"name": "marl_edge_routing_v0", "render_modes": []}

    def __init__(
        self,
        scenario: Scenario | str = "dfaas-paise25",
        action_mode: ActionMode | None = None,
        seed: int | None = None,
    ):
        """``seed`` seeds the workloads for trainers that reset without one (RLlib does)."""
        self.scenario = load_scenario(scenario) if isinstance(scenario, str) else scenario
        self._env = EdgeEnv(self.scenario, num_envs=1, action_mode=action_mode, seed=seed)
        self.possible_agents = list(self._env.agents)
        self.agents: list[str] = []

    @functools.cache  # noqa: B019 - one cached space per agent is the PettingZoo contract
    def observation_space(self, agent: str) -> spaces.Box:
        return spaces.Box(low=-np.inf, high=np.inf, shape=(self._env.obs_dim,), dtype=np.float32)

    @functools.cache  # noqa: B019
    def action_space(self, agent: str) -> spaces.Box:
        return spaces.Box(low=0.0, high=1.0, shape=(self._env.action_dim,), dtype=np.float32)

    def reset(self, seed: int | None = None, options: dict | None = None):
        obs = self._env.reset(seed=seed)[0]
        self.agents = list(self.possible_agents)
        return self._by_agent(obs), {a: {} for a in self.agents}

    def step(self, actions: dict[str, np.ndarray]):
        batch = np.stack([np.asarray(actions[a], dtype=np.float64) for a in self.possible_agents])[
            None
        ]
        obs, rewards, done, _ = self._env.step(batch)
        result = (
            self._by_agent(obs[0]),
            {a: float(r) for a, r in zip(self.possible_agents, rewards[0], strict=True)},
            # Episodes end by their length alone: a truncation, which a trainer bootstraps
            # past, never a termination, whose future would be worth nothing.
            {a: False for a in self.possible_agents},
            {a: done for a in self.possible_agents},
            {a: {} for a in self.possible_agents},
        )
        if done:
            self.agents = []
        return result

    def state(self) -> np.ndarray:
        return self._env.state()[0]

    def _by_agent(self, obs: np.ndarray) -> dict[str, np.ndarray]:
        return {a: obs[i] for i, a in enumerate(self.possible_agents)}
