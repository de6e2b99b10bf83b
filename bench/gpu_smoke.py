"""The whole pipeline on a GPU, through the Python API: split, embed (ESM-2 on CUDA), train (bf16).

For a lent GPU machine that lacks the CLI's config-validation package: the
config is default-filled from the schema and used as is. Prints the run's
final validation/test metrics and wall times.

    python bench/gpu_smoke.py /tmp/smoke
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ptm_mamba.config import _fill_defaults, load_schema  # noqa: E402
from ptm_mamba.embed import embed_all  # noqa: E402
from ptm_mamba.settings import Settings  # noqa: E402
from ptm_mamba.split import run_split  # noqa: E402
from ptm_mamba.testing import write_tiny_esm2_checkpoint  # noqa: E402
from ptm_mamba.train import train  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def main(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    esm_path = write_tiny_esm2_checkpoint(root / "esm" / "esm2_t2_tiny.pt", num_layers=2, embed_dim=64,
                                          attention_heads=4)
    config = {
        "run_name": "gpu-smoke",
        "dataset": {"dataset_location": str(REPO / "datasets" / "demo.csv"), "val_size": 100, "test_size": 100},
        "esm": {"model": str(esm_path)},
        "embedding": {"shards": 2, "mask_replicates": 2, "max_tokens_per_batch": 16384},
        "training": {"embeddings_dir": str(root / "embeddings"), "output_dir": str(root / "outputs"),
                     "max_steps": 300, "log_steps": 100, "per_device_train_batch_size": 32,
                     "max_tokens_per_batch": 16384, "lr": 2e-3, "warmup_steps": 20},
        "model": {"d_model": 128, "n_layer": 2},
    }
    _fill_defaults(config, load_schema())  # not validate(): the GPU machines may lack jsonschema
    settings = Settings.from_config(config)
    times = {}
    t0 = time.perf_counter()
    run_split(settings, root / "split")
    times["split_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    embed_all(settings, root / "split", root / "embeddings")
    times["embed_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = train(settings, split_dir=str(root / "split"), progress=False)
    times["train_s"] = time.perf_counter() - t0
    metrics = json.loads((out / "metrics.json").read_text())
    vals = [m for m in metrics if "avg_val_loss" in m]
    test = [m for m in metrics if "avg_test_loss" in m][-1]
    print(json.dumps({**times, "val": [{k: round(v, 4) if isinstance(v, float) else v for k, v in m.items()}
                                      for m in vals],
                      "test_ptm_acc": test["avg_test_ptm_acc"], "test_acc": test["avg_test_acc"]}, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/gpu-smoke"))
