# Inference with the trained run's best.ckpt: per-residue final hidden states and, with
# predict.pooled, each protein's mean over its residues, for every file in predict.inputs.
#   snakemake predictions --config 'predict={inputs: [proteins.fasta]}'
# writes results/predictions/{run_name}/proteins.h5 (training first, if it has not run).


rule predictions:
    input:
        [prediction_file(name) for name in PREDICT_INPUTS],


rule predict:
    input:
        checkpoint=RUN_FILE[layout.BEST_CKPT],
        sequences=lambda wildcards: PREDICT_INPUTS[wildcards.name],
    output:
        prediction_file("{name}"),
    log:
        f"logs/predict/{RUN_NAME}/{{name}}.log",
    wildcard_constraints:
        name="[^/]+",
    conda:
        ENV
    threads: 2
    params:
        pooled="--pooled" if SETTINGS.predict.pooled else "--no-pooled",
        max_tokens=SETTINGS.predict.max_tokens_per_batch,
    shell:
        "OMP_NUM_THREADS={threads} ptm-mamba predict --checkpoint {input.checkpoint:q}"
        " --input {input.sequences:q} --output {output:q} {params.pooled}"
        " --max_tokens_per_batch {params.max_tokens} --no-progress > {log:q} 2>&1"
