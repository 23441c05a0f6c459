"""Sharing a trained run on the Hugging Face Hub, through huggingface_hub's own machinery.

:class:`HubSiT` is the SiT with ``PyTorchModelHubMixin``: ``save_pretrained`` writes
``config.json`` (the contract training/load.py reads: model name, input size, channels, classes,
SiT kwargs, VAE, latent scale/bias, path) and ``model.safetensors`` (the EMA weights of
``RUN_DIR/ema.safetensors``, tensor for tensor; projectors are training-only and not there), and
``ModelCard`` renders ``README.md`` from the run: architecture, objective and regulariser flags,
the data manifest's hash, steps, the last online-evaluation numbers and the generate command.
``from_pretrained`` loads such a folder back; generate.py reads it (or a Hub id in the local HF
cache) through :func:`training.load.resolve_checkpoint`.

The folder is uploaded with ``HfApi.upload_folder`` (what the mixin's ``push_to_hub`` calls), so
what is on disk is what is pushed, with the standard Hugging Face login (``hf auth login`` or
``HF_TOKEN``), never a flag. Offline, without a login or without network, the folder stays and one
line says how to push it later (``hf upload ID FOLDER``).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shlex
import shutil
from pathlib import Path

import torch
from huggingface_hub import PyTorchModelHubMixin

from common import UsageError, safetensors_checksum_problem
from configs import TrainingConfig
from models.sit import SiT

from .checkpoint import export_step
from .load import HUB_WEIGHTS, model_size
from .objective import objective_terms

# config.json's keys that describe the model and its decoding (generate.py's docstring)
CONTRACT = ("model", "input_size", "in_channels", "num_classes", "model_kwargs", "vae",
            "latent_scale", "latent_bias", "path_type")
PROJECTOR_KWARGS = ("z_dims", "projector_dim", "encoder_depth", "projector_type",
                    "projector_kernel_size")  # training-only heads: not in the exported weights

CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

A class-conditional {{ model }} ({{ space }}) trained with sitkit: objective
**{{ objective }}**, {{ steps }} optimizer steps. `model.safetensors` holds the EMA weights (what
the run's `ema.safetensors` holds, projectors removed); `config.json` describes the model and how
its samples are decoded.

## Generate

```bash
{{ download }}
python generate.py --ckpt {{ ckpt }} --mode {{ mode }} --num-steps {{ num_steps }} \\
    --cfg-scale 1.0 --num-fid-samples 50000 --per-proc-batch-size 64 --sample-dir samples
```

`generate.py` comes with sitkit; `--ckpt` also takes this folder's path. It reads the Hub id
from the local Hugging Face cache only (`hf download` fetches it).
{%- if vae %} Samples are decoded with the VAE `{{ vae }}`, read from the local cache too
(`hf download {{ vae }}`).{% endif %}

## Architecture

| | |
|---|---|
{% for key, value in architecture %}| {{ key }} | {{ value }} |
{% endfor %}
## Objective and regulariser flags

{{ objective }} (train.py's flags, as the run resolved them):

| flag | value |
|---|---|
{% for flag, value in flags %}| `{{ flag }}` | {{ value }} |
{% endfor %}
## Data and training

| | |
|---|---|
{% for key, value in training %}| {{ key }} | {{ value }} |
{% endfor %}
## Online evaluation

{% if evaluation %}The last `--eval-every` evaluation (step {{ eval_step }}, {{ eval_setting }}):

| metric | value |
|---|---|
{% for key, value in evaluation %}| {{ key }} | {{ value }} |
{% endfor %}{% else %}None: the run was trained without `--eval-every`.
{% endif %}"""


class HubSiT(SiT, PyTorchModelHubMixin, library_name="sitkit",
             tags=["sit", "diffusion", "flow-matching", "class-conditional"],
             model_card_template=CARD_TEMPLATE):
    """A SiT whose constructor takes config.json's contract (:data:`CONTRACT`): the mixin saves
    those arguments as config.json and rebuilds the model from them in ``from_pretrained``."""

    def __init__(self, model: str, input_size: int, in_channels: int, num_classes: int,
                 model_kwargs: dict | None = None, vae: str | None = None,
                 latent_scale: float | list = 0.18215, latent_bias: float | list = 0.0,
                 path_type: str = "linear"):
        size, kwargs = model_size(model, model_kwargs or {})
        super().__init__(input_size=input_size, in_channels=in_channels,
                         num_classes=num_classes, **size, **kwargs)


