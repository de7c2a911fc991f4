"""`llmctl align --method grpo` on the shared loop: each step samples a group of completions per prompt with llmctl's
own generation engine (the code path of `llmctl generate`, seeded by (train.seed, step), so --resume is exact), scores
them (a reward function or a reward model), normalizes the rewards within each group, and trains on the completion
tokens with TRL's clipped GRPO loss, token-level over the step ("dapo"), plus beta times the k3 KL to the reference.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from llmctl import ui
from llmctl.errors import ConfigError, DataError
from llmctl.preference import same_tokenizer
from llmctl.rewards import Prompt, group_advantages, score
from llmctl.training.batch import IGNORE, Batch

if TYPE_CHECKING:
    from llmctl.align import AlignConfig

RL_METHODS = ("grpo", "ppo")
EVAL_PROMPTS = 50  # held-out prompts whose completions are scored before and after
EVAL_SAMPLES = 4   # ppo: completions sampled per held-out prompt


@dataclass
class RLSettings:
    group_size: int = 8            # completions sampled per prompt (TRL's num_generations); data.batch_size counts completions
    beta: float = 0.0              # weight of the k3 KL to the reference in the loss; 0: no reference is kept
    epsilon: float = 0.2           # the ratio is clipped to [1 - epsilon, 1 + epsilon_high]
    epsilon_high: float = 0.0      # 0: epsilon
    max_tokens: int = 64           # most new tokens per completion
    temperature: float = 1.0       # sampling settings of the completions (as `llmctl generate`'s flags)
    top_p: float = 1.0
    top_k: int = 0
    reward_fn: str = ""            # exact, format or module:function; or reward: a reward model folder
    reward: str = ""
    on_reward_error: str = "stop"  # stop, or skip: a completion whose reward fails gets none (advantage 0)
    kl_coef: float = 0.05          # ppo: the KL penalty to the reference, in the per-token reward (as TRL's PPO)
    ppo_epochs: int = 4            # ppo: optimizer steps on each rollout (train.steps counts optimizer steps)
    vf_coef: float = 0.1           # ppo: weight of the value loss
    cliprange_value: float = 0.2   # ppo: the value prediction is clipped to old value +- this
    gamma: float = 1.0             # ppo: GAE's discount and lambda
    lam: float = 0.95

    def problems(self) -> list[str]:
        out = []
        if self.group_size < 2:
            out.append(f"rl.group_size={self.group_size}: must be at least 2 (advantages compare completions of one prompt).")
        if self.beta < 0 or self.epsilon <= 0 or self.epsilon_high < 0:
            out.append(f"rl.beta={self.beta}, rl.epsilon={self.epsilon}, rl.epsilon_high={self.epsilon_high}: "
                       "beta and epsilon_high must be 0 or more, epsilon more than 0.")
        if self.max_tokens < 1:
            out.append(f"rl.max_tokens={self.max_tokens}: must be at least 1.")
        if not self.temperature > 0:
            out.append(f"rl.temperature={self.temperature}: must be more than 0 (completions of a group must differ).")
        if not 0 < self.top_p <= 1 or self.top_k < 0:
            out.append(f"rl.top_p={self.top_p}, rl.top_k={self.top_k}: top_p in (0, 1], top_k 0 or more.")
        if self.kl_coef < 0 or self.vf_coef < 0 or self.cliprange_value <= 0 or self.ppo_epochs < 1:
            out.append(f"rl.kl_coef={self.kl_coef}, rl.vf_coef={self.vf_coef}, rl.cliprange_value={self.cliprange_value}, "
                       f"rl.ppo_epochs={self.ppo_epochs}: coefficients 0 or more, the clip range above 0, epochs 1 or more.")
        if not (0 <= self.gamma <= 1 and 0 <= self.lam <= 1):
            out.append(f"rl.gamma={self.gamma}, rl.lam={self.lam}: must be in [0, 1].")
        if self.on_reward_error not in ("stop", "skip"):
            out.append(f"--on-reward-error {self.on_reward_error}: expected stop or skip.")
        return out


def check_rl(cfg: AlignConfig) -> list[str]:
    """The problems of a GRPO or PPO configuration (beside the groups every align run checks)."""
    s, method = cfg.rl, cfg.pref.method
    out = s.problems()
    if method == "ppo":
        if not s.reward or s.reward_fn:
            out.append("--method ppo scores with a reward model: pass --reward RM_DIR (and no --reward-fn).")
        k = s.ppo_epochs
        if cfg.train.save_every % k or cfg.train.stop_at % k or (cfg.train.steps > 0 and cfg.train.steps % k):
            out.append(f"train.steps={cfg.train.steps}, train.save_every={cfg.train.save_every}, train.stop_at="
                       f"{cfg.train.stop_at}: must be multiples of rl.ppo_epochs={k} (a checkpoint falls between "
                       "rollouts, so --resume is exact).")
    else:
        if bool(s.reward_fn) == bool(s.reward):
            out.append("--method grpo needs exactly one of --reward-fn NAME|module:function and --reward RM_DIR.")
        if cfg.data.batch_size % s.group_size:
            out.append(f"data.batch_size={cfg.data.batch_size}: counts completions a step; it must be a multiple of "
                       f"--group-size {s.group_size}.")
    if cfg.ref or cfg.precompute_ref:
        out.append(f"--ref/--precompute-ref with --method {method}: the reference is the starting model (with --lora, "
                   "its adapters off).")
    return out


def gae(rewards: np.ndarray, values: np.ndarray, mask: np.ndarray, gamma: float, lam: float) -> tuple[np.ndarray, np.ndarray]:
    """(advantages, returns) per token, (B, T), by generalized advantage estimation over each row's masked positions
    (its completion, in order), as TRL's PPO computes them, with the value after the last token 0 (the episode ends)."""
    advantages = np.zeros_like(values, dtype=np.float64)
    for b in range(len(values)):
        positions = np.flatnonzero(mask[b])
        last, following = 0.0, 0.0
        for t in positions[::-1]:
            delta = rewards[b, t] + gamma * following - values[b, t]
            last = delta + gamma * lam * last
            advantages[b, t], following = last, values[b, t]
    return advantages, advantages + values * mask


