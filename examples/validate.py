"""Checks of a composed config that fail fast, before any data is read or a process starts.

Every error names the config key and says what to do. Dataset presence is checked by the
DataModules' ``check()`` (see :mod:`examples.data`).
"""

from __future__ import annotations

import importlib.util
import inspect
import os
from collections.abc import Mapping
from typing import Any

import torch
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key and the fix."""


def _target(node: Any) -> str:
    if isinstance(node, (Mapping, DictConfig)):
        return str(node.get("_target_") or "")
    return ""


def _num(cfg: DictConfig, key: str) -> Any:
    try:
        return OmegaConf.select(cfg, key, throw_on_missing=True)
    except Exception as err:  # interpolation/resolver errors, missing values
        raise ConfigError(f"{key} cannot be resolved: {err}") from err


def check_optimizer(cfg: DictConfig) -> None:
    opt = cfg.get("optimizer")
    if not _target(opt):
        raise ConfigError("optimizer has no _target_: choose one with optimizer=sgd|sgdm|adamw")
    lr = _num(cfg, "optimizer.lr")
    if not isinstance(lr, (int, float)) or lr <= 0:
        raise ConfigError(f"optimizer.lr must be a number > 0, got {lr!r}; e.g. optimizer.lr=0.1")
    wd = _num(cfg, "optimizer.weight_decay")
    if wd is not None and (not isinstance(wd, (int, float)) or wd < 0):
        raise ConfigError(f"optimizer.weight_decay must be ≥ 0, got {wd!r}")
    if "momentum" in opt:
        m = _num(cfg, "optimizer.momentum")
        if not isinstance(m, (int, float)) or not 0 <= m < 1:
            raise ConfigError(f"optimizer.momentum must be in [0, 1), got {m!r}")
    for key in ("norm_weight_decay", "bias_weight_decay"):
        v = cfg.model.get(key)
        if v is not None and (not isinstance(v, (int, float)) or v < 0):
            raise ConfigError(f"model.{key} must be null or ≥ 0, got {v!r}")


def check_scheduler(cfg: DictConfig) -> None:
    sched = cfg.get("scheduler") or {}
    interval = sched.get("interval", "epoch")
    if interval not in ("epoch", "step"):
        raise ConfigError(f"scheduler.interval must be 'epoch' or 'step', got {interval!r}")
    if "gamma" in sched and not (isinstance(sched.gamma, (int, float)) and sched.gamma > 0):
        raise ConfigError(f"scheduler.gamma must be > 0, got {sched.gamma!r}")
    if "milestones" in sched:
        ms = list(sched.milestones)
        if any(not isinstance(m, int) or m <= 0 for m in ms) or ms != sorted(ms):
            raise ConfigError(f"scheduler.milestones must be increasing positive integers, got {ms}")


def _choice(group: str, node: Any) -> str:
    """The option chosen for a config group (``digits``), else the short ``_target_`` name."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        choice = OmegaConf.select(HydraConfig.get(), f"runtime.choices.{group}", default=None)
        if choice:
            return str(choice)
    return _target(node).rsplit(".", 1)[-1] or "?"


def check_task(cfg: DictConfig) -> None:
    """The model and the data must be for the same task (``task:`` in both configs)."""
    model_task, data_task = cfg.model.get("task"), cfg.data.get("task")
    if model_task is None or data_task is None or model_task == data_task:
        return
    model, data = _choice("model", cfg.model), _choice("data", cfg.data)
    raise ConfigError(
        f"model={model} (model.task={model_task}) cannot train on data={data} (data.task={data_task}); "
        f"pick a {model_task} dataset for model={model}, or a {data_task} model for data={data}"
    )


def smd_keys() -> list[str]:
    """The keys an ``smd`` config may have: ``SMDCallback``'s arguments, ``_target_``, ``enabled``."""
    from lightning_smd import SMDCallback

    params = [k for k in inspect.signature(SMDCallback.__init__).parameters if k != "self"]
    return ["_target_", "enabled", *params]


def smd_groups() -> dict[str, type]:
    """The ``smd`` keys that are option groups (``smd.detection.steps``), and the dataclass of each;
    ``smd.rescale`` is one too when it is a ``RescalePolicy`` node (``smd=rescale``)."""
    from lightning_smd import RescalePolicy
    from lightning_smd.lightning.arguments import GROUPS

    return {**GROUPS, "rescale": RescalePolicy}


def _fields(cls: type) -> list[str]:
    import dataclasses

    return [f.name for f in dataclasses.fields(cls)]


def unknown_smd_key_error(keys: list[str]) -> ConfigError:
    """The error for ``smd.<key>`` settings SMDCallback does not take, listing the valid ones."""
    valid = [k for k in smd_keys() if k != "_target_"]
    names = ", ".join(f"smd.{k}" for k in keys)
    return ConfigError(f"unknown key{'s' if len(keys) > 1 else ''} {names} (SMDCallback does not take "
                       f"{'them' if len(keys) > 1 else 'it'}); valid smd keys: {', '.join(valid)}")


