# Shared set-up: config validation and its typed settings (SETTINGS, as the CLI builds them), the
# config file the rules pass to the ptm-mamba CLI, and the target list. All real work lives in ptm_mamba/.

import re
import shlex
import sys

from ptm_mamba.config import dump_config, load_yaml_strict, validate as validate_config
from ptm_mamba.errors import PipelineError
from ptm_mamba.fileio import atomic_write_text
from ptm_mamba import guard, layout
from ptm_mamba.launch import launch_command, slurm_resources
from ptm_mamba.config import settings_of_run
from ptm_mamba.settings import Settings
from ptm_mamba.stages import EMBED, SPLIT, TRAIN, stage_fingerprint


def refuse(err):
    """A mistake in the config: one line, as the CLI prints it, and no workflow."""
    print(f"error: {err}", file=sys.stderr)
    sys.exit(1)


# One schema (workflow/schemas/config.schema.yaml), validated the way the CLI validates it: string
# values from --config are coerced to the schema's types, and a mistake is one line, not a dump.
try:
    for path in workflow.configfiles:
        load_yaml_strict(
            path
        )  # refuses duplicate keys, which YAML loaders silently merge
    validate_config(config, source="config")
except PipelineError as err:
    refuse(err)

SETTINGS = Settings.from_config(config)

# The CLI reads the config from a file. Overrides (--config key=value) live only in this
# invocation's memory, so its jobs read a file named by the content's hash: parsing writes
# nothing (onstart runs only when jobs are about to run, under Snakemake's lock), and another
# invocation (a dry run with other --config, a locked-out run) writes another file, never this
# one. What reruns a stage is its settings param (ptm_mamba/stages.py), not this file.
CONFIG_TEXT = dump_config(config)
CONFIG_FILE = str(layout.invocation_config(CONFIG_TEXT))


onstart:
    atomic_write_text(CONFIG_FILE, CONFIG_TEXT)


def config_file(wildcards, input):
    """The invocation's config file, as a rule param. Snakemake leaves a param function that
    takes `input` out of its rerun triggers; what reruns a stage is its `settings` param.
    """
    return CONFIG_FILE


# Paths and names: ptm_mamba/layout.py, shared with the CLI.
SPLIT_DIR = layout.SPLIT_DIR
SPLITS = layout.SPLITS
SPLIT_OUTPUTS = {key: str(path) for key, path in layout.split_paths(SPLIT_DIR).items()}
SPLIT_FILES = list(SPLIT_OUTPUTS.values())
EMBEDDINGS_DIR = SETTINGS.training.embeddings_dir
NUM_SHARDS = SETTINGS.embedding.shards
# The rules' conda environment (--sdm conda). Snakemake builds it from a copy of environment.yml
# under .snakemake/conda/, so its pip lines name this repository by ${PTM_MAMBA_ROOT}, set here.
ENV = "../../environment.yml"
os.environ.setdefault("PTM_MAMBA_ROOT", workflow.basedir)
# The training runs: one, named run_name; or a sweep (config `runs:`), a train job per run, each with
# the settings of the top level and its overrides (settings_of_run, as `ptm-mamba train --run_name`
# takes them), sharing the split and the embeddings (the config refuses overrides of their keys).
SWEEP = SETTINGS.runs is not None
RUNS = list(SETTINGS.runs) if SWEEP else [SETTINGS.run_name or layout.WORKFLOW_RUN_NAME]
try:
    RUN_SETTINGS = {run: settings_of_run(config, run) for run in RUNS}
except PipelineError as err:
    refuse(err)
# The run of the report's figures and tables (plots) and of the predictions: the only run, or a
# sweep's first (the compare step shows them all).
RUN_NAME = RUNS[0]
# Embeddings are computed when a run reads them.
PRECOMPUTED = any(s.training.precomputed for s in RUN_SETTINGS.values())


def run_dir(run):
    """A run's folder, {training.output_dir}/ptm-mamba-{run} (one output_dir for every run)."""
    return str(layout.run_dir(SETTINGS.training.output_dir, run))


def run_file(run, name):
    """A run folder's file by name (layout.RUN_FILES); run may be the pattern "{run}"."""
    return str(layout.run_files(run_dir(run))[name])


def train_log(run):
    return f"logs/train/{run}.log"


