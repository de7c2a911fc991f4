"""`llmctl prune`: unstructured or N:M sparsity (magnitude, Wanda, SparseGPT), or a smaller model (depth, width)."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer

from llmctl.commands.quantize import CalibConfig


class Method(str, enum.Enum):
    magnitude = "magnitude"  # smallest |w| of each row
    wanda = "wanda"          # smallest |w| * ||x|| of each row (calibrated)
    sparsegpt = "sparsegpt"  # second-order: prune column by column and update the rest (calibrated)


class Structured(str, enum.Enum):
    depth = "depth"  # whole blocks, those that change their input least
    width = "width"  # MLP channels and attention heads in whole key/value groups


@dataclass
class PruneConfig:
    model: str = ""                   # the float model folder (or Hugging Face id) to prune
    method: Method = Method.wanda     # unstructured pruning: magnitude, wanda or sparsegpt
    sparsity: float = 0.5             # share of each linear layer's weights set to zero
    pattern: str | None = None        # N:M instead of sparsity: N zeros in every M inputs of a row (2:4, 4:8)
    structured: Structured | None = None  # depth or width: a smaller model instead of zeros
    ratio: float = 0.25               # structured: share of the blocks (depth) or of the blocks' parameters (width)
    calib: CalibConfig = field(default_factory=CalibConfig)
    recover: int = 0                  # steps of distillation from the original into the pruned model (0: none)
    recover_lr: float = 1.0e-4        # its peak learning rate (a pretrained model: small steps)
    out: Path = Path("")


def prune(
    overrides: Annotated[list[str] | None, typer.Argument(help="key=value, e.g. calib.samples=64")] = None,
    model: Annotated[str | None, typer.Option("--model", "-m", help="Float model folder or Hugging Face id.")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Output model folder.")] = None,
    method: Annotated[Method | None, typer.Option(help="magnitude, wanda or sparsegpt (calibrated).")] = None,
    sparsity: Annotated[float | None, typer.Option(help="Share of each layer's weights set to zero, in (0, 1).")] = None,
    pattern: Annotated[str | None, typer.Option(help="N:M sparsity instead: N zeros in every M inputs (2:4, 4:8).")] = None,
    structured: Annotated[Structured | None, typer.Option(help="depth (whole layers) or width (heads, MLP channels).")] = None,
    ratio: Annotated[float | None, typer.Option(help="--structured: share of the layers or of the blocks' parameters.")] = None,
    calib: Annotated[str | None, typer.Option(help="Calibration text (default: built-in).")] = None,
    recover: Annotated[int | None, typer.Option(help="Then distill the original into the pruned model for STEPS steps "
                                                     "on the calibration text (zeros stay zeros).", metavar="STEPS")] = None,
    recipe: Annotated[str, typer.Option("--recipe", "-r", help="Name under recipes/prune/ or a YAML path.")] = "default",
    force: Annotated[bool, typer.Option(help="Overwrite an existing --out.")] = False,
) -> None:
    """Prune a float model's blocks; writes an ordinary model folder to --out."""
    from llmctl.config import load_recipe
    from llmctl.errors import ConfigError

    if structured is not None and (method or sparsity is not None or pattern):
        raise ConfigError("--structured removes whole layers, heads and channels; --method, --sparsity and --pattern "
                          "are for unstructured pruning.", hint="Pass either --structured with --ratio, or --method.")
    if pattern and sparsity is not None:
        raise ConfigError(f"--pattern {pattern} sets the sparsity itself; --sparsity {sparsity} cannot be added.",
                          hint="Pass one of them.")
    flags = {
        "model": model, "out": out, "method": method.value if method else None, "sparsity": sparsity,
        "pattern": pattern, "structured": structured.value if structured else None, "ratio": ratio, "calib.data": calib,
        "recover": recover,
    }  # fmt: skip
    run(load_recipe(PruneConfig, "prune", recipe, overrides or [], flags), force)


