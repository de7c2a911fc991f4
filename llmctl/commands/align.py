"""`llmctl align`: preference optimization (DPO, IPO, hinge, robust, SimPO, ORPO, KTO) and reward models."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from llmctl.backends import Backend


def align(
    overrides: Annotated[list[str] | None, typer.Argument(help="key=value, e.g. optim.lr=1e-6 data.seq_len=512")] = None,
    method: Annotated[str | None, typer.Option("--method", help="dpo, ipo, hinge, robust, simpo, orpo, kto, reward, grpo or ppo (default dpo).")] = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help="The model to align: folder, Hugging Face id or .gguf (default: the latest llmctl made).")] = None,
    data: Annotated[list[str] | None, typer.Option("--data", help="Preference JSONL ({prompt, chosen, rejected}; KTO also {prompt, completion, label}); repeatable. Default: built-in task pairs.")] = None,
    val: Annotated[list[str] | None, typer.Option("--val", help="Held-out preference JSONL (default: hold out 10% of --data).")] = None,
    prompts: Annotated[list[str] | None, typer.Option("--prompts", help='grpo, ppo: prompt JSONL ({"prompt": text or messages, "answer": optional}); repeatable. Default: the built-in tasks.')] = None,
    reward_fn: Annotated[str | None, typer.Option("--reward-fn", help="grpo: exact, format (the built-in tasks' checks) or module:function(prompt, completion, example) -> float.")] = None,
    reward: Annotated[str | None, typer.Option("--reward", help="grpo, ppo: a reward model folder (align --method reward) that scores the completions.")] = None,
    group_size: Annotated[int | None, typer.Option("--group-size", help="grpo: completions sampled per prompt (default 8).")] = None,
    on_reward_error: Annotated[str | None, typer.Option("--on-reward-error", help="grpo: stop (default) or skip a completion whose reward function raises or returns a non-number.")] = None,
    beta: Annotated[float | None, typer.Option("--beta", help="DPO's beta (IPO's tau, SimPO's beta, ORPO's lambda; default 0.1); grpo: the KL weight (default 0); ppo: the KL penalty (default 0.05).")] = None,
    ref: Annotated[str | None, typer.Option("--ref", help="Reference model (default: --model; with --lora, --model with the adapter off).")] = None,
    lora: Annotated[bool, typer.Option("--lora", help="Train LoRA adapters (written to OUT/adapter/) instead of every weight.")] = False,
    rank: Annotated[int | None, typer.Option("--rank", help="With --lora: adapter rank (default 8).")] = None,
    alpha: Annotated[float | None, typer.Option("--alpha", help="With --lora: scale = alpha / rank (default 16).")] = None,
    targets: Annotated[str | None, typer.Option("--targets", help="With --lora: all-linear or layer names q_proj,v_proj,...")] = None,
    steps: Annotated[int | None, typer.Option("--steps", help="Optimizer steps (default: one epoch).")] = None,
    epochs: Annotated[float | None, typer.Option("--epochs", help="Passes over the training pairs.")] = None,
    precompute_ref: Annotated[bool, typer.Option("--precompute-ref", help="Compute the reference's log-probabilities once, cache them in OUT and free the reference.")] = False,
    recipe: Annotated[str, typer.Option("--recipe", "-r", help="Name under recipes/align/ or a YAML path.")] = "default",
    backend: Annotated[Backend, typer.Option(help="auto picks mlx on Apple silicon, else torch.")] = Backend.auto,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Run folder (default runs/align); OUT/adapter/ with --lora, else OUT/model/.")] = None,
    force: Annotated[bool, typer.Option(help="Overwrite an existing run folder.")] = False,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from its latest checkpoint.")] = False,
) -> None:
    """Align a model to preferences (or train a reward model); writes checkpoints, metrics and the adapter or model."""
    from llmctl.align import AlignConfig, check_config, run
    from llmctl.backends import get_backend, resolve_name
    from llmctl.config import load_recipe

    if prompts and data:
        raise typer.BadParameter("give --data (preference pairs) or --prompts (grpo), not both")
    rl_flags = {"rl.reward_fn": reward_fn, "rl.reward": reward, "rl.group_size": group_size, "rl.on_reward_error": on_reward_error}
    flags = {
        "pref.method": method, "model": model, "data.train": data or prompts or None, "data.val": val or None, **rl_flags,
        "ref": ref, "use_lora": True if lora else None, "lora.rank": rank, "lora.alpha": alpha,
        "lora.targets": targets.split(",") if targets else None, "train.steps": steps, "epochs": epochs,
        "precompute_ref": True if precompute_ref else None, "out": out,
    }
    if epochs is not None and steps is None:
        flags["train.steps"] = 0
    # --beta is GRPO's KL weight or PPO's KL penalty under those methods (named, or set by the recipe), else the
    # preference loss's beta
    rl_method = method or load_recipe(AlignConfig, "align", recipe, overrides or [], {}).pref.method
    flags[{"grpo": "rl.beta", "ppo": "rl.kl_coef"}.get(rl_method, "pref.beta")] = beta
    cfg = load_recipe(AlignConfig, "align", recipe, overrides or [], flags)
    check_config(cfg)
    get_backend(backend)
    run(cfg, resolve_name(backend), force=force, resume=resume)
