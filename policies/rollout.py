"""Multi-agent rollout: improve the trained policy's routing by lookahead on the system model.

Bertsekas's agent-by-agent scheme (arXiv 1910.00120). Agents are visited one at a time;
agent ``k`` tries candidate moves of its own weights while agents before it keep what they
chose and agents after it keep the base policy's action. Every candidate is scored by one
interval under that joint routing and then ``horizon`` intervals in which *every* agent
follows the base policy, all on the model (:class:`policies.model_env.ModelEnv`). The
candidates of one agent form one batch, so each lookahead step is one model evaluation.

Visiting every agent in turn costs one model call per agent and lookahead step, and with
tens of agents the per-call overhead, not arithmetic, dominates. So a decision runs in
rounds of two batched calls. The *screen* scores the candidates of all agents at once, each
agent deviating alone from the current joint routing, by default over the move's own
interval only (a ranking, not a verdict). Agents whose best move beats the
current routing by the margin are then taken in order of their gain, and every prefix of
that order (the first agent's move; the first two; ...) is scored as one joint routing in a
second batch: agent ``k``'s move is judged with the moves of the agents before it in place,
and the best prefix, scored over the full horizon, is kept. The next round screens again
from there, so an agent whose move stopped paying once an earlier one moved (two nodes
shedding load onto the same neighbour) chooses again against what the others did. On small
meshes two rounds already find a lower predicted cost than one sequential pass over every
agent, in less time (``benchmarks/decision.py``).

The search may also start from the last decision, where that is predicted cheaper than the
base policy's action: after a change the base action can lie far from a good routing, and a
few rounds from it reach less far than the same rounds from where the last interval got to.
A third start was measured and not kept: the fluid optimum of the estimated state
(:func:`policies.oracle.solve` on the forecast and the measured capacities). On the surge
(``python -m simulator.adapt --scenario mesh-10x3-surge --seed 0``) rollout then cost 0.94
times the oracle (planning nodes up to 0.95 busy) or 0.99 (up to 0.85) against 0.87, and
missed 27 or 32 targets after the third cycle against 20. The solver alone also took about
0.7 s per decision on 30 agents.

Each accepted move lowers the joint routing's predicted cost, so under an exact model the
decision is never worse than the base policy. The candidates grow linearly with the number
of agents, not exponentially as a joint search would.

The reference implementation scored 9 candidates of one agent by a single model step and a
stale critic, and barely adapted; simulating the base policy's own reaction over several
steps is what lets the lookahead see that, for example, shedding load onto a neighbour
only pays if the neighbour's own agents do not push it back.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from policies.model_env import MeshState, ModelEnv
from policies.observation import mesh_observation
from policies.system_model import LatencyTable

Policy = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""``policy(obs (..., A, D), mask (A, K+2)) -> weights (..., A, K+2)``, deterministic."""


class SettingError(ValueError):
    """A rollout setting out of its range; ``name`` is the field, for callers (a command
    line, a resource) to point at their own spelling of it."""

    def __init__(self, name: str, message: str):
        super().__init__(message)
        self.name = name


