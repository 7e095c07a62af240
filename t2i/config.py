"""Typed configuration: one dataclass per concern, TOML files, typo-rejecting overrides.

A run is a :class:`Config` (data, model, loss, optim, train): TOML with one table per section
(built-ins in ``t2i/configs/``, named by stem: ``--config gan``), then ``--set section.key=value``.
A key that is not a field is rejected with the valid ones listed, before a worker starts.
"""

from __future__ import annotations

import math
import re
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

from t2i.errors import T2IError
from t2i.training.augment import parse_policy


class ConfigError(T2IError):
    """A configuration file or override that cannot be applied."""


@dataclass
class DatasetConfig:
    # Prepared dataset folder or URI (s3://bucket/f8k) holding manifest.json. "" = the
    # built-in shapes set, prepared once and cached under `cache_dir`.
    path: str = ""
    cache_dir: str = "data/cache"
    shapes_n: int = 6000           # images in the built-in shapes set when `path` is ""
    batch_size: int = 64           # per worker
    # A worker whose share of the data (pixels + caption ids of train and eval splits) fits this many MiB pulls
    # it from Ray Data once and keeps it in memory (on its GPU if any); above, every epoch streams (Flickr8k ~140).
    cache_mb: int = 2048
    eval_splits: list[str] = field(default_factory=lambda: ["dev"])
    eval_captions: int = 0         # captions scored per evaluation image every epoch (0 = all; fewer: cheaper, in turn)
    # Validation prompts rendered to a grid every epoch; empty = the dataset's defaults.
    prompts: list[str] = field(default_factory=list)
    samples_per_prompt: int = 4


@dataclass
class ModelConfig:
    family: str = "seed"           # "seed" (the presentation's model), "cvae" or "gan" (t2i.training.families)
    text_encoder: str = "mean"     # "mean" of GloVe vectors (seed), "pool" (per-word MLP, max) or "gru"
    latent_dim: int = 128
    hidden: int = 1024             # units of the caption MLP (and of the GRU)
    width: int = 84                # channel multiplier of the conv decoder/encoder (7.5M params: the seed's size)
    dropout: float = 0.0
    # "plain": z -> transposed convs (the seed's); "modulated": the caption also scales and
    # shifts every decoder block (DF-GAN's affine fusion; cvae only, always on for gan).
    decoder: str = "plain"
    # the modulated decoder's x2 upsampling: "nearest" (StackGAN's, DF-GAN's) or a low-pass against its
    # spectral copies (Durall et al. 2020): "bilinear" (blurred the gan's draws) or "lanczos" (windowed sinc)
    upsample: str = "nearest"
    # how its 3x3 convs pad: "zeros" or "reflect" (no image edge to draw frames on: docs/results.md)
    padding: str = "zeros"
    # its blocks: "plain" (upsample, one conv, BN, caption affine) or "residual" (DF-GAN's, ~1.6x the convs)
    block: str = "plain"
    activation: str = "leaky"      # the blocks' LeakyReLU as is ("leaky") or at twice the rate, low-passed ("filtered")
    pixel_noise: bool = False      # gan: StyleGAN's per-pixel noise inputs in every block (fine detail, no grid)
    noise_basis: str = "gaussian"  # gan: the noise's fixed basis, "gaussian" draws or "flat" (no spectral speckle)
    noise_images: str = "shared"   # gan: one noise image per block ("shared", StyleGAN's) or one per channel
    noise_spectrum: str = "fixed"  # gan: the noise images' spectrum, "fixed" or "learned" (a gain per frequency)
    image_size: int = 64


