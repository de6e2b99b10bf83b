"""The validated config as typed, frozen settings: one dataclass per section of the schema.

:func:`ptm_mamba.config.load_config` (and the Snakefile, through the same function) validates the
YAML and fills the schema's defaults; :meth:`Settings.from_config` turns that dict into these objects,
and every stage takes the sections it needs. Values derived from several keys live here once, as
properties (``training.precomputed``, ``dataset.max_residues``, ...). The field names are the schema's
keys (a test holds them equal), so ``settings.training.lr`` is the config's ``training.lr``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .tokenizer import ROWS_AROUND_RESIDUES


@dataclass(frozen=True)
class SourceSettings:
    """``dataset.source``: a raw dataset the prepare stage turns into the pipeline's CSV."""

    format: str
    path: str


@dataclass(frozen=True)
class DatasetSettings:
    dataset_location: str
    source: SourceSettings | None
    sequence_column_name: str
    id_column_name: str | None
    val_size: float
    test_size: float
    split_seed: int
    split_by: str
    cluster_identity: float
    cluster_coverage: float
    max_sequence_length: int
    unknown_ptm: str

    @property
    def max_residues(self) -> int:
        """Residues that fit a sequence of ``max_sequence_length`` tokens with its <cls> and <eos>."""
        return self.max_sequence_length - ROWS_AROUND_RESIDUES

    @property
    def by_cluster(self) -> bool:
        return self.split_by == "cluster"


@dataclass(frozen=True)
class EsmSettings:
    model: str
    repr_layer: int | None


@dataclass(frozen=True)
class EmbeddingSettings:
    shards: int
    mask_replicates: int
    max_tokens_per_batch: int
    batch_size: int | None
    window: int
    overlap: int
    dtype: str = "float16"


@dataclass(frozen=True)
class TrainingSettings:
    use_esm: bool
    use_precomputed_embeddings: bool
    embeddings_dir: str
    output_dir: str
    num_train_epochs: int
    max_steps: int | None
    log_steps: int
    per_device_train_batch_size: int
    max_tokens_per_batch: int
    lr: float
    weight_decay: float
    adam_betas: tuple[float, float]
    warmup_steps: int
    lr_schedule: str
    min_lr_ratio: float
    grad_clip: float | None
    mask_prob: float
    random_mask_only_prob: float
    mixed_precision: str
    num_processes: int
    num_machines: int
    num_workers: int
    resume_from_checkpoint: str | None
    gradient_accumulation_steps: int
    log_with: str
    init_from: str | None

    @property
    def precomputed(self) -> bool:
        """Whether training reads stored ESM-2 embeddings (the embed stage runs) instead of running ESM-2."""
        return self.use_esm and self.use_precomputed_embeddings


@dataclass(frozen=True)
class ModelSettings:
    model_type: str
    d_model: int
    n_layer: int
    ssm_cfg: dict = field(hash=False)
    scan: str


@dataclass(frozen=True)
class PredictSettings:
    inputs: tuple[str, ...]
    pooled: bool
    max_tokens_per_batch: int


@dataclass(frozen=True)
class EvaluateSettings:
    """``evaluate``: the PTM-site probes of the evaluate stage (:mod:`ptm_mamba.evaluate`)."""

    min_sites: int
    folds: int
    bootstrap: int
    window: int
    seed: int
    max_candidates: int | None


@dataclass(frozen=True)
class Settings:
    """The whole validated config. ``as_dict()`` gives back the plain mapping (for config.yaml)."""

    run_name: str | None
    seed: int
    device: str
    dataset: DatasetSettings
    esm: EsmSettings
    embedding: EmbeddingSettings
    training: TrainingSettings
    model: ModelSettings
    predict: PredictSettings
    evaluate: EvaluateSettings
    # A sweep: run name -> that run's overrides (plain data, as validated); None without one. The
    # settings a run trains with are config.settings_of_run(config, name)'s, whose runs is None.
    runs: dict[str, dict] | None = field(hash=False)
    # The key order of the config these settings came from (the user's order, then the defaults the
    # schema filled in): as_dict() writes config.yaml in it, so the same config gives the same bytes.
    key_order: Any = field(default=None, compare=False, repr=False)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "Settings":
        """Settings of a config that :func:`ptm_mamba.config.validate` has passed (defaults filled)."""
        dataset = dict(config["dataset"])
        if dataset["source"] is not None:
            dataset["source"] = SourceSettings(**dataset["source"])
        training = dict(config["training"], adam_betas=tuple(config["training"]["adam_betas"]))
        return cls(
            run_name=config["run_name"], seed=config["seed"], device=config["device"],
            dataset=DatasetSettings(**dataset),
            esm=EsmSettings(**config["esm"]),
            embedding=EmbeddingSettings(**config["embedding"]),
            training=TrainingSettings(**training),
            model=ModelSettings(**dict(config["model"], ssm_cfg=dict(config["model"]["ssm_cfg"]))),
            predict=PredictSettings(**dict(config["predict"], inputs=tuple(config["predict"]["inputs"]))),
            evaluate=EvaluateSettings(**config["evaluate"]),
            runs=_plain(config.get("runs")),
            key_order=_key_order(config),
        )

    def as_dict(self) -> dict[str, Any]:
        """The plain mapping these settings came from (tuples as lists), as YAML and JSON write it."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "key_order"}
        if self.runs is None and "runs" not in (self.key_order or {}):  # no sweep: no runs key, as given
            del values["runs"]
        return _ordered(_plain({key: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v
                                for key, v in values.items()}), self.key_order)

    def lookup(self, key: str) -> Any:
        """The plain value of a dotted config key (``"training.lr"``, ``"model"``)."""
        value: Any = self
        for part in key.split("."):
            value = getattr(value, part)
        return _plain(dataclasses.asdict(value)) if dataclasses.is_dataclass(value) else _plain(value)

    def replace(self, **sections: Any) -> "Settings":
        """A copy with some sections or top-level values replaced."""
        return dataclasses.replace(self, **sections)


def _key_order(config: Any) -> Any:
    """The nested key order of a mapping: ``{key: order of its value}`` (None for other values)."""
    return {key: _key_order(value) for key, value in config.items()} if isinstance(config, dict) else None


def _ordered(values: Any, order: Any) -> Any:
    """``values`` (a plain mapping) with its keys in ``order`` (:func:`_key_order`), others after."""
    if not isinstance(values, dict) or not isinstance(order, dict):
        return values
    keys = [k for k in order if k in values] + [k for k in values if k not in order]
    return {key: _ordered(values[key], order.get(key)) for key in keys}


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value