def run(cfg: PruneConfig, force: bool = False) -> Path:
    """Check the request, prune, write the model folder and print the summary; returns the output folder."""
    from llmctl import ui
    from llmctl.config import to_yaml
    from llmctl.io.outputs import replacing
    from llmctl.io.safetensors import atomic_write_text
    from llmctl.run import remember_model

    start = time.perf_counter()
    folder = _check(cfg, force)
    model, report = prune_model(cfg, folder)
    with replacing(cfg.out) as staged:  # the old output (--force) stays until the new one is complete
        if cfg.recover:
            recover(cfg, folder, model, staged)
        else:
            write_pruned(staged, model, folder)
        atomic_write_text(staged / "llmctl_prune.yaml", to_yaml(cfg))
    remember_model(cfg.out)
    _summary(report, folder.spec, model.spec)
    ui.info(f"wrote {cfg.out} in {time.perf_counter() - start:.1f}s")
    return Path(cfg.out)


def prune_model(cfg: PruneConfig, folder: Any) -> tuple[Any, dict[str, Any]]:
    """The pruned torch Transformer (float32, eval mode) of `folder` (io.model.ModelFolder), and what was removed:
    {"sparsity": {module path: share of zeros}} or {"removed_layers": [...]} or {"width": WidthPlan}."""
    from llmctl.backends import get_backend
    from llmctl.io.model_folder import load_tokenizer
    from llmctl.prune import depth_plan, parse_pattern, width_plan
    from llmctl.quant.calib import calibration_tokens

    model = get_backend("torch").load(folder.path, dtype="float32").module
    needs_calib = cfg.structured is not None or cfg.method != Method.magnitude
    c = cfg.calib
    tokens = calibration_tokens(load_tokenizer(folder.path), c.data, c.samples, c.seq_len, c.seed) if needs_calib else None
    if cfg.structured == Structured.depth:
        from llmctl.prune.structured import block_influence, remove_layers

        n = depth_plan(model.spec, cfg.ratio)
        influence = block_influence(model, tokens)
        drop = sorted(sorted(range(len(influence)), key=influence.__getitem__)[:n])
        return remove_layers(model, drop), {"removed_layers": drop, "influence": influence}
    if cfg.structured == Structured.width:
        from llmctl.prune.structured import shrink_width, width_importance

        plan = width_plan(model.spec, cfg.ratio)
        return shrink_width(model, plan, *width_importance(model, tokens)), {"width": plan}
    from llmctl.prune.sparse import prune_sparse

    pattern = parse_pattern(cfg.pattern) if cfg.pattern else None
    return model, {"sparsity": prune_sparse(model, tokens, cfg.method.value, cfg.sparsity, pattern)}


def recover(cfg: PruneConfig, source: Any, model: Any, staged: Path) -> None:
    """`cfg.recover` steps of `llmctl distill` from the original model (teacher) into the pruned one (student), 8 rows
    of calib.seq_len tokens a step of the calibration text (default: the built-in sample); an unstructured or N:M
    student keeps its zeros. The recovered
    model's folder lands in `staged`; the distillation run (checkpoints, metrics) is scratch, beside it."""
    import shutil
    import tempfile

    from llmctl import ui
    from llmctl.distill import distill
    from llmctl.quant.calib import calibration_files

    with tempfile.TemporaryDirectory(prefix=".llmctl-recover-", dir=staged.parent) as scratch:
        pruned = Path(scratch) / "pruned"
        write_pruned(pruned, model, source)
        data = [cfg.calib.data] if cfg.calib.data else [str(f) for f in calibration_files(cfg.recover * 8 * cfg.calib.seq_len, cfg.calib.seed)]
        ui.info(f"recovering: {cfg.recover} steps of distillation from {source.path}")
        result = distill(source.path, pruned, data, cfg.recover, Path(scratch) / "run", overrides=[f"optim.lr={cfg.recover_lr}", f"data.seq_len={cfg.calib.seq_len}", "data.batch_size=8"],
                         keep_zeros=cfg.structured is None)  # fmt: skip
        if result is None:
            from llmctl.errors import LlmctlError

            raise LlmctlError("the recovery distillation stopped before its last step; nothing was written.")
        staged.mkdir(parents=True, exist_ok=True)
        for item in result.iterdir():
            shutil.move(str(item), staged / item.name)


