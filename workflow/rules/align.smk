# Alignment: SFT on the instruction data, DPO rollouts from the SFT model, then DPO.
# Training commands exec and tee ignores SIGTERM, as in pretrain.smk.


rule sft:
    input:
        init=model_folder("pretrain"),
        train="results/split/sft/train.parquet",
        val="results/split/sft/eval.parquet",
    output:
        folder=model_folder("sft"),
        plot=report("results/sft/loss.png", category="Training", caption="../report/loss.rst"),
    params:
        launch=launcher("sft"),
        settings=json.dumps(config["sft"]),
        ckpt="results/sft/_ckpt",
        script=script_path("sft.py"),
    threads: workflow.cores
    resources:
        **training_resources("sft"),
    log:
        "results/logs/sft.log",
    benchmark:
        "results/benchmarks/sft.tsv"
    conda:
        "../../envs/zhlm.yaml"
    shell:
        "exec {params.launch} {params.script} --init results/pretrain --tokenizer results/tokenizer"
        " --train {input.train} --val {input.val} --out results/sft --ckpt {params.ckpt}"
        " --settings {params.settings:q}"
        " 2> >(trap '' TERM INT; exec tee {log} >&2)"


rule rollouts:
    input:
        model=model_folder("sft"),
        prompts="results/split/sft/dpo_prompts.parquet",
    output:
        pairs="results/rollouts/pairs.parquet",
        stats="results/rollouts/stats.json",
    params:
        model_dir=lambda w, input: os.path.dirname(input.model[0]),
        settings=config["rollouts"],
    threads: workflow.cores
    resources:
        gpu=min(1, gpus("sft")),  # the SFT model answers the prompts
    log:
        "results/logs/rollouts.log",
    benchmark:
        "results/benchmarks/rollouts.tsv"
    conda:
        "../../envs/zhlm.yaml"
    script:
        "../scripts/rollouts.py"


rule dpo:
    input:
        sft=model_folder("sft"),
        pairs=["results/rollouts/pairs.parquet"] + (["results/split/dpo/train.parquet"] if sources_of("dpo") else []),
        eval_pairs=["results/split/dpo/eval.parquet"] if sources_of("dpo") else [],
    output:
        folder=model_folder("dpo"),
        plot=report("results/dpo/loss.png", category="Training", caption="../report/loss.rst"),
    params:
        launch=launcher("dpo"),
        settings=json.dumps(config["dpo"]),
        ckpt="results/dpo/_ckpt",
        script=script_path("dpo.py"),
    threads: workflow.cores
    resources:
        **training_resources("dpo"),
    log:
        "results/logs/dpo.log",
    benchmark:
        "results/benchmarks/dpo.tsv"
    conda:
        "../../envs/zhlm.yaml"
    shell:
        "exec {params.launch} {params.script} --sft results/sft --tokenizer results/tokenizer"
        " --pairs {input.pairs} --eval-pairs {input.eval_pairs} --out results/dpo --ckpt {params.ckpt}"
        " --settings {params.settings:q}"
        " 2> >(trap '' TERM INT; exec tee {log} >&2)"
