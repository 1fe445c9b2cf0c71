# Alignment: SFT on the instruction data's token files, DPO rollouts from the SFT model, the
# pairs' token files, then DPO. SFT or DPO with `lora` trains an adapter, which merge_lora
# merges into the stage's model folder.
# Training commands exec and tee ignores SIGTERM, as in pretrain.smk.


rule sft:
    input:
        init=model_folder("pretrain"),
        tokenizer=tokenizer_files(),
        tokens=rules.tokenize_sft.output,
        # Pretraining text that sft.pretrain_mix mixes in.
        pretrain_tokens=["results/tokens/train.bin", "results/tokens/meta.json"],
    output:
        folder=trained_files("sft"),
        plot=report(f"{trained_dir('sft')}/loss.png", category="Training", caption="../report/loss.rst"),
    params:
        launch=launcher("sft"),
        settings=json.dumps(config["sft"]),
        init=lambda w, input: folder(input.init),
        tokenizer=lambda w, input: folder(input.tokenizer),
        tokens=lambda w, input: folder(input.tokens),
        pretrain_tokens=lambda w, input: folder(input.pretrain_tokens),
        out=lambda w, output: folder([*output.folder, output.plot]),
        ckpt=lambda w, output: os.path.join(folder(output.folder), "_ckpt"),
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
        'exec "$ZHLM_PYTHON" -m zhlm.train.launch {params.launch} "$ZHLM_SCRIPTS/sft.py"'
        " --init {params.init:q} --tokenizer {params.tokenizer:q}"
        " --tokens {params.tokens:q} --pretrain-tokens {params.pretrain_tokens:q} --out {params.out:q}"
        " --ckpt {params.ckpt:q} --settings {params.settings:q}"
        " 2> >(trap '' TERM INT; exec tee {log} >&2)"


rule rollouts:
    input:
        model=model_folder("sft"),
        prompts=rollout_prompt_files(),
    output:
        pairs="results/rollouts/pairs.parquet",
        stats="results/rollouts/stats.json",
    params:
        model_dir=lambda w, input: os.path.dirname(input.model[0]),
        settings=config["rollouts"],
    threads: workflow.cores
    resources:
        gpu=gpus("rollouts"),
    log:
        "results/logs/rollouts.log",
    benchmark:
        "results/benchmarks/rollouts.tsv"
    conda:
        "../../envs/zhlm.yaml"
    script:
        "../scripts/rollouts.py"


rule tokenize_dpo:
    input:
        pairs=["results/rollouts/pairs.parquet"] + (split_files("dpo", "train") if sources_of("dpo") else []),
        eval_pairs=split_files("dpo", "eval") if sources_of("dpo") else [],
        tokenizer=rules.build_tokenizer.output.tokenizer,
    output:
        conversation_files("results/tokens/dpo", "train.chosen", "train.rejected", "eval.chosen", "eval.rejected"),
    params:
        out=lambda w, output: folder(output),
        batch_size=config["binarize"]["batch_size"],
    log:
        "results/logs/tokens/tokenize_dpo.log",
    benchmark:
        "results/benchmarks/tokens/tokenize_dpo.tsv"
    conda:
        "../../envs/zhlm.yaml"
    script:
        "../scripts/tokenize_dpo.py"


rule dpo:
    input:
        sft=model_folder("sft"),
        tokenizer=tokenizer_files(),
        tokens=rules.tokenize_dpo.output,
        # The sft stage's conversations that anchor_weight trains on beside the pairs.
        sft_tokens=rules.tokenize_sft.output if config["dpo"]["anchor_weight"] else [],
    output:
        folder=trained_files("dpo"),
        plot=report(f"{trained_dir('dpo')}/loss.png", category="Training", caption="../report/loss.rst"),
    params:
        launch=launcher("dpo"),
        settings=json.dumps(config["dpo"]),
        sft=lambda w, input: folder(input.sft),
        tokenizer=lambda w, input: folder(input.tokenizer),
        tokens=lambda w, input: folder(input.tokens),
        anchors=lambda w, input: folder_options(sft_tokens=input.sft_tokens),
        out=lambda w, output: folder([*output.folder, output.plot]),
        ckpt=lambda w, output: os.path.join(folder(output.folder), "_ckpt"),
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
        'exec "$ZHLM_PYTHON" -m zhlm.train.launch {params.launch} "$ZHLM_SCRIPTS/dpo.py"'
        " --sft {params.sft:q} --tokenizer {params.tokenizer:q}"
        " --tokens {params.tokens:q} {params.anchors} --out {params.out:q} --ckpt {params.ckpt:q}"
        " --settings {params.settings:q}"
        " 2> >(trap '' TERM INT; exec tee {log} >&2)"


if lora_stages():

    rule merge_lora:
        input:
            base=lambda w: lora_base(w.stage),
            adapter=multiext("results/{stage}/lora/", *ADAPTER_FILES),
            plot="results/{stage}/lora/loss.png",
            tokenizer=lambda w: lora_tokenizer(w.stage),
        output:
            folder=model_folder("{stage}"),
            plot="results/{stage}/loss.png",
        params:
            base=lambda w, input: folder(input.base),
            adapter=lambda w, input: folder([*input.adapter, input.plot]),
            tokenizer=lambda w, input: folder(input.tokenizer),
            out=lambda w, output: folder([*output.folder, output.plot]),
        wildcard_constraints:
            stage="|".join(lora_stages()),
        log:
            "results/logs/merge_lora/{stage}.log",
        benchmark:
            "results/benchmarks/merge_lora/{stage}.tsv"
        conda:
            "../../envs/zhlm.yaml"
        script:
            "../scripts/merge_lora.py"
