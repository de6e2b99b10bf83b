# Inference with the trained run's best.ckpt: per-residue final hidden states and, with
# predict.pooled, each protein's mean over its residues, for every file in predict.inputs.
#   snakemake predictions --config 'predict={inputs: [proteins.fasta]}'
# writes results/predictions/{run_name}/proteins.h5 (training first, if it has not run).


rule predictions:
    input:
        [f"{PREDICT_DIR}/{name}.h5" for name in PREDICT_INPUTS],


rule predict:
    input:
        checkpoint=f"{RUN_DIR}/best.ckpt",
        sequences=lambda wildcards: PREDICT_INPUTS[wildcards.name],
    output:
        f"{PREDICT_DIR}/{{name}}.h5",
    log:
        f"logs/predict/{RUN_NAME}/{{name}}.log",
    wildcard_constraints:
        name="[^/]+",
    conda:
        ENV
    threads: 2
    params:
        pooled="--pooled" if config["predict"]["pooled"] else "--no-pooled",
    shell:
        "OMP_NUM_THREADS={threads} ptm-mamba predict --checkpoint {input.checkpoint:q}"
        " --input {input.sequences:q} --output {output:q} {params.pooled} --no-progress > {log:q} 2>&1"