def unknown_field_error(group: str, keys: list[str]) -> ConfigError:
    """The error for ``smd.<group>.<key>`` settings the group's dataclass does not have."""
    cls = smd_groups()[group]
    names = ", ".join(f"smd.{group}.{k}" for k in keys)
    return ConfigError(f"unknown key{'s' if len(keys) > 1 else ''} {names} ({cls.__name__} has no such field); "
                       f"valid: {', '.join(f'smd.{group}.{k}' for k in _fields(cls))}")


def check_cli_overrides(argv: list[str]) -> None:
    """Refuse ``smd.<key>=`` / ``+smd.<key>=`` (and ``smd.<group>.<field>=``) command-line
    overrides of unknown keys before Hydra composes (Hydra's own message does not say which keys exist)."""
    bad = []
    valid = set(smd_keys())
    groups = smd_groups()
    for arg in argv:
        name = arg.split("=", 1)[0].lstrip("+~")
        if "=" not in arg or not name.startswith("smd."):
            continue
        parts = name.split(".")
        if parts[1] not in valid:
            bad.append(parts[1])
        elif len(parts) > 2 and parts[1] in groups and parts[2] not in ("_target_", *_fields(groups[parts[1]])):
            raise unknown_field_error(parts[1], [parts[2]])
    if bad:
        raise unknown_smd_key_error(bad)


def check_smd(cfg: DictConfig) -> None:
    smd = cfg.get("smd")
    if not _target(smd) or smd.get("enabled", True) is False:
        return
    if _target(smd) == "lightning_smd.SMDCallback":
        unknown = [k for k in smd.keys() if k not in smd_keys()]
        if unknown:
            raise unknown_smd_key_error(unknown)
        for group, cls in smd_groups().items():
            node = smd.get(group)
            if not isinstance(node, (Mapping, DictConfig)):
                continue
            if _target(node) not in (f"lightning_smd.{cls.__name__}", f"{cls.__module__}.{cls.__name__}"):
                raise ConfigError(f"smd.{group}._target_ must be lightning_smd.{cls.__name__}, got {_target(node)!r}")
            if unknown := [k for k in node.keys() if k not in ("_target_", *_fields(cls))]:
                raise unknown_field_error(group, unknown)
    rescale = smd.get("rescale", False)
    if not isinstance(rescale, (Mapping, DictConfig)) and rescale not in (False, True, "drop", "continuous", "equilibrium"):
        raise ConfigError(f"smd.rescale must be false, true, 'drop', 'continuous', 'equilibrium' or a RescalePolicy "
                          f"node (smd=rescale), got {rescale!r}")
    n = smd.get("log_every_n_steps")
    if n is not None and (not isinstance(n, int) or n < 1):
        raise ConfigError(f"smd.log_every_n_steps must be null or an integer ≥ 1, got {n!r}")
    mode = (smd.get("detection") or {}).get("mode", "auto")
    if mode not in ("auto", "structural", "numerical"):
        raise ConfigError(f"smd.detection.mode must be auto, structural or numerical, got {mode!r}")


def check_strategy(cfg: DictConfig) -> None:
    target = _target(cfg.get("strategy"))
    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    if target.endswith("FSDPStrategy"):
        if accelerator == "cpu" or not torch.cuda.is_available():
            raise ConfigError(
                "strategy=fsdp (FSDP1) needs CUDA in Lightning 2.6 (it refuses accelerator=cpu); "
                "on CPU use strategy=fsdp2 (ModelParallelStrategy + fully_shard) or strategy=ddp_spawn"
            )
    if target.endswith("DeepSpeedStrategy") and importlib.util.find_spec("deepspeed") is None:
        raise ConfigError(
            "strategy=deepspeed needs the `deepspeed` package, which is not installed: "
            "`pip install deepspeed` (CUDA only), or pick strategy=ddp / fsdp / fsdp2"
        )
    if target.endswith("ModelParallelStrategy"):
        cls = get_class(cfg.model._target_)
        if "fully_shard" not in inspect.signature(cls.__init__).parameters:
            raise ConfigError(
                f"strategy=fsdp2 shards the model in configure_model(); model={cls.__name__} does not "
                "support it. Use a classification model (digits_cnn, resnet18_cifar, resnet50, "
                "mobilenet_v2) or strategy=ddp"
            )
        params = inspect.signature(cls.__init__).parameters
        for key, strategy in (("tensor_parallel", "fsdp2_tp"), ("hsdp_shard_size", "hsdp")):
            if cfg.model.get(key) and key not in params:
                raise ConfigError(
                    f"strategy={strategy} sets model.{key}, which model={cls.__name__} does not take; "
                    "use model=qknorm_transformer, or strategy=fsdp2"
                )
    if target.endswith("DDPStrategy") and cfg.strategy.get("start_method", "popen") == "popen":
        _check_ddp_multirun(cfg)


