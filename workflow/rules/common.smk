# Shared set-up: config validation and its typed settings (SETTINGS, as the CLI builds them), the
# config file the rules pass to the ptm-mamba CLI, and the target list. All real work lives in ptm_mamba/.

import shlex
import sys

from ptm_mamba.config import dump_config, load_yaml_strict, validate as validate_config
from ptm_mamba.errors import PipelineError
from ptm_mamba.fileio import atomic_write_text
from ptm_mamba import guard, layout
from ptm_mamba.launch import launch_command, slurm_resources
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
PRECOMPUTED = SETTINGS.training.precomputed
# The rules' conda environment (--sdm conda). Snakemake builds it from a copy of environment.yml
# under .snakemake/conda/, so its pip lines name this repository by ${PTM_MAMBA_ROOT}, set here.
ENV = "../../environment.yml"
os.environ.setdefault("PTM_MAMBA_ROOT", workflow.basedir)
RUN_NAME = SETTINGS.run_name or layout.WORKFLOW_RUN_NAME
RUN_DIR = str(layout.run_dir(SETTINGS.training.output_dir, RUN_NAME))
# The run folder's files by name (layout.RUN_FILES): RUN_FILE[layout.BEST_CKPT] ...
RUN_FILE = {name: str(path) for name, path in layout.run_files(RUN_DIR).items()}
RUN_FILES = list(RUN_FILE.values())
BY_CLUSTER = SETTINGS.dataset.by_cluster
CLUSTERS_FILE = layout.CLUSTERS_FILE
NUM_PROCESSES = SETTINGS.training.num_processes  # per machine: one per GPU
NUM_MACHINES = SETTINGS.training.num_machines
# accelerate launch on one machine, or srun + accelerate's multi-node launch (ptm_mamba/launch.py).
TRAIN_LOG = f"logs/train/{RUN_NAME}.log"
LAUNCH = launch_command(NUM_MACHINES, NUM_PROCESSES, log=TRAIN_LOG)
TRAIN_RESOURCES = slurm_resources(NUM_MACHINES, NUM_PROCESSES)


wildcard_constraints:
    split="train|val|test",
    shard=r"\d+",


def embedding_files():
    """The gathered embeddings training reads (none when ESM runs on the fly or not at all): each
    a self-contained copy of its split's shards, which are temp() outputs."""
    return (
        [str(layout.split_store_path(EMBEDDINGS_DIR, split)) for split in SPLITS]
        if PRECOMPUTED
        else []
    )


def all_targets():
    """Every file a stage promises, so that a deleted one is rebuilt (with what depends on it)."""
    return [
        *SPLIT_FILES,
        *embedding_files(),  # self-contained: their shards are temporary, deleted once gathered
        *RUN_FILES,
        *rules.plots.output,
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
try:
    guard.check_workflow(
        SETTINGS, RUN_NAME, [prediction_file(name) for name in PREDICT_INPUTS]
    )
except PipelineError as err:
    refuse(err)

# Why stages rerun, by key: the settings that changed since the run folder's run was made.
for change in guard.settings_changes(SETTINGS, RUN_DIR):
    print(f"changed since {RUN_DIR} was made: {change}", file=sys.stderr)