RUN_DIR = run_dir(RUN_NAME)
# The run folder's files by name (layout.RUN_FILES): RUN_FILE[layout.BEST_CKPT] ...
RUN_FILE = {name: run_file(RUN_NAME, name) for name in layout.RUN_FILES}
RUN_FILES = list(RUN_FILE.values())
BY_CLUSTER = SETTINGS.dataset.by_cluster
CLUSTERS_FILE = layout.CLUSTERS_FILE
# Per run: accelerate launch on one machine, or srun + accelerate's multi-node launch
# (ptm_mamba/launch.py), training.num_processes per machine (one per GPU); its SLURM resources.
LAUNCH = {
    run: launch_command(
        s.training.num_machines, s.training.num_processes, log=train_log(run)
    )
    for run, s in RUN_SETTINGS.items()
}
TRAIN_RESOURCES = {
    run: slurm_resources(s.training.num_machines, s.training.num_processes)
    for run, s in RUN_SETTINGS.items()
}
TRAIN_FINGERPRINT = {
    run: stage_fingerprint(s, TRAIN) for run, s in RUN_SETTINGS.items()
}
if len({tuple(sorted(r)) for r in TRAIN_RESOURCES.values()}) > 1:
    refuse(
        "runs: single-machine and multi-machine runs (training.num_machines) in one sweep: "
        "the train rule's SLURM resources differ in kind; sweep them in separate configs"
    )


def train_resource(key):
    """A train job's SLURM resource ``key``, of its run."""
    return lambda wildcards: TRAIN_RESOURCES[wildcards.run][key]


wildcard_constraints:
    split="train|val|test",
    shard=r"\d+",
    run="|".join(re.escape(run) for run in RUNS),


def embedding_files(run=None):
    """The gathered embeddings training reads (none when ESM runs on the fly or not at all): each
    a self-contained copy of its split's shards, which are temp() outputs. Those of ``run``; without
    one, those any run reads."""
    precomputed = PRECOMPUTED if run is None else RUN_SETTINGS[run].training.precomputed
    return (
        [str(layout.split_store_path(EMBEDDINGS_DIR, split)) for split in SPLITS]
        if precomputed
        else []
    )


def all_targets():
    """Every file a stage promises, so that a deleted one is rebuilt (with what depends on it)."""
    return [
        *SPLIT_FILES,
        *embedding_files(),  # self-contained: their shards are temporary, deleted once gathered
        *(run_file(run, name) for run in RUNS for name in layout.RUN_FILES),
        *rules.plots.output,
        *rules.evaluate.input,  # every run's PTM-site evaluation
        *(rules.compare.output if SWEEP else []),
    ]


def split_input(wildcards):
    """The dataset, and with split_by: cluster the cluster stage's clusters."""
    return {
        "data": SETTINGS.dataset.dataset_location,
        **({"clusters": CLUSTERS_FILE} if BY_CLUSTER else {}),
    }


def clusters_option(wildcards, input):
    return f"--clusters {shlex.quote(input.clusters)}" if BY_CLUSTER else ""


def prediction_file(name):
    return str(layout.prediction_path(RUN_NAME, name))


def prediction_inputs():
    """predict.inputs by output name: the file name without its extension."""
    inputs = {}
    for path in SETTINGS.predict.inputs:
        name = os.path.splitext(os.path.basename(path))[0]
        if name in inputs:
            refuse(
                f"predict.inputs: {inputs[name]} and {path} would both write {prediction_file(name)}; rename one"
            )
        inputs[name] = path
    return inputs


PREDICT_INPUTS = prediction_inputs()

# Nothing a user points at is lost (ptm_mamba/guard.py), checked now, before Snakemake deletes any
# output: no input the config names (dataset, ESM-2 weights, init_from, resume_from_checkpoint,
# predict inputs) is an output or lies in the run folder; no output folder is a file; a finished run
# folder of another project made with other settings is neither adopted nor replaced.
# Each run of a sweep likewise, and no run reads a file in another's folder.
try:
    for _run, _settings in RUN_SETTINGS.items():
        guard.check_workflow(
            _settings,
            _run,
            (
                [prediction_file(name) for name in PREDICT_INPUTS]
                if _run == RUN_NAME
                else []
            ),
        )
        guard.refuse_overwrite(
            {},
            guard.config_inputs(_settings),
            folders={f"run {other}'s folder": run_dir(other) for other in RUNS},
            reader="the workflow",
        )
except PipelineError as err:
    refuse(err)

# Why stages rerun, by key: the settings that changed since the run folder's run was made.
for _run, _settings in RUN_SETTINGS.items():
    for change in guard.settings_changes(_settings, run_dir(_run)):
        print(f"changed since {run_dir(_run)} was made: {change}", file=sys.stderr)
