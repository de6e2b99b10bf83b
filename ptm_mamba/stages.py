"""What each stage's result depends on, listed once.

:data:`DEPENDS_ON` names, per stage, the config keys that change the stage's
result, and the inputs it depends on by content (the dataset CSV, the ESM-2
weights); :data:`NO_RESULT_KEYS` names the keys that change no stage's result (a
test holds every key of the schema in one or the other). Both users of "is this
output still valid?" read it:

- Snakemake's rerun triggers: each rule carries :func:`stage_fingerprint` as a
  param, so changing a listed key reruns the stage and what depends on it, and
  changing any other key reruns nothing;
- the stale checks: a stage records :func:`stage_settings` in what it writes
  (``summary.json`` of the split, the first line of the cluster stage's ``clusters.tsv``,
  the prepare stage's ``*.summary.json``, the HDF5 attribute ``settings`` of the
  embeddings, the checkpoints of training), and a stage that reads those files
  compares them with its settings through :func:`check_settings`.

The recorded values are the config's plain JSON values (``Settings.lookup``), so records
written before typed settings existed compare equal.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Callable

from .errors import PipelineError
from .esm_weights import esm_identity
from .hashing import file_sha256
from .settings import Settings

SPLIT, EMBED, TRAIN = "split", "embed", "train"
PREPARE, CLUSTER = "prepare", "cluster"
EVALUATE = "evaluate"


def source_identity(source: dict | None) -> dict | None:
    """What a raw dataset source (``dataset.source``) means: its format and its file's content hash."""
    return None if source is None else {"format": source["format"], "sha256": file_sha256(source["path"])}


def _has_source(settings: Settings) -> bool:
    return settings.dataset.source is not None


def _by_cluster(settings: Settings) -> bool:
    return settings.dataset.by_cluster


def _uses_esm(settings: Settings) -> bool:
    return settings.training.use_esm


def _precomputed(settings: Settings) -> bool:
    return settings.training.precomputed


def _int8(settings: Settings) -> bool:
    return settings.embedding.dtype != "float16"


@dataclass(frozen=True)
class Dep:
    """A config key a stage's result depends on; ``identity`` maps its value to what matters
    (e.g. a path to its file's content hash); ``when`` limits it to some modes."""

    key: str
    identity: Callable[[Any], Any] | None = None
    when: Callable[[Settings], bool] | None = None


# The dataset's proteins, by content. A CSV made by the prepare stage counts by its source's content:
# it is a function of the source, and it does not exist yet when Snakemake computes the fingerprints.
_DATASET = (
    Dep("dataset.dataset_location", identity=file_sha256, when=lambda s: not _has_source(s)),
    Dep("dataset.source", identity=source_identity, when=_has_source),
    Dep("dataset.sequence_column_name"),
    Dep("dataset.id_column_name"),
)

