"""What each stage's result depends on, listed once.

:data:`DEPENDS_ON` names, per stage, the config keys that change the stage's
result, and the inputs it depends on by content (the dataset CSV, the ESM-2
weights). Both users of "is this output still valid?" read it:

- Snakemake's rerun triggers: each rule carries :func:`stage_fingerprint` as a
  param, so changing a listed key reruns the stage and what depends on it, and
  changing any other key (``embedding.max_tokens_per_batch``,
  ``training.num_workers``, paths, thread counts) reruns nothing;
- the stale checks: a stage records :func:`stage_settings` in what it writes
  (``summary.json`` of the split, the first line of the cluster stage's ``clusters.tsv``,
  the prepare stage's ``*.summary.json``, the HDF5 attribute ``settings`` of the
  embeddings, the checkpoints of training), and a stage that reads those files
  compares them with its config through :func:`check_settings`.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .errors import PipelineError

SPLIT, EMBED, TRAIN = "split", "embed", "train"
PREPARE, CLUSTER = "prepare", "cluster"


def _uses_esm(config: dict) -> bool:
    return config["training"]["use_esm"]


def _precomputed(config: dict) -> bool:
    return config["training"]["use_esm"] and config["training"]["use_precomputed_embeddings"]


_HASH_BLOCK = 1 << 22
_CACHE_FROM_BYTES = 64 << 20  # hashes of larger files (ESM-2 weights) are kept, keyed by stat


def _hash_cache_path() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ptm-mamba" / "sha256.json"


def sha256_of(data: bytes) -> str:
    """``sha256:<hex>`` of some bytes: how every content identity in the pipeline is written."""
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


def file_sha256(path: str | os.PathLike) -> str | None:
    """``sha256:<hex>`` of a file's bytes (None when it does not exist).

    Every Snakemake parse and every job asks for the hash of the ESM-2 weights (GBs), so the
    hash of a large file is cached by (path, size, mtime, inode); the cache is only an
    accelerator: an unreadable or unwritable cache means hashing again.
    """
    from .fileio import atomic_write_json

    path = Path(path).expanduser()
    if not path.is_file():
        return None
    st = path.stat()
    key, stamp = str(path.resolve()), [st.st_size, st.st_mtime_ns, st.st_ino]
    cached: dict = {}
    if st.st_size >= _CACHE_FROM_BYTES:
        try:
            cached = json.loads(_hash_cache_path().read_text())
            if cached.get(key, {}).get("stat") == stamp:
                return cached[key]["sha256"]
        except (OSError, ValueError, AttributeError):
            cached = {}
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(_HASH_BLOCK):
            digest.update(block)
    value = f"sha256:{digest.hexdigest()}"
    if st.st_size >= _CACHE_FROM_BYTES:
        try:
            atomic_write_json(_hash_cache_path(), {**cached, key: {"stat": stamp, "sha256": value}})
        except OSError:
            pass
    return value


def source_identity(source: dict | None) -> dict | None:
    """What a raw dataset source (``dataset.source``) means: its format and its file's content hash."""
    return None if source is None else {"format": source["format"], "sha256": file_sha256(source["path"])}


def _has_source(config: dict) -> bool:
    return config["dataset"]["source"] is not None


def _by_cluster(config: dict) -> bool:
    return config["dataset"]["split_by"] == "cluster"


def hub_model_files(folder: str | os.PathLike) -> list[Path]:
    """The files of a model folder in the Hugging Face layout that make the model (those the ESM-2
    loader reads): ``config.json``, ``vocab.txt`` when there, and the weights: ``model.safetensors``,
    or ``model.safetensors.index.json`` and the shards it names."""
    folder = Path(folder).expanduser()
    files = [folder / "config.json"] + ([folder / "vocab.txt"] if (folder / "vocab.txt").is_file() else [])
    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        return files + [folder / "model.safetensors"]
    try:
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # the loader names the problem
        shards = []
    return files + [index] + [folder / s for s in shards if isinstance(s, str) and Path(s).name == s]


def pretrained_weights(model: str) -> Path | None:
    """Where fair-esm caches the weights of a pretrained ESM-2 name (``<torch hub>/checkpoints/<name>.pt``,
    there or not yet); None when ``model`` is not such a name (a path, a folder, a Hub id)."""
    import re

    model = str(model)
    if not re.fullmatch(r"esm2_t\w+", model):  # not a name: no need to import torch and fair-esm
        return None
    from .esm import ESM2_NAMES, weight_files

    return weight_files(model)[0] if model in ESM2_NAMES else None


