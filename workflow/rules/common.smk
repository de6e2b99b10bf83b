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
ENV = "../../environment.yml"


def all_targets():
    return [f"{SPLIT_DIR}/split_mapping.json"]