@dataclass(frozen=True)
class RolloutSettings:
    """Knobs of a decision (the RoutingPolicy resource exposes the same ones).

    Attributes:
        horizon: intervals of base-policy play after the candidate's interval.
        steps: sizes of the candidate moves: weight mass shifted towards, or away from, one
            entry of [local, neighbours..., reject].
        margin: relative predicted gain an agent's move must bring to replace its action.
        discount: weight of later lookahead intervals.
        samples: arrival futures per candidate (1: the forecast itself); more samples score
            candidates on average over forecast errors of relative size ``arrival_noise``.
        arrival_noise: relative spread of the sampled arrival futures.
        seed: seeds the sampled futures.
        screen_horizon: lookahead of the screen that ranks every agent's candidate moves
            (None: ``horizon``); the joint moves it proposes are then scored with
            ``horizon``. 0, the move's own interval, was measured both cheaper and better:
            over a long screen the base policy's reaction undoes a lone agent's move, so
            moves that pay only together never reach the joint scoring.
        rounds: screen-then-prefix rounds at most (each starts from the previous round's
            routing; a round in which no agent moves ends the decision). After a surge or a
            node failure the mesh needs several moves that only pay together: 4 rounds
            came clearly closer to the oracle's cost there than 2 (by 8 and 37 %,
            ``python -m simulator.adapt --rounds``); 8 did no better.
        batch_rows: joint routings scored per model call in a screen; bounds memory (each
            row holds every agent's observation for every lookahead step).
        tail: end every score with a terminal cost: the last lookahead interval's cost,
            taken to last for ever (weight ``discount ** (horizon + 1) / (1 - discount)``),
            so a routing is also judged by where the base policy leaves the mesh, not only
            by the intervals the lookahead sees. Off: measured with ``python -m
            simulator.adapt --tail`` on the four change scenarios, seeds 0-3 (15 runs paired
            with the same runs without it), it gave 27 SLO violations after the third cycle
            against 4, 191 missed targets over every interval after it against 85, and a
            mean cost over the oracle of 0.76 against 0.68. Most likely because after a
            change the base policy's own play sets the end state whatever the first move
            was: the tail, weighted 5.3 against the lookahead's 4.7 at the default horizon
            and discount, then mostly adds a cost all candidates share, and moves' relative
            gains shrink under the margin.
    """

    horizon: int = 5
    steps: tuple[float, ...] = (0.1, 0.3)
    margin: float = 0.01
    discount: float = 0.9
    samples: int = 1
    arrival_noise: float = 0.1
    seed: int = 0
    screen_horizon: int | None = 0
    rounds: int = 4
    batch_rows: int = 2048
    tail: bool = False

    def __post_init__(self) -> None:
        checks = (
            ("horizon", self.horizon >= 0, "must be >= 0"),
            ("steps", self.steps and all(0 < x < 1 for x in self.steps), "must lie in (0, 1)"),
            ("margin", 0 <= self.margin < 1, "must lie in [0, 1)"),
            ("samples", self.samples >= 1, "must be >= 1"),
            ("screen_horizon", (self.screen_horizon or 0) >= 0, "must be >= 0"),
            ("rounds", self.rounds >= 1, "must be >= 1"),
            ("batch_rows", self.batch_rows >= 1, "must be >= 1"),
            (
                "discount",
                not self.tail or 0 <= self.discount < 1,
                "must lie in [0, 1) for a rollout tail",
            ),
        )
        for name, valid, rule in checks:
            if not valid:
                raise SettingError(name, f"rollout {name} {rule}, got {getattr(self, name)}")


@dataclass(frozen=True)
class Decision:
    """What rollout chose, what the base policy would have done, and why."""

    weights: np.ndarray  # (A, K+2) to apply
    base_weights: np.ndarray  # (A, K+2) the base policy's action
    predicted_cost: float  # per request, discounted over the lookahead
    base_predicted_cost: float
    changed_agents: tuple[int, ...]
    fallback: str | None  # why the base action was kept as a whole, if it was
    decision_ms: float
    reused: bool = False  # the previous decision, kept because the inputs barely moved

    @property
    def predicted_gain(self) -> float:
        return 1.0 - self.predicted_cost / max(self.base_predicted_cost, 1e-12)


def candidates(action: np.ndarray, mask: np.ndarray, steps) -> np.ndarray:
    """``(C, K+2)`` moves around ``action``: itself first, then for each valid entry and step
    ``d``, ``d`` of the mass moved onto that entry, and ``d`` moved off it (when it has it)."""
    valid = np.flatnonzero(mask)
    out = [action]
    for j in valid:
        unit = np.zeros_like(action)
        unit[j] = 1.0
        for d in steps:
            out.append((1.0 - d) * action + d * unit)
            if action[j] >= d:
                rest = np.where(mask, action, 0.0)
                rest[j] = 0.0
                if rest.sum() > 0:
                    moved = action.copy()
                    moved[j] -= d
                    moved += d * rest / rest.sum()
                    out.append(moved)
    return np.stack(out)


OUTSIDE_DATA = "the base routing leads outside the model's data"


def routable(weights: np.ndarray | None, mask: np.ndarray) -> bool:
    """Whether ``weights`` ``(A, K+2)`` is a routing of the mesh ``mask`` describes: the same
    agents and slots, and nothing on a masked entry."""
    if weights is None or weights.shape != mask.shape:
        return False
    return not np.any(np.where(mask, 0.0, weights) > 1e-9)