def write_pruned(out: Path, model: Any, source: Any) -> None:
    """The model as an ordinary folder in the source's dtype, with the source's tokenizer files."""
    from llmctl.commands.quantize import _torch_dtype
    from llmctl.io.model_folder import write_model
    from llmctl.io.safetensors import from_torch

    dtype = _torch_dtype({"float16": "F16", "bfloat16": "BF16"}.get(source.dtype, "F32"))
    tensors = {name: from_torch(t.detach().to(dtype).contiguous()) for name, t in model.state_dict().items()}
    write_model(out, model.spec, tensors, source.folder, source.dtype)


def _check(cfg: PruneConfig, force: bool) -> Any:
    """Every problem with the request before any work: paths, sparsity, pattern against the widths, ratio."""
    from llmctl.errors import CheckpointError, ConfigError
    from llmctl.io.model_folder import read_model
    from llmctl.io.outputs import check_output
    from llmctl.prune import check_pattern_fits, check_sparsity, depth_plan, parse_pattern, width_plan

    if not cfg.model or not str(cfg.out) or str(cfg.out) == ".":
        raise ConfigError("llmctl prune needs --model DIR and --out DIR.", hint="`llmctl prune --help` lists the options.")
    check_output(cfg.out, [cfg.model, cfg.calib.data])
    if Path(cfg.out).exists() and not force:
        raise ConfigError(f"{cfg.out} already exists.", hint="Pass --force to replace it, or choose another --out.")
    if cfg.recover < 0 or cfg.recover_lr <= 0:
        raise ConfigError(f"--recover {cfg.recover} (recover_lr={cfg.recover_lr}): the steps must be 0 (none) or more "
                          "and the learning rate positive.")
    folder = read_model(cfg.model)
    if folder.quantization:
        raise CheckpointError(f"{cfg.model} is quantized; llmctl prunes float models.",
                              hint="Prune the float model, then quantize the pruned one.")
    if cfg.structured == Structured.depth:
        depth_plan(folder.spec, cfg.ratio)
    elif cfg.structured == Structured.width:
        width_plan(folder.spec, cfg.ratio)
    elif cfg.pattern:
        widths = {n.removesuffix(".weight"): t.shape[1] for n, t in folder.tensors.items()
                  if n.startswith("model.layers.") and n.endswith(".weight") and len(t.shape) == 2 and ".gate." not in n}
        check_pattern_fits(parse_pattern(cfg.pattern), widths)
    else:
        check_sparsity(cfg.sparsity)
    return folder


def _summary(report: dict[str, Any], before: Any, after: Any) -> None:
    from rich.table import Table

    from llmctl import ui

    size = f"{before.param_count() / 1e6:.2f}M -> {after.param_count() / 1e6:.2f}M parameters"
    if "removed_layers" in report:
        ui.info(f"removed layers {', '.join(map(str, report['removed_layers']))} of {before.n_layers} "
                f"(least block influence); {size}")
    elif "width" in report:
        plan = report["width"]
        ui.info(f"every block: {plan.kv_groups} of {before.n_kv_heads} key/value groups "
                f"({before.n_heads - after.n_heads} query heads) and {plan.channels} of {before.ffn_dim} MLP channels "
                f"removed, {plan.removed_share:.1%} of the blocks' parameters; {size}")
    else:
        by_layer: dict[int, dict[str, float]] = {}
        for path, share in report["sparsity"].items():
            index, name = path.split(".", 3)[2:]
            by_layer.setdefault(int(index), {})[name.rsplit(".", 1)[-1]] = share
        columns = list(dict.fromkeys(name for row in by_layer.values() for name in row))
        table = Table("layer", *columns, title="achieved sparsity")
        for index, row in sorted(by_layer.items()):
            table.add_row(str(index), *(f"{row[c]:.1%}" if c in row else "" for c in columns))
        ui.console.print(table)
