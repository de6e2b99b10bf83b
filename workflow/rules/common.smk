# Shared set-up: config validation, the resolved config file the rules pass to
# the ptm-mamba CLI, and the target list. All real work lives in ptm_mamba/.

from snakemake.utils import validate

from ptm_mamba.config import fingerprint, validate as validate_config, write_config
from ptm_mamba.errors import PipelineError

validate(config, schema="../schemas/config.schema.yaml")
try:
    validate_config(config, source="config")
except PipelineError as err:
    raise WorkflowError(str(err))

# The CLI reads the config from a file. Command-line overrides (--config key=value)
# live only in memory, so the resolved config is written to a fixed path (only when
# it changed); each rule carries a fingerprint of the settings it reads, so changing
# a setting reruns exactly the stages that depend on it.
RESOLVED_CONFIG = "results/resolved_config.yaml"
write_config(config, RESOLVED_CONFIG)

SPLIT_DIR = "results/split"
SPLITS = ["train", "val", "test"]
EMBEDDINGS_DIR = config["training"]["embeddings_dir"]
NUM_SHARDS = config["embedding"]["shards"]
PRECOMPUTED = config["training"]["use_esm"] and config["training"]["use_precomputed_embeddings"]
ENV = "../../environment.yml"
RUN_NAME = config["run_name"] or "default"
RUN_DIR = f"{config['training']['output_dir']}/ptm-mamba-{RUN_NAME}"
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
    # the report rules' outputs pull in training, which pulls in split and embeddings
    return [*shard_files(), f"{RUN_DIR}/best.ckpt", f"{RUN_DIR}/last.ckpt",
            *rules.plots.output, *rules.run_config.output]