class Rollout:
    """Decides routings for one mesh with a base policy, a model and settings."""

    def __init__(self, env: ModelEnv, policy: Policy, settings: RolloutSettings | None = None):
        self.env = env
        self.policy = policy
        self.settings = settings or RolloutSettings()
        self._rng = np.random.default_rng(self.settings.seed)

    def base_action(self, state: MeshState) -> np.ndarray:
        obs = mesh_observation(self.env.topology, state.telemetry)
        return self.policy(obs, self.env.action_mask(state))[0]

    def decide(
        self,
        state: MeshState,
        table: LatencyTable | None,
        fallback: str | None = None,
        base: np.ndarray | None = None,
        incumbent: np.ndarray | None = None,
    ) -> Decision:
        """The rollout routing for ``state``. With ``fallback`` set (e.g. the model is not
        trusted), or when the base routing itself leads outside the model's data, the base
        action is returned unchanged with the reason. ``base`` is the base policy's action
        for ``state`` when the caller has it already.

        ``incumbent`` (say, the last decision) is a second place for the search to start:
        after a change the base action can lie far from a good routing, and the rounds of
        moves from it reach less far than the same rounds from where the last decision got
        to. It is scored with the base action in one model call, and the search starts from
        it only if it is predicted cheaper by the margin, so the decision is still never
        predicted worse than the base action. One that routes onto a masked entry (a node
        that went down) is ignored."""
        start = time.perf_counter()
        mask = self.env.action_mask(state)
        base = self.base_action(state) if base is None else base
        if fallback is not None:
            ms = 1000.0 * (time.perf_counter() - start)
            return Decision(base, base, float("nan"), float("nan"), (), fallback, ms)
        current, current_score = base.copy(), float("nan")
        changed: list[int] = []
        if self.leaves_data(state, table, base):
            fallback, base_score = OUTSIDE_DATA, current_score
        else:
            futures = self._futures(state)
            starts = [base] if not routable(incumbent, mask) else [base, incumbent]
            scores = self._score(state, np.stack(starts), mask, table, futures)
            base_score = current_score = float(scores[0])
            if len(starts) > 1 and scores[1] < base_score * (1.0 - self.settings.margin):
                current, current_score = incumbent.copy(), float(scores[1])
                changed = np.flatnonzero(np.any(current != base, axis=1)).tolist()
            for _ in range(self.settings.rounds):
                current, current_score, moved = self._round(
                    state, current, current_score, mask, table, futures
                )
                changed += moved
                if not moved:
                    break
        if not np.isfinite(base_score):
            base_score = float("nan")
        return Decision(
            weights=current,
            base_weights=base,
            predicted_cost=current_score if changed else base_score,
            base_predicted_cost=base_score,
            changed_agents=tuple(dict.fromkeys(changed)),
            fallback=fallback,
            decision_ms=1000.0 * (time.perf_counter() - start),
        )

    def predicted_gain(
        self, state: MeshState, weights: np.ndarray, base: np.ndarray, table: LatencyTable
    ) -> float:
        """How much cheaper routing by ``weights`` is predicted to be than by ``base`` over
        the next interval (1 - the ratio of their costs per request), under the arrival
        forecast; NaN where either leaves the model's data. One model step: cheap enough to
        ask every interval whether a kept decision still holds."""
        mask = self.env.action_mask(state)
        pair = np.stack([weights, base])
        cost, base_cost = self._score(state, pair, mask, table, None, horizon=0)
        if not (np.isfinite(cost) and np.isfinite(base_cost)):
            return float("nan")  # not 1.0: a base that cannot be priced is no gain of 100%
        return float(1.0 - cost / max(base_cost, 1e-12))

    def leaves_data(self, state: MeshState, table: LatencyTable, weights: np.ndarray) -> bool:
        """Whether routing by ``weights`` leads outside the model's data in the next interval
        (under the arrival forecast): no decision is made on the model there."""
        return not bool(self.env.step(state, weights[None], table).known[0])

    def _round(self, state, current, current_score, mask, table, futures):
        """One screen, then the best prefix of the promising agents' moves in order of gain.
        Returns the new joint routing, its score and the agents that moved."""
        margin = 1.0 - self.settings.margin
        reference, screened = self._screen(state, current, mask, table, futures)
        promising = sorted(
            (float(scores.min()), agent)
            for agent, (_, scores) in screened.items()
            if scores.min() < reference * margin
        )
        if not promising:
            return current, current_score, []
        prefixes = np.repeat(current[None], len(promising), axis=0)
        for i, (_, agent) in enumerate(promising):
            options, scores = screened[agent]
            prefixes[i:, agent] = options[int(np.argmin(scores))]
        scores = self._score(state, prefixes, mask, table, futures)
        best = int(np.argmin(scores))
        if not scores[best] < current_score * margin:
            return current, current_score, []
        return prefixes[best], float(scores[best]), [agent for _, agent in promising[: best + 1]]

    def _screen(self, state, current, mask, table, futures) -> tuple[float, dict]:
        """Every agent's candidate moves away from ``current``, each scored over the screen
        horizon with the other agents kept, in batches of ``batch_rows``. Returns the score
        of ``current`` itself over that horizon and ``{agent: (options, scores)}``."""
        agents, options = [-1], [current[:1]]  # row 0: current itself (agent -1: no move)
        for agent in self._order(state, mask):
            moves = candidates(current[agent], mask[agent], self.settings.steps)[1:]
            agents += [int(agent)] * len(moves)
            options.append(moves)
        options = np.concatenate(options)
        agents = np.asarray(agents)
        scores = np.empty(len(options))
        s = self.settings
        for lo in range(0, len(options), s.batch_rows):
            hi = min(lo + s.batch_rows, len(options))
            joint = np.repeat(current[None], hi - lo, axis=0)
            moving = np.flatnonzero(agents[lo:hi] >= 0)
            joint[moving, agents[lo:hi][moving]] = options[lo:hi][moving]
            scores[lo:hi] = self._score(state, joint, mask, table, futures, self._screen_horizon())
        found = {int(a): (options[agents == a], scores[agents == a]) for a in set(agents[1:])}
        return float(scores[0]), found

    def _screen_horizon(self) -> int:
        s = self.settings
        return s.horizon if s.screen_horizon is None else min(s.screen_horizon, s.horizon)

    def _order(self, state: MeshState, mask: np.ndarray) -> np.ndarray:
        """Agents with a choice, busiest first: they move the most load."""
        arrivals = np.asarray(state.arrivals)
        choice = (mask.sum(axis=1) > 1) & (arrivals > 0)
        order = np.argsort(-arrivals, kind="stable")
        return order[choice[order]]

    def _futures(self, state: MeshState) -> np.ndarray | None:
        """``(samples, A)`` sampled arrival futures, or None to use the forecast."""
        s = self.settings
        if s.samples == 1:
            return None
        noise = self._rng.lognormal(0.0, s.arrival_noise, (s.samples, len(state.arrivals)))
        return np.asarray(state.arrivals)[None] * noise

    def _act(self, obs: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """The base policy's action ``(C, A, K+2)`` for observations ``(C, A, D)``, the actor
        run only where an agent sees something other than it sees in row 0. A candidate's
        move reaches one hop further per interval, so on a large mesh most agents of most
        rows see exactly what they see in the first row, and the actor's matrix products are
        most of a decision's arithmetic."""
        first = self.policy(obs[:1], mask)
        differs = (obs[1:] != obs[:1]).any(axis=-1)  # (C-1, A)
        rows, agents = np.nonzero(differs)
        out = np.repeat(first, len(obs), axis=0)
        if len(rows):
            out[rows + 1, agents] = self.policy(obs[rows + 1, agents], mask[agents])
        return out

    def _score(self, state, joint, mask, table, futures, horizon=None) -> np.ndarray:
        """``(C,)`` discounted mean predicted cost per request of each joint routing followed
        by ``horizon`` (default: the settings') intervals of the base policy; +inf where the
        first interval leaves the model's data."""
        s = self.settings
        horizon = s.horizon if horizon is None else horizon
        c = len(joint)
        arrivals = None
        if futures is not None:
            joint = np.repeat(joint, len(futures), axis=0)
            arrivals = np.tile(futures, (c, 1))
        pred = self.env.step(state, joint, table, arrivals=arrivals)
        known = pred.known
        total, norm = pred.cost.copy(), 1.0
        for h in range(1, horizon + 1):
            obs = mesh_observation(self.env.topology, pred.telemetry)
            weights = self._act(obs, mask)
            pred = self.env.step(state, weights, table, pred.backlog, arrivals)
            total += s.discount**h * pred.cost
            norm += s.discount**h
        if s.tail:
            weight = s.discount ** (horizon + 1) / (1.0 - s.discount)
            total += weight * pred.cost
            norm += weight
        total = np.where(known, total / norm, np.inf)
        return total.reshape(c, -1).mean(axis=1)