@dataclass
class LossConfig:
    likelihood: str = "gaussian"   # VAE reconstruction: "gaussian" (squared error, the seed's) or "bernoulli"
    beta: float = 1.0              # weight of the KL term (Higgins et al. 2017)
    kl_warmup_epochs: int = 0      # linear KL annealing from 0 to beta (Bowman et al. 2016)
    free_bits: float = 0.0         # nats per latent dim not penalised (Kingma et al. 2016)
    gp_weight: float = 2.0         # gan: matching-aware gradient penalty k (DF-GAN; power p = 6)
    align_weight: float = 0.0      # gan: sentence-loss weight (AttnGAN's lambda) from an encoder not the judge; 0 = off
    augment: str = ""              # gan: DiffAugment policy for all D sees, e.g. "translation,cutout"
                                   # (ops: color, translation, cutout (Zhao et al. 2020), scale (ADA)); "" = off
    align_augment: str = ""        # gan: those ops (and "scale") on what the alignment-loss encoder scores, a new
                                   # view each step (G cannot fit one encoder's blind spots); "" = as drawn
    mode_seeking_weight: float = 0.0  # gan: MSGAN's term (Mao et al. 2019) against one caption's draws collapsing; 0 = off
    spectrum_weight: float = 0.0   # gan: the draws' 2-D power spectrum against the photos' (Durall et al. 2020); 0 = off
    spectrum_weighting: str = "uniform"  # each frequency alike; "ring": each radius alike; "power": + its share of the photos' power
    spectrum_outlier_gap: float = 0.0  # gan: > 0 weighs a frequency x (1 + (gap / this)^2): the largest gaps pull hardest
    spectrum_window: str = "none"  # gan: the spectra as they are, "hann"-windowed (no edge jumps) or "both"
    spectrum_integral: float = 0.0  # gan: > 0 adds integral control: a gap that persists builds its own pull; 0 = off
    spectrum_measure: str = "training"  # gan: the gap read from the training batch or "inference" draws (BN's running stats)
    spectrum_integral_limit: float = 0.0  # gan: > 0 bounds the integral to the pull of a gap this many decades; 0 = none


@dataclass
class OptimConfig:
    name: str = "rmsprop"          # "rmsprop" (the seed's) or "adam"
    lr: float = 1e-3               # the generator's (and the VAE's) learning rate
    disc_lr: float = 4e-4          # gan: the discriminator's (DF-GAN: 4e-4 with G at 1e-4)
    beta1: float = 0.9             # Adam's betas (DF-GAN trains both networks with 0.0, 0.9)
    beta2: float = 0.999
    weight_decay: float = 0.0
    schedule: str = "constant"     # "constant", "exponential", "plateau" or "cosine"
    gamma: float = 0.9             # per-epoch decay ("exponential") or factor ("plateau")
    patience: int = 1              # epochs without dev improvement before "plateau" decays
    grad_clip: float = 5.0         # max global grad norm; 0 disables
    ema_decay: float = 0.0         # gan: sample, select and serve a moving average of G's weights (Karras et al. 2018); 0 = off


@dataclass
class TrainConfig:
    name: str = ""                 # run name ("" = <dataset>-<family>); the same name resumes
    storage_path: str = "runs"     # where runs live: local folder, shared mount or URI (s3://bucket/runs)
    assume_shared_storage: bool = False  # trust that local paths are mounted on every host (skips the check)
    epochs: int = 10
    num_workers: int = 1           # 0 = run the loop in this process (debugging)
    use_gpu: str = "auto"          # "auto" (GPU when the cluster has one), "true", "false"
    gpus_per_worker: float = 1.0   # a GPU worker's share: 0.5 packs two runs or Tune trials on a GPU (one worker each;
                                   # the gan's step leaves three quarters of an H200 idle: docs/benchmarks.md)
    cpus_per_worker: float = 0.0   # 0 = from the cluster: 0.45 where it has <= 4 CPUs (Ray Data keeps one),
                                   # else 75% of a node's CPUs per GPU (or per worker); the run's first line says
    placement_strategy: str = "PACK"  # workers on as few nodes as possible; "SPREAD" over nodes
    amp: bool = True               # mixed precision, only ever on GPU
    seed: int = 0
    max_failures: int = 1          # worker-group restarts from the last checkpoint
    keep_best: int = 2             # checkpoints kept by dev loss (the latest is always kept)
    data_cpu_limit: float = 1.0    # Ray Data CPU cap on clusters of <= 4 CPUs (larger ones: none); 0 = never
    # Curves, grids, hyperparameters besides metrics.csv (t2i.training.tracking): "tensorboard" (event files in
    # the run folder), "mlflow" (+ an MLflow run at MLFLOW_TRACKING_URI, else <storage_path>/mlruns), "none".
    tracking: str = "tensorboard"
    torch_threads: int = 0         # intra-op threads per worker; 0 = the whole CPUs Ray assigned it, or with
                                   # a fraction of one, the node's usable CPUs (affinity, cgroup) / its workers


@dataclass
class Config:
    data: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return asdict(self)


