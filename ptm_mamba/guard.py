"""Nothing a user points at is lost: no output replaces or deletes a file that an input names.

:func:`refuse_overwrite` compares what a command will write (files, and folders it owns whole,
such as a run folder Snakemake clears before a rerun) with every file it reads, resolved and by
inode (hard links); the Snakefile runs it before Snakemake deletes anything.
:func:`check_run_owner` keeps two projects sharing a run folder from replacing each other's run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Mapping

from . import layout
from .errors import PipelineError
from .esm_weights import ESM2_NAMES, weight_files
from .settings import Settings
from .stages import run_settings

PathLike = str | os.PathLike


def _resolved(path: PathLike) -> Path:
    return Path(path).expanduser().resolve()


def same_file(a: PathLike, b: PathLike) -> bool:
    """Whether ``a`` and ``b`` are one file: the same resolved path, or the same inode."""
    if _resolved(a) == _resolved(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return False


def within(path: PathLike, folder: PathLike) -> bool:
    """Whether ``path`` is ``folder`` or lies under it (resolved)."""
    path, folder = _resolved(path), _resolved(folder)
    return path == folder or folder in path.parents


def config_inputs(settings: Settings) -> dict[str, Path]:
    """The files the settings name as inputs, by config key (the ESM-2 weights by their files)."""
    dataset, training = settings.dataset, settings.training
    found: dict[str, Path] = {}
    if dataset.source:
        found["dataset.source.path"] = Path(dataset.source.path)
    else:  # with a source, dataset_location is what the prepare stage writes
        found["dataset.dataset_location"] = Path(dataset.dataset_location)
    for i, file in enumerate(weight_files(settings.esm.model)):
        found["esm.model" if i == 0 else f"esm.model ({file.name})"] = file
    for key in ("init_from", "resume_from_checkpoint"):
        if getattr(training, key):
            found[f"training.{key}"] = Path(getattr(training, key))
    for path in settings.predict.inputs:
        found[f"predict.inputs ({Path(path).name})"] = Path(path)
    return found


def refuse_missing_inputs(settings: Settings) -> None:
    """A one-line :class:`PipelineError` naming the key and the path of an input the settings name
    that is not there (a pretrained ESM-2 name's files are fetched by the stage that needs them)."""
    named = str(settings.esm.model) in ESM2_NAMES
    for key, path in config_inputs(settings).items():
        if not (named and key.startswith("esm.model")) and not Path(path).expanduser().is_file():
            hint = " (datasets/README.md says how to build one, or set dataset.source)" if key.startswith("dataset.") else ""
            raise PipelineError(f"{key}: {path} not found" + (" (a folder, not a file)" if Path(path).is_dir() else hint))


def refuse_overwrite(outputs: Mapping[str, PathLike] | Iterable[tuple[str, PathLike]],
                     inputs: Mapping[str, PathLike], folders: Mapping[str, PathLike] | None = None,
                     reader: str = "this command", fix: str = "write it elsewhere") -> None:
    """A one-line :class:`PipelineError` if an output file is an input, or an input lies in a folder
    the command writes whole (``folders``); labels are option or config keys."""
    for out_label, out in outputs.items() if isinstance(outputs, Mapping) else outputs:
        for in_label, path in inputs.items():
            if same_file(out, path):
                raise PipelineError(f"{out_label} {out} is {in_label} ({path}), which {reader} reads: {fix}; "
                                    "nothing was written")
    for folder_label, folder in (folders or {}).items():
        for in_label, path in inputs.items():
            if within(path, folder):
                raise PipelineError(f"{in_label} {path} lies in {folder_label} {folder}/, which this run writes "
                                    f"and a rerun clears first: copy it out of that folder, or use a new run_name; "
                                    "nothing was changed")


def refuse_files_in_the_way(folders: Mapping[str, PathLike]) -> None:
    """A one-line :class:`PipelineError` if a folder a stage writes into, or one above it, is a file."""
    for label, folder in folders.items():
        for path in (Path(folder), *Path(folder).parents):
            if path.exists() and not path.is_dir():
                raise PipelineError(f"{label}: {path} is a file, not a folder: the pipeline writes into {folder}/")


def check_workflow(settings: Settings, run_name: str, prediction_files: list[PathLike]) -> None:
    """The Snakefile's check before Snakemake deletes any output (a missing dataset is an error,
    never "nothing to be done")."""
    emb, run_dir = settings.training.embeddings_dir, layout.run_dir(settings.training.output_dir, run_name)
    outputs = [*(("the split stage's output", p) for p in layout.split_paths(layout.SPLIT_DIR).values()),
               *(("the embed stage's output", layout.split_store_path(emb, s)) for s in layout.SPLITS),
               *(("the predict stage's output", p) for p in prediction_files)]
    if settings.dataset.by_cluster:
        outputs.append(("the cluster stage's output", layout.CLUSTERS_FILE))
    if settings.dataset.source:  # the prepare stage writes the CSV
        outputs.append(("the prepare stage's output", settings.dataset.dataset_location))
    refuse_missing_inputs(settings)
    refuse_files_in_the_way({"training.output_dir": run_dir, "training.embeddings_dir": Path(emb) / "shards",
                             "the split folder": layout.SPLIT_DIR, "the report folder": layout.report_dir(run_name)})
    refuse_overwrite(outputs, config_inputs(settings), folders={"the run folder": run_dir}, reader="the workflow",
                     fix="keep your inputs out of the workflow's outputs (copy it elsewhere and point the config there)")
    check_run_owner(settings, run_dir)


def run_record(settings: Settings) -> dict:
    """What ``provenance.json`` records of who made a run: the working directory and every stage's settings."""
    return {"project": str(Path.cwd().resolve()), "settings": run_settings(settings)}


def _differences(recorded: dict, ours: dict) -> list[tuple[str, str, object, object]]:
    """(stage, key, recorded value, our value) for every setting that differs."""
    found = []
    for stage in sorted(set(recorded) | set(ours)):
        theirs, mine = recorded.get(stage) or {}, ours.get(stage) or {}
        found += [(stage, key, theirs.get(key), mine.get(key)) for key in sorted(set(theirs) | set(mine))
                  if theirs.get(key) != mine.get(key)]
    return found


def _first_difference(recorded: dict, ours: dict) -> str | None:
    found = _differences(recorded, ours)
    return f"{found[0][0]} {found[0][1]}: {found[0][2]!r} there, {found[0][3]!r} here" if found else None


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _recorded_run(run_dir: PathLike) -> dict | None:
    """The :func:`run_record` of the run in ``run_dir``, or None."""
    try:
        recorded = json.loads((Path(run_dir) / layout.PROVENANCE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return recorded if isinstance(recorded, dict) else None


def settings_changes(settings: Settings, run_dir: PathLike) -> list[str]:
    """What changed since the run in ``run_dir`` was made, by stage and key ("train training.lr:
    0.0004 -> 0.001"): why Snakemake reruns those stages, said with the keys' names."""
    recorded = (_recorded_run(run_dir) or {}).get("settings")
    if not isinstance(recorded, dict):
        return []
    return [f"{stage} {key}: {_short(old)} -> {_short(new)}"
            for stage, key, old, new in _differences(recorded, run_record(settings)["settings"])]


def check_run_owner(settings: Settings, run_dir: PathLike) -> None:
    """Refuse a run folder that another project wrote from other data, split or settings.

    Another project's folder with the very same settings is the same computation and may be shared.
    """
    recorded = _recorded_run(run_dir)
    if recorded is None or not isinstance(recorded.get("project"), str):
        return
    ours = run_record(settings)
    if recorded["project"] == ours["project"]:
        return
    differs = _first_difference(recorded.get("settings") or {}, ours["settings"])
    if differs is not None:
        raise PipelineError(f"{run_dir} holds a run of the project in {recorded['project']}, made with other "
                            f"settings ({differs}); this project ({ours['project']}) will neither adopt nor "
                            "replace it: use another run_name or training.output_dir")