def _first_seen_path() -> Path:
    return _hash_cache_path().with_name("esm-first-seen.json")


def _lock(path: Path):
    """An advisory lock held on ``path``.lock until the returned file is closed (None, and no lock,
    where locks are unavailable)."""
    try:
        import fcntl

        path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(path.with_name(f"{path.name}.lock"), "a")
    except (ImportError, OSError):
        return None
    try:
        fcntl.flock(fh, fcntl.LOCK_EX)
    except OSError:
        pass
    return fh


def first_seen_sha256(name: str, path: str | os.PathLike, sha256: str) -> str | None:
    """The content hash first seen in the cached weights file ``path`` of the pretrained name ``name``;
    when none is recorded, ``sha256`` (the file's bytes now) is recorded and returned.

    The record (``esm-first-seen.json`` beside the hash cache, one entry per name and resolved path,
    shared by every project using that torch hub cache) is what lets a name keep its identity when its
    weights are downloaded: before, the identity is the name (no file); after, it is still the name,
    as long as the bytes stay those first seen. None when the record can be neither read nor written
    (then the name is all that can be said)."""
    import datetime as dt

    from .fileio import atomic_write_json

    record = _first_seen_path()
    key = f"{name} {Path(path).expanduser().resolve()}"
    lock = _lock(record)  # read, then write: two processes seeing no record record the same bytes
    try:
        try:
            seen = json.loads(record.read_text())
        except (FileNotFoundError, ValueError):  # none yet, or not JSON (then what is there now counts)
            seen = {}
        except OSError:
            return None
        if not isinstance(seen, dict):
            seen = {}
        entry = seen.get(key)
        if isinstance(entry, dict) and isinstance(entry.get("sha256"), str):
            return entry["sha256"]
        now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        try:
            atomic_write_json(record, {**seen, key: {"sha256": sha256, "first_seen": now}})
        except OSError:
            return None
        return sha256
    finally:
        if lock is not None:
            lock.close()


def esm_identity(model: str) -> str:
    """Which ESM-2 weights ``esm.model`` means: the content hash of a local checkpoint file or of
    a local Hugging Face model folder (its :func:`hub_model_files`); for a fair-esm pretrained
    name, the name while its cached weights are not there yet or hold the bytes first seen there
    (:func:`first_seen_sha256`), else ``<name>@sha256:<hex>`` of the bytes they hold (other weights
    under the same name: another identity); a Hub id is its name."""
    model = str(model)
    weights = pretrained_weights(model)
    if weights is not None:
        sha256 = file_sha256(weights)
        if sha256 is None:  # not downloaded yet: the stage that needs the weights fetches them
            return model
        return model if first_seen_sha256(model, weights, sha256) in (None, sha256) else f"{model}@{sha256}"
    folder = Path(model).expanduser()
    if folder.is_dir():
        listing = "\n".join(f"{p.name} {file_sha256(p)}" for p in hub_model_files(folder))
        return sha256_of(listing.encode())
    return file_sha256(model) or model


def esm_sha256(model: str) -> str | None:
    """The content hash of the ESM-2 weights ``esm.model`` names, as they are now: of the cached
    checkpoint of a pretrained name, of a ``.pt`` file, or of a local Hugging Face folder (its
    files' hashes, as :func:`esm_identity`); None for a Hub id or weights that are not there."""
    model = str(model)
    weights = pretrained_weights(model)
    if weights is not None:
        return file_sha256(weights)
    if Path(model).expanduser().is_dir():
        return esm_identity(model)
    return file_sha256(model)


@dataclass(frozen=True)
class Dep:
    """A config key a stage's result depends on; ``identity`` maps its value to what matters
    (e.g. a path to its file's content hash); ``when`` limits it to some modes."""

    key: str
    identity: Callable[[Any], Any] | None = None
    when: Callable[[dict], bool] | None = None