# A tiny model for two epochs on a small shapes set: `--smoke-test` checks a setup in a minute or two.
SMOKE_TEST = ("data.shapes_n=300", "data.batch_size=32", "train.epochs=2", "model.width=8", "model.hidden=64",
              "model.latent_dim=8", "data.samples_per_prompt=2")

CHOICES = {
    "model.family": ("seed", "cvae", "gan"), "model.text_encoder": ("mean", "pool", "gru"),
    "model.decoder": ("plain", "modulated"), "model.upsample": ("nearest", "bilinear", "lanczos"),
    "model.block": ("plain", "residual"), "model.padding": ("zeros", "reflect"), "model.activation": ("leaky", "filtered"),
    "model.noise_basis": ("gaussian", "flat"), "model.noise_images": ("shared", "per_channel"),
    "model.noise_spectrum": ("fixed", "learned"), "loss.likelihood": ("gaussian", "bernoulli"),
    "loss.spectrum_weighting": ("uniform", "ring", "power"), "loss.spectrum_window": ("none", "hann", "both"),
    "loss.spectrum_measure": ("training", "inference"), "train.tracking": ("tensorboard", "mlflow", "none"),
    "optim.name": ("rmsprop", "adam"), "optim.schedule": ("constant", "exponential", "plateau", "cosine"),
    "train.use_gpu": ("auto", "true", "false"), "train.placement_strategy": ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"),
}


def _section_types(section_cls) -> dict[str, Any]:
    hints = get_type_hints(section_cls)
    return {f.name: hints[f.name] for f in fields(section_cls)}


def valid_keys() -> list[str]:
    sections = get_type_hints(Config)
    return [f"{name}.{k}" for name, cls in sections.items() for k in _section_types(cls)]


def _coerce(key: str, value: Any, typ: Any) -> Any:
    """Convert a TOML value or a command-line string to the field's type."""
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
    elif typ in (int, float):
        exact = (int, float) if typ is float else int  # an int field never takes 2.5
        number = None
        if isinstance(value, exact) and not isinstance(value, bool):
            number = typ(value)
        elif isinstance(value, str):
            try:
                number = typ(value)
            except ValueError:
                pass
        if number is not None:
            if not math.isfinite(number):  # nan and inf pass every range check below
                raise ConfigError(f"{key}: must be a finite number, got {value!r}")
            return number
    elif typ is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif typ == list[str]:
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value)
        if isinstance(value, str):
            return [v.strip() for v in value.split("|") if v.strip()] if value else []
    raise ConfigError(f"{key}: cannot use {value!r} as {getattr(typ, '__name__', typ)}")


def _get(cfg: Config, key: str) -> Any:
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def _set(cfg: Config, key: str, value: Any) -> None:
    section_name, _, name = key.partition(".")
    section_names = [f.name for f in fields(Config)]
    if section_name not in section_names or not name:
        raise ConfigError(f"unknown config key {key!r}; keys look like section.name with section in "
                          f"{section_names}. Valid keys: {', '.join(valid_keys())}")
    section = getattr(cfg, section_name)
    types = _section_types(type(section))
    if name not in types:
        raise ConfigError(f"unknown config key {key!r}. Valid keys in [{section_name}]: {', '.join(sorted(types))}")
    coerced = _coerce(key, value, types[name])
    if key in CHOICES and coerced not in CHOICES[key]:
        raise ConfigError(f"{key} must be one of {CHOICES[key]}, got {coerced!r}")
    setattr(section, name, coerced)


def apply(cfg: Config, values: dict[str, Any]) -> Config:
    """Apply a nested ``{section: {key: value}}`` mapping (as read from TOML)."""
    for section_name, section_values in values.items():
        if not isinstance(section_values, dict):
            raise ConfigError(f"top-level key {section_name!r} must be a [section] table; "
                              f"sections: {[f.name for f in fields(Config)]}")
        for name, value in section_values.items():
            _set(cfg, f"{section_name}.{name}", value)
    return cfg


def parse_override(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} must look like section.key=value")
    return key.strip(), value.strip()


BUILTIN_CONFIGS = Path(__file__).resolve().parent / "configs"  # shipped inside the package
SWEEP_CONFIGS = BUILTIN_CONFIGS / "sweeps"


def builtin_names(folder: Path = BUILTIN_CONFIGS) -> list[str]:
    return sorted(p.stem for p in folder.glob("*.toml"))


