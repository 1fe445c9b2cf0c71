"""Count jieba words over every training split, in parallel and in bounded memory."""
from zhlm.io import setup_logging
from zhlm.tokenizer.word_counts import count_words, iter_parquet_texts, save_word_counts

log = setup_logging(snakemake.log[0])
counts = count_words(iter_parquet_texts(snakemake.input), processes=snakemake.threads,
                     max_words=snakemake.params.max_words)
save_word_counts(counts, snakemake.output[0])
log.info("%d distinct words", len(counts))