def _check_ddp_multirun(cfg: DictConfig) -> None:
    """Lightning's DDP re-runs sys.argv per rank: that breaks a local Hydra multirun."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return
    hc = HydraConfig.get()
    launched_outside = any(k in os.environ for k in ("LOCAL_RANK", "SLURM_PROCID", "TORCHELASTIC_RUN_ID"))
    basic = "BasicLauncher" in str(OmegaConf.select(hc, "launcher._target_", default=""))
    if hc.mode == RunMode.MULTIRUN and basic and not launched_outside:
        raise ConfigError(
            "strategy=ddp cannot run inside a local Hydra multirun (Lightning re-launches the script "
            "per rank); use strategy=ddp_spawn, or hydra/launcher=slurm, or torchrun"
        )


def check_trainer(cfg: DictConfig) -> None:
    t = cfg.trainer
    if t.get("max_epochs") in (None, -1) and t.get("max_steps", -1) in (None, -1):
        raise ConfigError("set trainer.max_epochs or trainer.max_steps (both are unbounded)")
    if int(t.get("num_nodes", 1)) < 1:
        raise ConfigError(f"trainer.num_nodes must be ≥ 1, got {t.num_nodes}")


def _preset(cfg: DictConfig) -> str:
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        choice = OmegaConf.select(HydraConfig.get(), "runtime.choices.experiment", default=None)
        if choice:
            return f"experiment={choice}"
    return "this config"


def machine_forms(cfg: DictConfig) -> tuple[str, str]:
    """The overrides that run ``cfg`` on one GPU and on the CPU (what the README's preset table lists)."""
    common = ["trainer.devices=1", "strategy=single"]
    if cfg.trainer.get("sync_batchnorm"):
        common.append("trainer.sync_batchnorm=false")
    return " ".join(["trainer.accelerator=gpu", *common]), " ".join(["trainer.accelerator=cpu", *common])


def check_machine(cfg: DictConfig) -> None:
    """The accelerator, device count and SyncBatchNorm the config asks for must exist on this machine
    (a paper preset asks for 8 GPUs): refuse before Lightning does, with the one-GPU and CPU overrides."""
    from examples.resolvers import device_count

    t = cfg.trainer
    accelerator = str(t.get("accelerator", "auto")).lower()
    try:
        devices = device_count(t.get("devices", "auto"), accelerator)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    gpu_form, cpu_form = machine_forms(cfg)
    scaled = (" The learning rate (and the preset's schedule) follow the total batch "
              "data.batch_size × trainer.devices × trainer.num_nodes, as the preset states.")
    if accelerator in ("gpu", "cuda") and gpus == 0:
        raise ConfigError(
            f"{_preset(cfg)} runs on CUDA GPUs (trainer.accelerator={accelerator}, trainer.devices={t.get('devices')}, "
            f"trainer.num_nodes={t.get('num_nodes', 1)}) and this machine has none. On one GPU add: {gpu_form}. "
            f"On the CPU add: {cpu_form}.{scaled}"
        )
    if accelerator in ("gpu", "cuda", "auto") and gpus and devices > gpus and not _launched_by_cluster():
        raise ConfigError(
            f"{_preset(cfg)} asks for trainer.devices={t.get('devices')} GPUs per node and this machine has {gpus}: "
            f"set trainer.devices={gpus} (one GPU: {gpu_form}), or run it through SLURM (README, 'Where each "
            f"preset runs').{scaled}"
        )
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and gpus == 0)
    if t.get("sync_batchnorm") and on_cpu:
        raise ConfigError(
            "trainer.sync_batchnorm=true needs CUDA GPUs: torch's SyncBatchNorm refuses CPU tensors, and with one "
            f"process there is nothing to synchronize. On the CPU add: {cpu_form}"
        )


def _launched_by_cluster() -> bool:
    """Under SLURM / torchrun the process sees its own share of the node's GPUs."""
    return any(k in os.environ for k in ("SLURM_JOB_ID", "LOCAL_RANK", "TORCHELASTIC_RUN_ID"))


def world_size(cfg: DictConfig) -> int:
    """Processes of the fit: devices per node (``auto`` resolved as Lightning does) × nodes."""
    from examples.resolvers import device_count

    return device_count(cfg.trainer.get("devices", "auto"), cfg.trainer.get("accelerator", "auto")) * int(
        cfg.trainer.get("num_nodes", 1))


def check_data(datamodule: Any, cfg: DictConfig) -> None:
    """``datamodule.check(world_size=...)``: the dataset on disk against the config, before the model is built."""
    check = getattr(datamodule, "check", None)
    if check is None:
        return
    if "world_size" in inspect.signature(check).parameters:
        check(world_size=world_size(cfg))
    else:
        check()


def validate_config(cfg: DictConfig) -> None:
    """Run all checks; raise :class:`ConfigError` on the first problem."""
    for key in ("data", "model", "trainer"):
        if not _target(cfg.get(key)):
            raise ConfigError(f"the `{key}` config group is missing or has no _target_")
    check_task(cfg)
    check_trainer(cfg)
    check_optimizer(cfg)
    check_scheduler(cfg)
    check_smd(cfg)
    check_strategy(cfg)
    check_machine(cfg)