def resolve_config_file(name_or_path: str | Path, folder: Path = BUILTIN_CONFIGS) -> Path:
    """A config file by path, or a built-in one by name: ``gan``, ``gan.toml`` and the
    repository-relative ``configs/gan.toml`` all name ``t2i/configs/gan.toml``, so the same
    command works in a checkout, from another folder and from an installed package."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    parts = path.parts[1:] if path.parts[:1] == ("configs",) else path.parts
    if parts[:1] == ("sweeps",) and folder == SWEEP_CONFIGS:
        parts = parts[1:]
    if parts and not path.is_absolute():
        candidate = folder.joinpath(*parts)
        candidate = candidate if candidate.suffix == ".toml" else candidate.with_name(candidate.name + ".toml")
        if candidate.is_file():
            return candidate
    raise ConfigError(f"config file not found: {name_or_path} (a path, or a built-in name: "
                      f"{', '.join(builtin_names(folder))})")


def apply_file(cfg: Config, path: str | Path, chain: tuple[Path, ...] = ()) -> Config:
    """Apply a config file; a top-level ``extends = "gan"`` (a built-in name or a path
    beside it) applies that file first, so a variant names only what it changes."""
    path = resolve_config_file(path)
    if path.resolve() in chain:
        raise ConfigError(f"{path}: 'extends' loops back to itself ({' -> '.join(p.name for p in (*chain, path))})")
    try:
        values = tomllib.loads(path.read_text(encoding="utf-8"))
        base = values.pop("extends", None)
        if base is not None:
            if not isinstance(base, str) or not base:
                raise ConfigError(f"'extends' must name a config (e.g. extends = \"gan\"), got {base!r}")
            beside = path.parent / base
            apply_file(cfg, beside if beside.is_file() else base, (*chain, path.resolve()))
        apply(cfg, values)
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    except ConfigError as exc:
        raise ConfigError(exc.args[0] if str(exc).startswith(str(path)) else f"{path}: {exc}") from exc
    return cfg


def load(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the TOML file (if any, after the one it ``extends``), then ``key=value`` overrides."""
    cfg = Config()
    if path:
        apply_file(cfg, path)
    overridden = dict(parse_override(item) for item in overrides)
    for key, value in overridden.items():
        _set(cfg, key, value)
    for key in {k for s, (keys, *_) in SWITCHES.items() if s in overridden and not _get(cfg, s) for k in keys} - set(overridden):
        _set(cfg, key, _get(Config(), key))  # under a switch turned off here, the file's settings go back to defaults
    validate(cfg)
    return cfg


def from_dict(values: dict[str, dict[str, Any]]) -> Config:
    """Rebuild a Config saved with :meth:`Config.to_dict` (e.g. inside a checkpoint)."""
    cfg = apply(Config(), values)
    validate(cfg)
    return cfg


NOISE_SHAPE = ("model.noise_basis", "model.noise_images", "model.noise_spectrum")  # meaningful with model.pixel_noise only
SPECTRAL = tuple(f"loss.spectrum_{k}" for k in ("weighting", "outlier_gap", "window", "integral", "measure", "integral_limit"))
SWITCHES = {"model.pixel_noise": (NOISE_SHAPE, "the noise inputs, which are", "model.pixel_noise = true"),  # keys moot while off
            "loss.spectrum_weight": (SPECTRAL, "the spectral term, which is", "loss.spectrum_weight > 0"),
            "loss.spectrum_integral": (("loss.spectrum_integral_limit",), "the spectral term's integral, which is", "loss.spectrum_integral > 0")}
MIN_SHAPES = 50  # the built-in set needs some images in each of its splits
SAFE_NAME = re.compile(r"(?!\.{1,2}$)[A-Za-z0-9._-]{1,128}")  # a run folder never escapes storage_path