def whiten(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(x - mean) / sqrt(var + 1e-8) over the masked entries, Bessel's variance, 0 elsewhere (TRL's masked_whiten)."""
    kept = values[mask > 0]
    mean, var = kept.mean(), kept.var(ddof=1) if kept.size > 1 else 0.0
    return np.where(mask > 0, (values - mean) / np.sqrt(var + 1e-8), 0.0)


def step_seed(seed: int, step: int) -> int:
    """The sampling seed of a step: what `llmctl generate --seed` takes to give the same completions."""
    return seed * 1_000_003 + step


@dataclass
class GroupBatches:
    """The batch source of GRPO: `batch_size // group_size` prompts a step (each epoch in an order fixed by (seed,
    epoch)), each sampled `group_size` times by the policy as it is at that step, scored and turned into rows of
    prompt + completion whose loss mask covers the completion and whose extras carry each row's advantage."""

    engine: Any                    # the backend's RLEngine: sample(prompts, params) and, for --reward, scores
    prompts: list[Prompt]
    reward: Any                    # (prompts, completions' ids) -> rewards (N,), NaN where skipped
    params: Any                    # SamplingParams without the seed
    group_size: int
    batch_size: int
    seed: int
    pad_id: int
    _step: int = -1
    _rows: Batch | None = None
    stats: dict[str, float] = field(default_factory=dict)

    def steps_per_epoch(self) -> int:
        return max(1, -(-len(self.prompts) * self.group_size // self.batch_size))

    def _index(self, i: int) -> int:
        epoch, at = divmod(i, len(self.prompts))
        return int(np.random.default_rng([self.seed, epoch]).permutation(len(self.prompts))[at])

    def step_prompts(self, step: int) -> list[Prompt]:
        n = self.batch_size // self.group_size
        return [self.prompts[self._index(step * n + i)] for i in range(n)]

    def sample(self, step: int) -> tuple[list[Prompt], list[list[int]]]:
        """The step's prompts and their completions (each prompt `group_size` times in a row), as `llmctl generate
        --prompt-file` with --seed step_seed(seed, step) and --batch-size batch_size gives them."""
        prompts = [p for p in self.step_prompts(step) for _ in range(self.group_size)]
        return prompts, self.engine.sample([p.ids for p in prompts], self.params.with_updates(seed=step_seed(self.seed, step)))

    def batch(self, step: int, part: int, parts: int) -> Batch:
        if step != self._step:
            self._rows, self._step = self._make(step), step
        n = self.batch_size // parts
        return self._rows.slice(part * n, (part + 1) * n)

    def _make(self, step: int) -> Batch:
        t0 = time.perf_counter()
        prompts, completions = self.sample(step)
        t1 = time.perf_counter()
        rewards = self.reward(prompts, completions)
        advantages, spread = group_advantages(rewards, self.group_size)
        self.stats = {"reward": float(np.nanmean(rewards)) if np.isfinite(rewards).any() else math.nan,
                      "reward_std": float(np.nanmean(spread)) if np.isfinite(spread).any() else 0.0,
                      "reward_errors": int(np.isnan(rewards).sum()),
                      "completion_len": float(np.mean([len(c) for c in completions])),
                      "sample_s": round(t1 - t0, 4), "reward_s": round(time.perf_counter() - t1, 4)}
        return completion_rows(prompts, completions, advantages, self.pad_id)

    def val_batches(self, rows: int) -> list[Batch]:
        return []  # held out: greedy completions of held-out prompts are scored before and after (run)


@dataclass
class RolloutBatches(GroupBatches):
    """The batch source of PPO: `batch_size` prompts sampled once each every `ppo_epochs` steps (the rollout), scored
    by the reward model; the policy's and the reference's log-probabilities and the values of the rollout, its
    per-token rewards (-kl_coef * (logp - ref) at each token, the score added at the last) and GAE advantages
    (whitened) and returns ride in the batch for the `ppo_epochs` optimizer steps that train on it."""

    settings: Any = None
    reference: Any = None          # the frozen reference, or "adapters" (the policy with its adapters off)

    def steps_per_epoch(self) -> int:
        return max(1, -(-len(self.prompts) // self.batch_size)) * self.settings.ppo_epochs

    def step_prompts(self, step: int) -> list[Prompt]:
        rollout = step // self.settings.ppo_epochs
        return [self.prompts[self._index(rollout * self.batch_size + i)] for i in range(self.batch_size)]

    def sample(self, step: int) -> tuple[list[Prompt], list[list[int]]]:
        prompts = self.step_prompts(step)
        seed = step_seed(self.seed, step - step % self.settings.ppo_epochs)
        return prompts, self.engine.sample([p.ids for p in prompts], self.params.with_updates(seed=seed))

    def batch(self, step: int, part: int, parts: int) -> Batch:
        rollout = step - step % self.settings.ppo_epochs
        if rollout != self._step:
            self._rows, self._step = self._make(rollout), rollout
        elif step != rollout:
            self.stats = {k: v for k, v in self.stats.items() if k not in ("sample_s", "reward_s")} | {"sample_s": 0.0, "reward_s": 0.0}
        n = self.batch_size // parts
        return self._rows.slice(part * n, (part + 1) * n)

    def _make(self, step: int) -> Batch:
        s = self.settings
        t0 = time.perf_counter()
        prompts, completions = self.sample(step)
        t1 = time.perf_counter()
        scores = self.reward(prompts, completions)
        rows = completion_rows(prompts, completions, np.zeros(len(prompts), np.float32), self.pad_id)
        logps, ref_logps, values = self.engine.rollout(rows, self.reference)   # each (B, T), 0 off the completion
        mask = rows.loss_mask.astype(np.float64)
        kl = (logps - ref_logps) * mask
        rewards = -s.kl_coef * kl
        last = mask.shape[1] - 1 - np.argmax(mask[:, ::-1], axis=1)   # each row's last completion position
        rewards[np.arange(len(last)), last] += scores
        advantages, returns = gae(rewards, values * mask, mask, s.gamma, s.lam)
        rows.extras = {"old_logps": logps.astype(np.float32), "old_values": (values * mask).astype(np.float32),
                       "advantages": whiten(advantages, mask).astype(np.float32), "returns": returns.astype(np.float32)}
        self.stats = {"reward": float(np.mean(scores)), "reward_std": float(np.std(scores)),
                      "rollout_kl": float(kl.sum(1).mean()), "completion_len": float(np.mean([len(c) for c in completions])),
                      "sample_s": round(t1 - t0, 4), "reward_s": round(time.perf_counter() - t1, 4)}  # scores and the rollout's forwards
        return rows


def completion_rows(prompts: list[Prompt], completions: list[list[int]], advantages: np.ndarray, pad_id: int) -> Batch:
    """Rows of prompt + completion (right-padded): targets are the next tokens, the loss mask covers the completion's."""
    T = max(len(p.ids) + len(c) for p, c in zip(prompts, completions)) - 1
    B = len(prompts)
    ids = np.full((B, T), pad_id, np.int64)
    targets = np.full((B, T), IGNORE, np.int64)
    mask = np.zeros((B, T), np.float32)
    for b, (p, c) in enumerate(zip(prompts, completions)):
        tokens = p.ids + c
        n = len(tokens) - 1
        ids[b, :n], targets[b, :n] = tokens[:-1], tokens[1:]
        mask[b, len(p.ids) - 1 : n] = 1.0
    return Batch(ids, targets, mask, extras={"advantage": advantages.astype(np.float32)})


def completion_texts(tokenizer: Any, completions: list[list[int]], stop_ids: frozenset[int]) -> list[str]:
    """What a reward function reads: each completion's reply, up to its end-of-turn (as finetune-lora checks answers)."""
    from llmctl.finetune import reply_text

    return [reply_text(tokenizer, [t for t in c if t not in stop_ids]) for c in completions]


def make_reward(cfg: AlignConfig, engine: Any, tokenizer: Any, stop_ids: frozenset[int]) -> tuple[Any, str]:
    """(prompts, completions) -> rewards (N,) from --reward-fn or --reward, and what it is, for the summary."""
    s = cfg.rl
    if s.reward:
        from llmctl.io.hub import resolve_model
        from llmctl.io.model_folder import load_tokenizer

        folder = resolve_model(s.reward)
        same_tokenizer(tokenizer, load_tokenizer(folder), f"--reward {s.reward}")
        scorer = engine.reward_model(folder)
        return (lambda prompts, completions: scorer([p.ids + c for p, c in zip(prompts, completions)])), f"reward model {folder}"
    from llmctl.rewards import load_reward_fn

    fn = load_reward_fn(s.reward_fn)
    skip = s.on_reward_error == "skip"

    def rewards(prompts: list[Prompt], completions: list[list[int]]) -> np.ndarray:
        texts = completion_texts(tokenizer, completions, stop_ids)
        return np.array([score(fn, s.reward_fn, p, t, skip) for p, t in zip(prompts, texts)], np.float64)

    return rewards, f"reward function {s.reward_fn}"


def held_out_reward(source: GroupBatches, prompts: list[Prompt], samples: int = 0) -> float:
    """Mean reward on held-out prompts of greedy completions (with --reward-fn exact: held-out exact match), or of
    `samples` completions of each sampled as in training (seeded: before and after compare like with like)."""
    if not prompts:
        return math.nan
    if samples:
        prompts = [p for p in prompts for _ in range(samples)]
    params = source.params.with_updates(seed=source.seed) if samples else source.params.with_updates(temperature=0.0, seed=None)
    completions = source.engine.sample([p.ids for p in prompts], params)
    return float(np.nanmean(source.reward(prompts, completions)))


def build_prompts(cfg: AlignConfig, tokenizer: Any, max_len: int) -> tuple[list[Prompt], list[Prompt]]:
    from llmctl.data.text import expand_sources
    from llmctl.rewards import builtin_prompts, read_prompts, to_prompts

    if not cfg.data.train or cfg.data.train == ["builtin:tasks"]:
        train_records, val_records = builtin_prompts(cfg.train.seed)
    else:
        train_records = [r for f in expand_sources(cfg.data.train, "--prompts") for r in read_prompts(Path(f))]
        if cfg.data.val:
            val_records = [r for f in expand_sources(cfg.data.val, "data.val") for r in read_prompts(Path(f))]
        else:
            order = np.random.default_rng(cfg.train.seed).permutation(len(train_records))
            n_val = max(1, int(len(train_records) * cfg.data.val_fraction)) if len(train_records) > 1 else 0
            val_records = [train_records[i] for i in order[:n_val]]
            train_records = [train_records[i] for i in sorted(order[n_val:])]
    train, val = to_prompts(train_records, tokenizer), to_prompts(val_records, tokenizer)
    for p in train + val:
        if len(p.ids) >= max_len:
            raise DataError(f"{p.where}: the prompt has {len(p.ids)} tokens; with rl.max_tokens={cfg.rl.max_tokens} new "
                            f"ones it does not fit data.seq_len={max_len}.", hint="Shorten it, or raise data.seq_len.")
    return train, val[:EVAL_PROMPTS]


def run(cfg: AlignConfig, backend: str, force: bool = False, resume: bool = False) -> Path | None:
    """GRPO or PPO; the adapter or model folder, or None when stopped early (train.stop_at)."""
    import importlib

    from llmctl.chat_session import turn_end
    from llmctl.config import to_dict, to_yaml
    from llmctl.finetune import resolve_base
    from llmctl.generation import SamplingParams
    from llmctl.io.model_folder import load_tokenizer, read_model
    from llmctl.run import RunFolder
    from llmctl.training import loop
    from llmctl.training.loop import Job

    s, ppo = cfg.rl, cfg.pref.method == "ppo"
    base = resolve_base(cfg)
    spec = read_model(base).spec
    tokenizer = load_tokenizer(base)
    seq_len = min(cfg.data.seq_len, spec.max_seq_len)
    engine = importlib.import_module(f"llmctl.backends.{backend}.rl").RLEngine(cfg.train, cfg.optim)
    try:
        inputs = [*cfg.data.train, *cfg.data.val, str(base), *([s.reward] if s.reward else [])]
        run_folder = RunFolder(cfg.out, force=force, resume=resume, inputs=inputs)
        try:
            train, val = build_prompts(cfg, tokenizer, seq_len - s.max_tokens + 1)
            if cfg.data.batch_size % (cfg.train.grad_accum * engine.world):
                raise ConfigError(f"data.batch_size={cfg.data.batch_size} does not split into train.grad_accum="
                                  f"{cfg.train.grad_accum} x {engine.world} process(es).")
            engine.setup_policy(base, cfg.lora.settings() if cfg.use_lora else None, ppo)
            stops = frozenset(tokenizer.eos_token_ids) | frozenset(spec.eos_token_ids) | turn_end(tokenizer)[0]
            params = SamplingParams(max_tokens=s.max_tokens, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                                    stop_ids=stops)
            reward, said = make_reward(cfg, engine, tokenizer, stops)
            pad = tokenizer.pad_id if tokenizer.pad_id is not None else (tokenizer.eos_id or 0)
            if ppo:  # a reference always: the KL penalty is part of the reward
                reference = "adapters" if cfg.use_lora else engine.load_frozen(base)
                source = RolloutBatches(engine, train, reward, params, 1, cfg.data.batch_size, cfg.train.seed, pad,
                                        settings=s, reference=reference)
                objective = engine.objective(s, "ppo")
                shape = f"{cfg.data.batch_size} prompts a rollout, {s.ppo_epochs} steps on each"
            else:
                source = GroupBatches(engine, train, reward, params, s.group_size, cfg.data.batch_size, cfg.train.seed, pad)
                reference = None if s.beta == 0 else "adapters" if cfg.use_lora else engine.load_frozen(base)
                objective = engine.objective(s, reference)
                shape = f"{s.group_size} completions a prompt, {cfg.data.batch_size // s.group_size} prompt(s) a step"
            if cfg.train.steps <= 0:
                k = s.ppo_epochs if ppo else 1
                cfg.train.steps = max(1, math.ceil(cfg.epochs * source.steps_per_epoch() / k)) * k
            ui.info(f"align --method {cfg.pref.method}: {len(train)} prompts, {shape}, {said}; "
                    f"{engine.trained_parameters() / 1e6:.3g}M trained parameters; reference: "
                    f"{'none (beta 0)' if reference is None else 'the base (adapters off)' if cfg.use_lora else str(base)}; "
                    f"{cfg.train.steps} steps -> {run_folder.path}")
        except BaseException:
            run_folder.restore()
            raise
        samples = EVAL_SAMPLES if ppo else 0  # PPO: the expected score of sampled completions; GRPO: greedy answers
        before = held_out_reward(source, val, samples) if not resume else None
        out_dir = run_folder.path / ("adapter" if cfg.use_lora else "model")

        def export() -> None:
            engine.write_output(out_dir, base, tokenizer, cfg.lora.settings() if cfg.use_lora else None, str(cfg.model), pad)

        def step_metrics(record: dict[str, Any]) -> dict[str, float]:
            stats = source.stats
            return stats | {"train_s": round(record["step_s"] - stats["sample_s"] - stats["reward_s"], 4)}

        key = {"method": cfg.pref.method, "model": str(base), "rl": to_dict(s), "use_lora": cfg.use_lora, "lora": to_dict(cfg.lora),
               "data.seq_len": seq_len, "data.batch_size": cfg.data.batch_size, "data.train": list(cfg.data.train),
               "train.steps": cfg.train.steps, "train.grad_accum": cfg.train.grad_accum, "train.seed": cfg.train.seed,
               "processes": engine.world}
        mean_prompt = float(np.mean([len(p.ids) for p in train[:1000]]))
        job = Job(loop=cfg.train, optim=cfg.optim, run=run_folder, source=source, objective=objective, resume_key=key,
                  config_text=to_yaml(cfg), resume=resume, tokens_per_step=int(cfg.data.batch_size * (mean_prompt + s.max_tokens)),
                  flops_per_unit=0.0, started=run_folder.settle, export=export, step_metrics=step_metrics, validate=False)
        if not loop.run_settled(engine, job):
            return None
        after = held_out_reward(source, val, samples)
        shown = "" if before is None else f"{before:.3g} before, "
        what = f"{samples} sampled completions each" if samples else "greedy completions"
        ui.info(f"held-out mean reward of {what} on {len(val)} prompts: {shown}{after:.3g} after")
        if ui.is_main_process():
            run_folder.log({"step": cfg.train.steps, "reward_before": before, "reward_after": after})
        ui.info(f"{'adapter' if cfg.use_lora else 'model'} written to {out_dir}")
        return out_dir
    finally:
        engine.close()
