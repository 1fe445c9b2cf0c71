# Tokenizer: jieba word counts over the training text -> byte-level BPE -> token ids
# (pretraining text as one token stream, SFT conversations as token files with a loss mask).


rule count_words:
    input:
        tokenizer_training_text(),
    output:
        "results/tokenizer/word_counts.parquet",
    params:
        max_words=config["tokenizer"]["max_words"],
    threads: config["tokenizer"]["threads"]
    log:
        "results/logs/tokenizer/count_words.log",
    benchmark:
        "results/benchmarks/tokenizer/count_words.tsv"
    conda:
        "../../envs/zhlm.yaml"
    script:
        "../scripts/count_words.py"


rule build_tokenizer:
    input:
        "results/tokenizer/word_counts.parquet",
    output:
        tokenizer="results/tokenizer/tokenizer.json",
        config="results/tokenizer/tokenizer_config.json",
        special_tokens="results/tokenizer/special_tokens_map.json",
        stats="results/tokenizer/stats.json",
    params:
        vocab_size=config["tokenizer"]["vocab_size"],
        min_frequency=config["tokenizer"]["min_frequency"],
        model_max_length=config["tokenizer"]["model_max_length"],
    log:
        "results/logs/tokenizer/build_tokenizer.log",
    benchmark:
        "results/benchmarks/tokenizer/build_tokenizer.tsv"
    conda:
        "../../envs/zhlm.yaml"
    script:
        "../scripts/build_tokenizer.py"


rule binarize:
    input:
        train=split_files("pretrain", "train"),
        val=split_files("pretrain", "val"),
        tokenizer=rules.build_tokenizer.output.tokenizer,
    output:
        train="results/tokens/train.bin",
        val="results/tokens/val.bin",
        meta="results/tokens/meta.json",
    params:
        batch_size=config["binarize"]["batch_size"],
    log:
        "results/logs/tokens/binarize.log",
    benchmark:
        "results/benchmarks/tokens/binarize.tsv"
    conda:
        "../../envs/zhlm.yaml"
    script:
        "../scripts/binarize.py"


rule tokenize_sft:
    input:
        train=split_files("sft", "train"),
        eval=split_files("sft", "eval"),
        tokenizer=rules.build_tokenizer.output.tokenizer,
    output:
        conversation_files("results/tokens/sft", "train", "eval", by_id=("eval",)),
    params:
        out=lambda w, output: folder(output),
        batch_size=config["binarize"]["batch_size"],
    log:
        "results/logs/tokens/tokenize_sft.log",
    benchmark:
        "results/benchmarks/tokens/tokenize_sft.tsv"
    conda:
        "../../envs/zhlm.yaml"
    script:
        "../scripts/tokenize_sft.py"