# The dataset's proteins, by content. A CSV made by the prepare stage counts by its source's content:
# it is a function of the source, and it does not exist yet when Snakemake computes the fingerprints.
_DATASET = (
    Dep("dataset.dataset_location", identity=file_sha256, when=lambda config: not _has_source(config)),
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
    ),
    TRAIN: (
        Dep("seed"),
        Dep("dataset.max_sequence_length"),
        Dep("dataset.unknown_ptm"),
        Dep("model", identity=lambda m: {k: v for k, v in m.items() if k != "scan"}),  # scan: speed, not results
        Dep("esm.model", identity=esm_identity, when=_uses_esm),
        Dep("esm.repr_layer", when=_uses_esm),
        Dep("embedding.mask_replicates", when=_precomputed),
        *(Dep(f"training.{key}") for key in (
            "use_esm", "use_precomputed_embeddings", "num_train_epochs", "max_steps", "log_steps",
            "per_device_train_batch_size", "max_tokens_per_batch", "lr", "weight_decay", "adam_betas",
            "warmup_steps", "lr_schedule", "min_lr_ratio", "grad_clip", "mask_prob", "random_mask_only_prob",
            "mixed_precision", "num_processes")),
        # listed only away from their defaults: results made before these keys existed stay valid
        Dep("training.gradient_accumulation_steps",
            when=lambda c: c["training"].get("gradient_accumulation_steps", 1) != 1),
        Dep("training.init_from", identity=file_sha256, when=lambda c: c["training"].get("init_from") is not None),
        Dep("training.num_machines", when=lambda c: c["training"]["num_machines"] > 1),
    ),
}
# Versions of what a stage writes, for changes no config key shows: files of another version are
# stale (rerun and refused like a changed setting). embed 2: the stored rows are <cls>, the
# residues, <eos> (version 1 had the residues only); embedding_store.FORMAT_VERSION is this.
# cluster 2: the clusters file records its protein count and the hash of its rows.
FORMATS: dict[str, int] = {EMBED: 2, CLUSTER: 2}
FORMAT_KEY = "format"
# Not listed, on purpose: run_name and the folders (where results go, not what they are),
# embedding.shards / max_tokens_per_batch / batch_size (how the embedding work is cut up),
# training.num_workers (DataLoader processes), device (where a stage runs, like model.scan), training.resume_from_checkpoint (where a run
# continues from; the resumed run checks the saved state's own settings), training.log_with
# (where metrics are also sent).


def _lookup(config: dict, key: str) -> Any:
    value: Any = config
    for part in key.split("."):
        value = value[part]
    return value


def stage_settings(config: dict, stage: str) -> dict[str, Any]:
    """The values of ``stage``'s dependencies under ``config`` (JSON-plain, keyed by config key)."""
    settings = {}
    for dep in DEPENDS_ON[stage]:
        if dep.when is not None and not dep.when(config):
            continue
        value = _lookup(config, dep.key)
        settings[dep.key] = dep.identity(value) if dep.identity is not None else value
    if stage in FORMATS:
        settings[FORMAT_KEY] = FORMATS[stage]
    return json.loads(json.dumps(settings, sort_keys=True))  # tuples -> lists, as read back from a file


def run_settings(config: dict) -> dict[str, dict[str, Any]]:
    """The settings of every stage behind a training run (split, embed when precomputed, train)."""
    stages = [SPLIT, *([EMBED] if _precomputed(config) else []), TRAIN]
    return {stage: stage_settings(config, stage) for stage in stages}


def fingerprint_of(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def stage_fingerprint(config: dict, stage: str) -> str:
    """A short hash of :func:`stage_settings`: the rule param that triggers reruns."""
    return fingerprint_of(stage_settings(config, stage))


def check_settings(recorded: Any, config: dict, stage: str, where: str, fix: str) -> None:
    """Raise a one-line :class:`PipelineError` unless ``recorded`` (what a file says it was
    made with) equals ``stage``'s settings under ``config``; ``fix`` says what to do."""
    expected = stage_settings(config, stage)
    if not isinstance(recorded, dict):
        raise PipelineError(f"{where}: does not record the settings it was made with; {fix}")
    for key in sorted(set(expected) | set(recorded)):
        if key == FORMAT_KEY and recorded.get(key) != expected.get(key):
            raise PipelineError(f"{where}: written by another version of the {stage} stage (format "
                                f"{recorded.get(key, 1)}, this version's is {expected.get(key)}); {fix}")
        if recorded.get(key) != expected.get(key):
            raise PipelineError(f"{where}: made with {key} = {recorded.get(key)!r}, but the config gives "
                                f"{expected.get(key)!r}; {fix}")
