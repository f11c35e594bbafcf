"""Multi-agent PPO with a shared actor: MAPPO (centralised critic) or IPPO (local critics).

One readable loop in the CleanRL manner. The environment is any batched multi-agent
environment with the :class:`simulator.env.EdgeEnv` interface: ``reset() -> obs (B, A, D)``,
``step(actions) -> (obs, rewards (B, A), done, info)`` with synchronous episode ends, and
``action_mask() -> (A, action_dim)``.

Data-parallel training: when ``torch.distributed`` is initialised (``torchrun``, gloo on
CPUs), each process steps its own environments with its own seed and gradients are averaged
across processes before every optimiser step, so N processes train one policy on N times the
data. The running normalisers are averaged too, so every replica holds identical parameters.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from policies import imitation
from policies.network import ActorCritic
from policies.ppo import PPOConfig, ValueNormaliser, gae, policy_loss, value_loss


@dataclass
class Rollout:
    obs: torch.Tensor  # (T, B, A, D)
    mask: torch.Tensor  # (T, A, action_dim)
    actions: torch.Tensor  # (T, B, A, action_dim)
    logp: torch.Tensor  # (T, B, A)
    values: torch.Tensor  # (T, B, A) normalised scale
    rewards: torch.Tensor  # (T, B, A)
    dones: torch.Tensor  # (T, B, A)
    next_obs: torch.Tensor  # (B, A, D)
    final_values: torch.Tensor  # (T, B, A) normalised scale: of the observation an episode
    # ended on, where dones says one did (0 elsewhere)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


class Trainer:
    """Owns the model, optimiser and value normaliser; alternates :meth:`collect` and
    :meth:`update`. Completed-episode metrics accumulate in :attr:`finished`."""

    def __init__(self, env, config: PPOConfig, total_updates: int):
        self.env, self.cfg = env, config
        self.model = ActorCritic(
            env.obs_dim, env.action_dim, config.hidden, config.layers, critic=config.algo
        )
        if _distributed():  # start every replica from rank 0's parameters
            for p in self.model.parameters():
                dist.broadcast(p.data, src=0)
        self.optimiser = torch.optim.Adam(
            self.model.parameters(), lr=config.learning_rate, eps=1e-5
        )
        self.value_norm = ValueNormaliser()
        self.total_updates = max(total_updates, 1)
        self.updates = 0
        self.env_steps = 0
        self.finished: list[dict[str, float]] = []
        self.obs = torch.as_tensor(env.reset(), dtype=torch.float32)

    # ------------------------------------------------------------------------------------
    @torch.no_grad()
    def collect(self) -> Rollout:
        env, cfg = self.env, self.cfg
        t_len = cfg.rollout_steps
        b, a = self.obs.shape[:2]
        obs = torch.zeros((t_len, *self.obs.shape))
        masks = torch.zeros((t_len, a, env.action_dim), dtype=torch.bool)
        actions = torch.zeros((t_len, b, a, env.action_dim))
        logp = torch.zeros((t_len, b, a))
        values = torch.zeros((t_len, b, a))
        rewards = torch.zeros((t_len, b, a))
        dones = torch.zeros((t_len, b, a))
        final_values = torch.zeros((t_len, b, a))
        for t in range(t_len):
            mask = torch.as_tensor(env.action_mask())
            dist_ = self.model.distribution(self.obs, mask)
            action = dist_.sample()
            obs[t], masks[t], actions[t] = self.obs, mask, action
            logp[t] = dist_.log_prob(action)
            values[t] = self.model.value(self.obs)
            next_obs, reward, done, info = env.step(action.numpy())
            if cfg.accept_bonus:
                reward = reward + cfg.accept_bonus * _accepted_share(info, b)
            rewards[t] = torch.as_tensor(reward, dtype=torch.float32)
            if done:
                dones[t] = 1.0
                final = torch.as_tensor(next_obs, dtype=torch.float32)
                final_values[t] = self.model.value(final)
                self._record_episode()
                next_obs = env.reset()
            self.obs = torch.as_tensor(next_obs, dtype=torch.float32)
        return Rollout(
            obs, masks, actions, logp, values, rewards, dones, self.obs.clone(), final_values
        )

    def _record_episode(self) -> None:
        m = self.env.episode_metrics()
        self.finished.append(
            {
                "return_per_agent": float(np.mean(m["return_per_agent"])),
                "processed_pct": float(np.mean(m["processed_pct"])),
            }
        )

    def imitate(self, teacher: imitation.Teacher, seed: int) -> float:
        """Clone ``teacher`` into the actor (see :mod:`policies.imitation`); the teacher's
        environment steps count as trained ones. Returns the clone's Hellinger distance."""
        rng = np.random.default_rng(seed)
        data = imitation.teacher_data(self.env, teacher, self.cfg.imitate_steps, 50.0, rng)
        error = imitation.clone(self.model, *data, seed=seed)
        self.env_steps += self.cfg.imitate_steps * self.obs.shape[0]
        self.obs = torch.as_tensor(self.env.reset(), dtype=torch.float32)
        if _distributed():  # every replica continues from rank 0's clone
            for tensor in self.model.state_dict().values():
                dist.broadcast(tensor, src=0)
        return error

    def restart(self, seed: Sequence[int]) -> None:
        """Start new episodes with the environment reseeded by ``seed`` (a resumed run goes
        on from there rather than from the episodes its seed began with)."""
        self.obs = torch.as_tensor(self.env.reset(seed=seed), dtype=torch.float32)

    # ------------------------------------------------------------------------------------
    def update(self, batch: Rollout) -> dict[str, float]:
        cfg = self.cfg
        actor_frozen = bool(cfg.imitate) and self.updates < cfg.critic_warmup
        progress = self.updates / self.total_updates
        if cfg.anneal_lr:
            for group in self.optimiser.param_groups:
                group["lr"] = cfg.learning_rate * (1.0 - progress)
        ent_coef = cfg.entropy_coef(progress)

        with torch.no_grad():
            values = self.value_norm.denormalise(batch.values)
            next_value = self.value_norm.denormalise(self.model.value(batch.next_obs))
            final = None
            if cfg.bootstrap_time_limit:
                final = self.value_norm.denormalise(batch.final_values)
            adv, returns = gae(
                batch.rewards, values, next_value, batch.dones, cfg.gamma, cfg.gae_lambda, final
            )
            self._update_value_norm(returns)
            targets = self.value_norm.normalise(returns)

        t_len, b = batch.obs.shape[:2]
        n = t_len * b
        flat = {
            "obs": batch.obs.reshape(n, *batch.obs.shape[2:]),
            "mask": batch.mask[:, None]
            .expand(t_len, b, *batch.mask.shape[1:])
            .reshape(n, *batch.mask.shape[1:]),
            "actions": batch.actions.reshape(n, *batch.actions.shape[2:]),
            "logp": batch.logp.reshape(n, -1),
            "values": batch.values.reshape(n, -1),
            "adv": adv.reshape(n, -1),
            "targets": targets.reshape(n, -1),
        }
        stats: dict[str, list[float]] = {k: [] for k in ("pg", "vf", "ent", "kl", "clip")}
        for _ in range(cfg.update_epochs):
            # num_minibatches of them, one row longer where the rows do not divide evenly:
            # slices of n // num_minibatches rows left a last, tiny minibatch a whole step.
            for idx in torch.tensor_split(torch.randperm(n), min(cfg.num_minibatches, n)):
                mb = {k: v[idx] for k, v in flat.items()}
                dist_ = self.model.distribution(mb["obs"], mb["mask"])
                new_logp = dist_.log_prob(mb["actions"])
                entropy = dist_.entropy().mean()
                adv_mb = mb["adv"] - mb["adv"].mean()
                if adv_mb.numel() > 1:  # one advantage has no spread: its std is NaN
                    adv_mb = adv_mb / (mb["adv"].std() + 1e-8)
                pg, kl, clip = policy_loss(new_logp, mb["logp"], adv_mb, cfg.clip_coef)
                vf = value_loss(
                    self.model.value(mb["obs"]),
                    mb["values"],
                    mb["targets"],
                    cfg.value_clip,
                    cfg.huber_delta,
                )
                loss = cfg.vf_coef * vf
                if not actor_frozen:
                    loss = loss + pg - ent_coef * entropy
                self.optimiser.zero_grad()
                loss.backward()
                self._average_gradients()
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
                self.optimiser.step()
                for key, value in zip(stats, (pg, vf, entropy, kl, clip), strict=True):
                    stats[key].append(float(value.detach()))

        self._update_obs_norm(batch.obs)
        self.updates += 1
        # Counted once learned from: a rollout cut short by Ctrl-C before its update is not
        # in the model the checkpoint saves.
        self.env_steps += t_len * b
        explained = 1.0 - float(torch.var(returns - values) / (torch.var(returns) + 1e-8))
        out = {f"loss/{k}": float(np.mean(v)) for k, v in stats.items()}
        out.update(
            {
                "explained_variance": explained,
                "entropy_coef": ent_coef,
                "learning_rate": self.optimiser.param_groups[0]["lr"],
            }
        )
        return out

    # ------------------------------------------------------------------------------------
    def _average_gradients(self) -> None:
        if not _distributed():
            return
        world = dist.get_world_size()
        for p in self.model.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
                p.grad /= world

    def _update_value_norm(self, returns: torch.Tensor) -> None:
        self.value_norm.update(_gather(returns))

    def _update_obs_norm(self, obs: torch.Tensor) -> None:
        self.model.obs_norm.update(_gather(obs))

    # ------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything needed to resume (tensors and plain numbers: safe to load)."""
        return {
            "model": self.model.state_dict(),
            "optimiser": self.optimiser.state_dict(),
            "value_norm": self.value_norm.state_dict(),
            "updates": self.updates,
            "env_steps": self.env_steps,
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimiser.load_state_dict(state["optimiser"])
        self.value_norm.load_state_dict(state["value_norm"])
        self.updates = int(state["updates"])
        self.env_steps = int(state["env_steps"])


def _accepted_share(info: dict, num_envs: int) -> np.ndarray:
    """``(B, A)`` share of each agent's arrivals this step that were neither rejected nor
    lost (1 where nothing arrived). Requests lost with a failing node's queue arrived in
    earlier steps and can outnumber this step's: none accepted, not a negative share."""
    arrivals = info["arrivals"].reshape(num_envs, -1)
    lost = info["lost"].reshape(num_envs, -1)
    return np.where(arrivals > 0, np.clip(1.0 - lost / np.maximum(arrivals, 1), 0.0, 1.0), 1.0)


def _gather(x: torch.Tensor) -> torch.Tensor:
    """All processes' samples (for normaliser statistics that must agree across replicas)."""
    if not _distributed():
        return x
    parts = [torch.zeros_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)