def read_run(run_dir: Path) -> tuple[dict, dict, int | None]:
    """(config.json, the EMA state dict, its step) of a run directory written by train.py."""
    from safetensors.torch import load_file
    cfg_path, weights = run_dir / "config.json", run_dir / "ema.safetensors"
    if not run_dir.is_dir():
        raise UsageError(f"run directory {run_dir} does not exist")
    if not cfg_path.is_file() or not weights.is_file():
        raise UsageError(f"{run_dir} is not a trained run directory (it needs config.json and "
                         "ema.safetensors, which train.py writes at its first checkpoint)")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise UsageError(f"{cfg_path} is not valid JSON: {e}") from None
    missing = [k for k in CONTRACT if k not in config]
    if missing:
        raise UsageError(f"{cfg_path} lacks {', '.join(missing)}: not written by train.py")
    problem = safetensors_checksum_problem(weights)
    if problem:
        raise UsageError(f"{problem}; resume the run to write a fresh export")
    return config, load_file(weights), export_step(weights)


def build_hub_model(config: dict, state: dict[str, torch.Tensor]) -> HubSiT:
    """The :class:`HubSiT` of a run's config.json holding ``state`` (built on the meta device:
    no initialisation of weights that are replaced at once)."""
    contract = {k: config[k] for k in CONTRACT}
    contract["model_kwargs"] = {k: v for k, v in (config["model_kwargs"] or {}).items()
                                if k not in PROJECTOR_KWARGS}
    try:
        with torch.device("meta"):
            model = HubSiT(**contract)
        model.load_state_dict(state, strict=True, assign=True)
    except (TypeError, ValueError, KeyError, RuntimeError) as e:
        raise UsageError(f"the run's ema.safetensors does not fit its config.json: "
                         f"{str(e).splitlines()[0]}") from None
    return model.eval()


def objective_flags(train: dict) -> list[tuple[str, str]]:
    """(flag, value) of train.py's objective and regulariser flags that shaped this run: the
    interpolant loss always, each other group when its term is on."""
    on = {"loss": True, "stablevm": train.get("loss_type") == "stablevm",
          "meanflow": train.get("loss_type") == "meanflow",
          "dispersive": bool(train.get("disp")) or train.get("contrastive", "none") != "none",
          "repa": bool(train.get("use_proj_loss"))}
    skip = {"legacy"} | ({"contrastive_noise", "contrastive_delta"}
                         if train.get("contrastive", "none") == "none" else set())
    out = []
    for f in dataclasses.fields(TrainingConfig):
        group, value = f.metadata["group"], train.get(f.name)
        if group in on and f.name in train and f.name not in skip and (
                on[group] or f.name in ("disp", "use_proj_loss")):
            out.append(("--" + f.name.replace("_", "-"),
                        value if isinstance(value, str) else json.dumps(value)))
    return out


def architecture(config: dict, model: HubSiT) -> list[tuple[str, str]]:
    kw = config.get("model_kwargs") or {}
    n = sum(p.numel() for name, p in model.named_parameters() if name != "pos_embed")
    return [("model", config["model"]), ("depth", model.depth), ("hidden size", model.hidden_size),
            ("heads", model.num_heads), ("patch size", model.patch_size),
            ("input", f"{config['in_channels']} x {config['input_size']} x "
                      f"{config['input_size']}"),
            ("classes", f"{config['num_classes']} (null label {config['num_classes']})"),
            ("parameters", f"{n / 1e6:.2f}M"), ("QK norm", bool(kw.get("qk_norm"))),
            ("MeanFlow (interval embedder)", bool(model.meanflow)),
            ("path", config["path_type"]), ("VAE", config["vae"] or "none (pixel space)"),
            ("latent scale / bias", f"{config['latent_scale']} / {config['latent_bias']}")]


def last_eval(run_dir: Path) -> dict | None:
    """The last line of RUN_DIR/eval.jsonl (None: no online evaluation)."""
    path = run_dir / "eval.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    lines = [line for line in lines if line.strip()]
    return json.loads(lines[-1]) if lines else None


