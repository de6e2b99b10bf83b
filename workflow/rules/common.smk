# Shared set-up: config validation, the config file the rules pass to the ptm-mamba CLI,
# and the target list. All real work lives in ptm_mamba/.

import hashlib
import sys

from ptm_mamba.config import dump_config, load_yaml_strict, validate as validate_config
from ptm_mamba.errors import PipelineError
from ptm_mamba.fileio import atomic_write_text
from ptm_mamba.stages import EMBED, SPLIT, TRAIN, stage_fingerprint

# One schema (workflow/schemas/config.schema.yaml), validated the way the CLI validates it: string
# values from --config are coerced to the schema's types, and a mistake is one line, not a dump.
try:
    for path in workflow.configfiles:
        load_yaml_strict(path)  # refuses duplicate keys, which YAML loaders silently merge
    validate_config(config, source="config")
except PipelineError as err:
    print(f"error: {err}", file=sys.stderr)
    sys.exit(1)

# The CLI reads the config from a file. Overrides (--config key=value) live only in this
# invocation's memory, so its jobs read a file named by the content's hash: parsing writes
# nothing (onstart runs only when jobs are about to run, under Snakemake's lock), and another
# invocation (a dry run with other --config, a locked-out run) writes another file, never this
# one. What reruns a stage is its settings param (ptm_mamba/stages.py), not this file.
CONFIG_TEXT = dump_config(config)
CONFIG_FILE = f"results/configs/{hashlib.sha256(CONFIG_TEXT.encode()).hexdigest()[:16]}.yaml"


onstart:
    atomic_write_text(CONFIG_FILE, CONFIG_TEXT)


SPLIT_DIR = "results/split"
SPLITS = ["train", "val", "test"]
SPLIT_FILES = [f"{SPLIT_DIR}/{name}" for name in ("train.csv", "val.csv", "test.csv", "split_mapping.json", "summary.json")]
EMBEDDINGS_DIR = config["training"]["embeddings_dir"]
NUM_SHARDS = config["embedding"]["shards"]
PRECOMPUTED = config["training"]["use_esm"] and config["training"]["use_precomputed_embeddings"]
ENV = "../../environment.yml"
RUN_NAME = config["run_name"] or "default"
RUN_DIR = f"{config['training']['output_dir']}/ptm-mamba-{RUN_NAME}"
RUN_FILES = [f"{RUN_DIR}/{name}" for name in ("config.yaml", "split_mapping.json", "metrics.json", "best.ckpt", "last.ckpt")]
NUM_PROCESSES = config["training"]["num_processes"]
# One process per GPU; --multi_gpu makes accelerate start a process group (gloo on CPU, NCCL on GPU).
LAUNCH = f"accelerate launch --num_machines 1 --num_processes {NUM_PROCESSES} --dynamo_backend no" + (
    " --multi_gpu" if NUM_PROCESSES > 1 else ""
)


wildcard_constraints:
    split="train|val|test",
    shard=r"\d+",


def embedding_files():
    """The gathered embeddings training reads (none when ESM runs on the fly or not at all)."""
    return [f"{EMBEDDINGS_DIR}/{split}_embeddings.h5" for split in SPLITS] if PRECOMPUTED else []


def shard_files():
    """Every shard, requested explicitly: a gathered file only points at its shards, so a
    deleted shard must be rebuilt (Snakemake does not rerun jobs for a missing input alone)."""
    if not PRECOMPUTED:
        return []
    return [f"{EMBEDDINGS_DIR}/shards/{split}/{i}-of-{NUM_SHARDS}.h5" for split in SPLITS for i in range(NUM_SHARDS)]


def all_targets():
    """Every file a stage promises, so that a deleted one is rebuilt (with what depends on it)."""
    return [*SPLIT_FILES, *shard_files(), *embedding_files(), *RUN_FILES,
            *rules.plots.output, *rules.run_config.output]