def validate(cfg: Config) -> None:
    problems = []
    if cfg.model.image_size != 64:
        problems.append("model.image_size: only 64 is supported")
    if cfg.model.latent_dim < 1 or cfg.model.hidden < 1 or cfg.model.width < 1:
        problems.append("model.latent_dim, model.hidden and model.width must be >= 1")
    if not 0.0 <= cfg.model.dropout < 1.0:
        problems.append("model.dropout must be in [0, 1)")
    if cfg.optim.lr <= 0 or cfg.optim.disc_lr <= 0:
        problems.append("optim.lr and optim.disc_lr must be > 0")
    if not (0 <= cfg.optim.beta1 < 1 and 0 <= cfg.optim.beta2 < 1):
        problems.append("optim.beta1 and optim.beta2 must be in [0, 1)")
    for key, plain in (("model.upsample", "nearest"), ("model.block", "plain"), ("model.padding", "zeros"), ("model.activation", "leaky")):
        if cfg.model.decoder == "plain" and (value := _get(cfg, key)) != plain:
            problems.append(f"{key}: the plain decoder upsamples with transposed convs; {value!r} needs model.decoder = 'modulated'")
    if cfg.model.family == "seed" and cfg.model.decoder != "plain":
        problems.append("model.decoder: the seed family decodes z alone; use 'plain' (or family 'cvae')")
    if cfg.model.family == "gan" and (cfg.model.decoder != "modulated" or cfg.optim.name != "adam"):
        problems.append("the gan family needs model.decoder = 'modulated' and optim.name = 'adam' (the built-in `gan` config)")
    if cfg.loss.beta < 0 or cfg.loss.free_bits < 0:
        problems.append("loss.beta and loss.free_bits must be >= 0")
    gan_only = ("loss.align_weight", "loss.augment", "loss.align_augment", "loss.mode_seeking_weight", "loss.spectrum_weight",
                *SPECTRAL, "optim.ema_decay", "model.pixel_noise", *NOISE_SHAPE)
    changed = [key for key in gan_only if _get(cfg, key) != _get(Config(), key)]
    if cfg.model.family != "gan" and changed:
        problems.append(f"{', '.join(changed)}: gan-family settings (the VAEs never use them); leave them at their defaults")
    for switch, (dependents, what, turn_on) in SWITCHES.items():
        if cfg.model.family == "gan" and not _get(cfg, switch) and (idle := [k for k in changed if k in dependents]):
            problems.append(f"{', '.join(idle)} shapes {what} off: set {turn_on}")
    if not 0.0 <= cfg.optim.ema_decay < 1.0:
        problems.append("optim.ema_decay must be in [0, 1) (0 = off)")
    for key in ("loss.augment", "loss.align_augment"):
        try:
            parse_policy(_get(cfg, key))
        except ValueError as exc:
            problems.append(f"{key}: {exc}")
    minimums = {"loss.align_weight": 0, "loss.mode_seeking_weight": 0, "loss.spectrum_weight": 0, "optim.grad_clip": 0,
                "loss.spectrum_outlier_gap": 0, "loss.spectrum_integral": 0, "loss.spectrum_integral_limit": 0, "optim.weight_decay": 0, "optim.gamma": 0, "loss.gp_weight": 0, "train.cpus_per_worker": 0, "train.data_cpu_limit": 0,
                "train.torch_threads": 0, "train.keep_best": 1, "train.max_failures": -1, "optim.patience": 0,
                "data.samples_per_prompt": 1, "data.shapes_n": MIN_SHAPES, "loss.kl_warmup_epochs": 0,
                "train.epochs": 1, "train.num_workers": 0, "data.batch_size": 1, "data.eval_captions": 0,
                "data.cache_mb": 0}
    for key, low in minimums.items():
        if (value := _get(cfg, key)) < low:
            problems.append(f"{key} must be >= {low}, got {value}" + (" (-1: retry without end)" if low == -1 else ""))
    if not 0 < cfg.train.gpus_per_worker <= 1 or (cfg.train.gpus_per_worker < 1 and cfg.train.num_workers > 1):
        problems.append(f"train.gpus_per_worker must be in (0, 1], and 1 with several workers (NCCL refuses two ranks "
                        f"of one run on one GPU), got {cfg.train.gpus_per_worker:g} with {cfg.train.num_workers} workers")
    if cfg.train.name and not SAFE_NAME.fullmatch(cfg.train.name):
        problems.append(f"train.name {cfg.train.name!r} must be one folder name: letters, digits, '.', '_', '-' "
                        "(not '.' or '..')")
    if problems:
        raise ConfigError("; ".join(problems))
    from t2i.models import size_problem  # noqa: PLC0415 - the models import this module's ModelConfig

    if problem := size_problem(cfg.model):
        raise ConfigError(problem)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise ConfigError(f"cannot write {value!r} to TOML")


def dumps(cfg: Config) -> str:
    """TOML text that :func:`load` reads back to an equal Config."""
    lines = []
    for section, values in cfg.to_dict().items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
        lines.append("")
    return "\n".join(lines)