def card_kwargs(run_dir: Path, config: dict, step: int | None, model: HubSiT,
                repo_id: str | None, out: Path) -> dict:
    """The model card's fields (:data:`CARD_TEMPLATE`)."""
    train, data = config.get("train") or {}, config.get("data") or {}
    meanflow = bool(model.meanflow)
    ckpt = repo_id if repo_id and "/" in repo_id else (
        f"YOUR_NAME/{repo_id}" if repo_id else shlex.quote(str(out)))
    evaluation = last_eval(run_dir)
    changes = [h["from_step"] for h in config.get("history") or [] if h.get("changed")]
    training = [("data", f"{data.get('dir')}: {data.get('count')} samples"),
                ("data manifest hash (`config_sha256`)", f"`{data.get('config_sha256')}`"),
                ("steps", step), ("batch size", train.get("batch_size")),
                ("learning rate", f"{train.get('learning_rate')} ({train.get('lr_schedule')})"),
                ("EMA decay", train.get("ema_decay")), ("seed", train.get("seed")),
                ("processes", config.get("world_size")),
                ("mixed precision", train.get("mixed_precision"))]
    if changes:
        training.append(("settings changed at steps", ", ".join(map(str, changes))))
    return {
        "title": repo_id or run_dir.name, "model": config["model"],
        "space": f"latents of {config['vae']}" if config["vae"] else "pixel space",
        "objective": " + ".join(objective_terms(train)) if train else "unknown",
        "steps": step, "vae": config["vae"], "ckpt": ckpt,
        "download": f"hf download {ckpt}" if repo_id else "# a local folder: nothing to download",
        "mode": "meanflow" if meanflow else "ode", "num_steps": 1 if meanflow else 50,
        "architecture": architecture(config, model), "flags": objective_flags(train),
        "training": training,
        "evaluation": [(k, v if v is None else f"{v:.6g}") for k, v in (evaluation or {}).items()
                       if k != "step"],
        "eval_step": (evaluation or {}).get("step"),
        "eval_setting": f"{train.get('eval_samples')} samples, "
                        f"{train.get('eval_num_steps') or (1 if meanflow else 50)} sampler "
                        f"steps, cfg {train.get('eval_cfg_scale')}"}


def export_run(run_dir: str | os.PathLike, out: str | os.PathLike | None = None,
               repo_id: str | None = None) -> Path:
    """Write the Hub model folder of a run (default ``RUN_DIR/hub``): config.json,
    model.safetensors and README.md, by ``save_pretrained`` into a temporary folder renamed into
    place (a previous Hub folder there is replaced; any other non-empty folder is refused)."""
    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir / "hub"
    if out.exists() and any(out.iterdir()) and not (out / HUB_WEIGHTS).is_file():
        raise UsageError(f"{out} exists and is not a Hub model folder; choose another --out")
    config, state, step = read_run(run_dir)
    model = build_hub_model(config, state)
    where = out.absolute()  # `--out .` has no name to put a temporary folder beside
    tmp = where.with_name(f".{where.name}.tmp-{os.getpid()}")
    old = where.with_name(f".{where.name}.old")
    for stale in (tmp, old):
        shutil.rmtree(stale, ignore_errors=True)
    model.save_pretrained(tmp, model_card_kwargs=card_kwargs(run_dir, config, step, model,
                                                             repo_id, out))
    # safetensors writes owner-only files; the folder is for sharing: the run export's mode
    shutil.copymode(run_dir / "ema.safetensors", tmp / HUB_WEIGHTS)
    if where.exists():
        os.replace(where, old)
    os.replace(tmp, where)
    shutil.rmtree(old, ignore_errors=True)
    return out


def push_folder(folder: Path, repo_id: str) -> tuple[bool, str]:
    """Upload ``folder`` to the Hub model repository ``repo_id`` (created if needed) with the
    standard login. Returns (pushed, one line to print): offline, without a login or on any
    failure of the upload, the line says how to push later."""
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.constants import is_offline_mode
    later = f"push it later with: hf upload {repo_id} {shlex.quote(str(folder))}"
    if is_offline_mode():
        return False, f"not pushed to the Hub (HF_HUB_OFFLINE is set); {later}"
    if get_token() is None:
        return False, f"not pushed to the Hub (not logged in: run `hf auth login`); {later}"
    try:
        api = HfApi()
        repo = api.create_repo(repo_id, repo_type="model", exist_ok=True).repo_id
        api.upload_folder(repo_id=repo, folder_path=folder, repo_type="model",
                          commit_message=f"Upload {folder.parent.name} (sitkit)")
    except Exception as e:  # network, permissions, quota, ...: the folder is written regardless
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return False, f"not pushed to the Hub ({type(e).__name__}: {reason}); {later}"
    return True, f"pushed {folder} to https://huggingface.co/{repo}"


def publish_run(run_dir: Path, repo_id: str) -> list[str]:
    """train.py --push-to-hub at the end of a run: write RUN_DIR/hub, then push it. Returns the
    lines to print; never raises for what the finished run does not depend on."""
    try:
        folder = export_run(run_dir, repo_id=repo_id)
    except (UsageError, OSError) as e:
        return [f"the Hub folder was not written ({e}); the run is complete: write and push it "
                f"with python export.py {shlex.quote(str(run_dir))} --push-to-hub "
                f"--hub-model-id {repo_id}"]
    return [f"wrote the Hub model folder {folder} (config.json, {HUB_WEIGHTS}, README.md)",
            push_folder(folder, repo_id)[1]]
