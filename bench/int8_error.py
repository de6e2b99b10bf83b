"""The feature error of an int8 store against the float16 store of the same split.

    python bench/int8_error.py embeddings/val_embeddings.h5 embeddings_int8/val_embeddings.h5

Both stores must hold the same proteins and replicates (the same ESM-2, split and embed settings but
``embedding.dtype``). Prints the RMS error relative to the RMS of the float16 values, the largest
absolute error, and the largest error within a row relative to that row's largest value (int8 rounds
to 1/254 of it; the float16 reference adds its own rounding).
"""

from __future__ import annotations

import argparse

import numpy as np

from ptm_mamba.embedding_store import EmbeddingReader


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("float16_store")
    ap.add_argument("int8_store")
    args = ap.parse_args()
    with EmbeddingReader(args.float16_store) as f16, EmbeddingReader(args.int8_store) as i8:
        if f16.dtype != "float16" or i8.dtype != "int8" or f16.ids != i8.ids:
            raise SystemExit("error: give a float16 store and an int8 store of the same proteins")
        squared_error = squared = worst = worst_in_row = 0.0
        values = 0
        for pid in f16.ids:
            for k in range(f16.attrs["mask_replicates"]):
                x = f16.read(pid, k).features.astype(np.float32)
                d = i8.read(pid, k).float16().astype(np.float32) - x
                squared_error, squared = squared_error + float((d * d).sum()), squared + float((x * x).sum())
                values += d.size
                worst = max(worst, float(np.abs(d).max()))
                row_max = np.maximum(np.abs(x).max(axis=1), np.finfo(np.float32).tiny)
                worst_in_row = max(worst_in_row, float((np.abs(d).max(axis=1) / row_max).max()))
    print(f"{values:,} values: RMS error / RMS value {np.sqrt(squared_error / squared):.2e}; largest error "
          f"{worst:.3g}; largest error / its row's largest value {worst_in_row:.2e}")


if __name__ == "__main__":
    main()