DEPENDS_ON: dict[str, tuple[Dep, ...]] = {
    PREPARE: (Dep("dataset.source", identity=source_identity),),
    CLUSTER: (*_DATASET, Dep("dataset.cluster_identity"), Dep("dataset.cluster_coverage")),
    SPLIT: (
        *_DATASET,
        Dep("dataset.val_size"),
        Dep("dataset.test_size"),
        Dep("dataset.split_seed"),
        # only with split_by: cluster, so that the settings of random splits stay what they were
        Dep("dataset.split_by", when=_by_cluster),
        Dep("dataset.cluster_identity", when=_by_cluster),
        Dep("dataset.cluster_coverage", when=_by_cluster),
    ),
    EMBED: (
        Dep("esm.model", identity=esm_identity),
        Dep("esm.repr_layer"),
        Dep("dataset.unknown_ptm"),
        Dep("embedding.mask_replicates"),
        Dep("embedding.window"),
        Dep("embedding.overlap"),
        Dep("training.mask_prob"),
        # listed only away from its default: stores made before the key existed stay valid
        Dep("embedding.dtype", when=_int8),
    ),
    TRAIN: (
        Dep("seed"),
        Dep("dataset.max_sequence_length"),
        Dep("dataset.unknown_ptm"),
        Dep("model", identity=lambda m: {k: v for k, v in m.items() if k != "scan"}),  # scan: speed, not results
        Dep("esm.model", identity=esm_identity, when=_uses_esm),
        Dep("esm.repr_layer", when=_uses_esm),
        Dep("embedding.mask_replicates", when=_precomputed),
        Dep("embedding.dtype", when=lambda s: _precomputed(s) and _int8(s)),
        *(Dep(f"training.{key}") for key in (
            "use_esm", "use_precomputed_embeddings", "num_train_epochs", "max_steps", "log_steps",
            "per_device_train_batch_size", "max_tokens_per_batch", "lr", "weight_decay", "adam_betas",
            "warmup_steps", "lr_schedule", "min_lr_ratio", "grad_clip", "mask_prob", "random_mask_only_prob",
            "mixed_precision", "num_processes")),
        # listed only away from their defaults: results made before these keys existed stay valid
        Dep("training.gradient_accumulation_steps", when=lambda s: s.training.gradient_accumulation_steps != 1),
        Dep("training.init_from", identity=file_sha256, when=lambda s: s.training.init_from is not None),
        Dep("training.num_machines", when=lambda s: s.training.num_machines > 1),
    ),
    # the probes on a run's test split; the split, the run's best.ckpt and the clusters are its input
    # files, and with split_by: cluster the clusters are the units the folds and the bootstrap keep whole
    EVALUATE: (
        Dep("evaluate"),
        Dep("dataset.split_by", when=_by_cluster),
        Dep("dataset.cluster_identity", when=_by_cluster),
        Dep("dataset.cluster_coverage", when=_by_cluster),
    ),
}
# Versions of what a stage writes, for changes no config key shows: files of another version are
# stale (rerun and refused like a changed setting). embed 2: the stored rows are <cls>, the
# residues, <eos> (version 1 had the residues only); embedding_store.FORMAT_VERSION is this.
# cluster 2: the clusters file records its protein count and the hash of its rows.
FORMATS: dict[str, int] = {EMBED: 2, CLUSTER: 2}
FORMAT_KEY = "format"
# The keys that change no stage's result, with why: where results go (run_name, the folders), how
# the work is cut up or run (embedding.shards / max_tokens_per_batch / batch_size, training.num_workers,
# device, model.scan), where a run continues from (training.resume_from_checkpoint: the resumed run
# checks the saved state's own settings), where metrics are also sent (training.log_with), and the
# predict stage's options (its outputs are not inputs of any stage), and a sweep's runs (each run's
# stages depend on the keys of that run's settings, ptm_mamba.config.settings_of_run; the config refuses
# runs that would change the split's or the embeddings' keys). A new schema key must be in DEPENDS_ON or
# here (tests/test_stage_keys.py).
NO_RESULT_KEYS: tuple[str, ...] = (
    "run_name", "device", "training.output_dir", "training.embeddings_dir",
    "embedding.shards", "embedding.max_tokens_per_batch", "embedding.batch_size",
    "training.num_workers", "model.scan", "training.resume_from_checkpoint", "training.log_with",
    "predict", "runs",
)


def stage_settings(settings: Settings, stage: str) -> dict[str, Any]:
    """The values of ``stage``'s dependencies under ``settings`` (JSON-plain, keyed by config key)."""
    values = {}
    for dep in DEPENDS_ON[stage]:
        if dep.when is not None and not dep.when(settings):
            continue
        value = settings.lookup(dep.key)
        values[dep.key] = dep.identity(value) if dep.identity is not None else value
    if stage in FORMATS:
        values[FORMAT_KEY] = FORMATS[stage]
    return json.loads(json.dumps(values, sort_keys=True))  # tuples -> lists, as read back from a file


def run_settings(settings: Settings) -> dict[str, dict[str, Any]]:
    """The settings of every stage behind a training run (split, embed when precomputed, train)."""
    stages = [SPLIT, *([EMBED] if _precomputed(settings) else []), TRAIN]
    return {stage: stage_settings(settings, stage) for stage in stages}


def fingerprint_of(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def stage_fingerprint(settings: Settings, stage: str) -> str:
    """A short hash of :func:`stage_settings`: the rule param that triggers reruns."""
    return fingerprint_of(stage_settings(settings, stage))


def check_settings(recorded: Any, settings: Settings, stage: str, where: str, fix: str) -> None:
    """Raise a one-line :class:`PipelineError` unless ``recorded`` (what a file says it was
    made with) equals ``stage``'s settings under ``settings``; ``fix`` says what to do."""
    expected = stage_settings(settings, stage)
    if not isinstance(recorded, dict):
        raise PipelineError(f"{where}: does not record the settings it was made with; {fix}")
    for key in sorted(set(expected) | set(recorded)):
        if key == FORMAT_KEY and recorded.get(key) != expected.get(key):
            raise PipelineError(f"{where}: written by another version of the {stage} stage (format "
                                f"{recorded.get(key, 1)}, this version's is {expected.get(key)}); {fix}")
        if recorded.get(key) != expected.get(key):
            made = f"{key} = {recorded[key]!r}" if key in recorded else f"{key} at its default"
            given = f"gives {expected[key]!r}" if key in expected else "leaves it at its default"
            raise PipelineError(f"{where}: made with {made}, but the config {given}; {fix}")
