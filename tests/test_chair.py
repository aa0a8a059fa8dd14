"""CHAIR (vlmfix.metrics.chair): caption parsing quirks, hand-computed metrics, input errors."""

import json

import pytest

from vlmfix.metrics import chair
from vlmfix.metrics.chair_lemma import noun_lemma, verb_lemma
from vlmfix.metrics.chair_tokenize import word_tokenize

CATEGORIES = [
    {"id": 1, "name": "person"}, {"id": 18, "name": "dog"}, {"id": 54, "name": "hot dog"},
    {"id": 67, "name": "dining table"}, {"id": 70, "name": "toilet"},
    {"id": 22, "name": "elephant"},
]
INSTANCES = {
    "images": [{"id": 1}, {"id": 2}, {"id": 3}, {"id": 4}],
    "annotations": [
        {"image_id": 1, "category_id": 18}, {"image_id": 1, "category_id": 1},
        {"image_id": 1, "category_id": 1},
        {"image_id": 2, "category_id": 54}, {"image_id": 2, "category_id": 67},
        {"image_id": 3, "category_id": 70},
    ],  # image 4 has no instance annotation: its ground truth comes from its captions
    "categories": CATEGORIES,
}
CAPTIONS = {
    "images": [{"id": 1}, {"id": 2}, {"id": 3}, {"id": 4}],
    "annotations": [
        {"image_id": 1, "caption": "A man walks his dog on a leash."},
        {"image_id": 2, "caption": "A hot dog on a plate."},
        {"image_id": 3, "caption": "A white toilet in a small bathroom."},
        {"image_id": 4, "caption": "An elephant walking near a baby elephant."},
    ],
}
# Ground truth: 1 {dog, person}; 2 {hot dog, dining table}; 3 {toilet}; 4 {elephant}.
GENERATED = [
    # 11 tokens: two dogs and a man . a cat sits nearby . -> dog, person, cat (hallucinated)
    {"image_id": 1, "caption": "Two dogs and a man. A cat sits nearby."},
    # a hot dog on a table . -> 6 words after merging "hot dog"; hot dog, dining table
    {"image_id": 2, "caption": "A hot dog on a table."},
    # a toilet with the seat up . -> 7 words; "seat" is dropped next to "toilet"
    {"image_id": 3, "caption": "A toilet with the seat up."},
    # empty: 0 words, 0 mentions, recalls nothing of {elephant}
    {"image_id": 4, "caption": ""},
]


@pytest.fixture(scope="module")
def ev():
    return chair.CHAIR(INSTANCES, CAPTIONS)


def test_ground_truth(ev):
    assert ev.ground_truth == {1: {"dog", "person"}, 2: {"hot dog", "dining table"},
                               3: {"toilet"}, 4: {"elephant"}}


def test_metrics_hand_computed(ev):
    out = ev.compute(GENERATED)
    assert out["CHAIRs"] == pytest.approx(1 / 4)       # only caption 1 hallucinates
    assert out["CHAIRi"] == pytest.approx(1 / 6)       # mentions: 3 + 2 + 1 + 0, one is "cat"
    assert out["Recall"] == pytest.approx(5 / 6)       # recalled 2 + 2 + 1 + 0 of 2 + 2 + 1 + 1
    assert out["Len"] == pytest.approx((11 + 6 + 7 + 0) / 4)
    assert out["counts"] == {"captions": 4, "hallucinated_captions": 1, "mentions": 6,
                             "hallucinated_mentions": 1, "gt_objects": 6,
                             "gt_objects_mentioned": 5, "words": 24}
    first, second, third, empty = out["sentences"]
    assert first["mscoco_generated_words"] == ["dog", "person", "cat"]
    assert first["mscoco_hallucinated_words"] == [("cat", "cat")]
    assert first["hallucination_idxs"] == [7]
    assert first["mscoco_gt_words"] == ["dog", "person"]
    assert first["metrics"] == {"CHAIRs": 1, "CHAIRi": pytest.approx(1 / 3), "Recall": 1.0}
    assert second["words"] == ["a", "hot dog", "on", "a", "table", "."]
    assert second["mscoco_generated_words"] == ["hot dog", "dining table"]
    assert second["metrics"]["CHAIRs"] == 0
    assert third["mscoco_generated_words"] == ["toilet"]
    assert empty["words"] == [] and empty["metrics"] == {"CHAIRs": 0, "CHAIRi": 0.0,
                                                          "Recall": 0.0}


def test_paths_equal_dicts(ev, tmp_path):
    (tmp_path / "instances.json").write_text(json.dumps(INSTANCES))
    (tmp_path / "captions.json").write_text(json.dumps(CAPTIONS))
    from_files = chair.CHAIR(tmp_path / "instances.json", str(tmp_path / "captions.json"))
    assert from_files.compute(GENERATED) == ev.compute(GENERATED)


@pytest.mark.parametrize("caption, words, nodes", [
    ("Two dogs and a hot dog.", ["dog", "hot dog"], ["dog", "hot dog"]),
    ("A hot dog.", ["hot dog"], ["hot dog"]),                     # a hot dog is not a dog
    ("People with knives chasing mice.", ["people", "knife", "mouse"],
     ["person", "knife", "mouse"]),
    ("Women and children.", ["woman", "child"], ["person", "person"]),
    ("Two men.", [], []),              # WordNet keeps "men" (a noun itself), not in the table
    ("Geese, oxen and skis.", ["goose", "ox", "ski"], ["bird", "cow", "skis"]),
    ("A teddy bear, a cell phone and two wine glasses.",
     ["teddy bear", "cell phone", "wine glass"], ["teddy bear", "cell phone", "wine glass"]),
    ("Glasses on a bear.", ["bear"], ["bear"]),                 # "glass" alone is no object
    ("A baby elephant and an adult dog.", ["elephant", "dog"], ["elephant", "dog"]),
    ("A baby in a crib.", ["baby"], ["person"]),
    ("A passenger jet and a passenger train.", ["jet", "train"], ["airplane", "train"]),
    ("A passenger on a bus.", ["passenger", "bus"], ["person", "bus"]),
    ("A toilet seat.", ["toilet"], ["toilet"]),
    ("The seat of the toilet.", ["toilet"], ["toilet"]),          # "seat" dropped: no chair
    ("An empty seat.", ["seat"], ["chair"]),
    ("A man in a bow tie.", ["man", "tie"], ["person", "tie"]),
    ("A motor bike and a motorbike.", ["motorbike"], ["motorcycle"]),  # " motor bike" (sic)
    ("An iPhone and a cheesecake and a cupcake.", ["cupcake"], ["cake"]),
    ("A dog and another dog.", ["dog", "dog"], ["dog", "dog"]),   # not deduplicated
    ("", [], []),
])
def test_caption_to_objects(ev, caption, words, nodes):
    assert ev.caption_to_objects(caption) == (words, nodes)


@pytest.mark.parametrize("caption, nodes", [
    # "-ed"/"-ing" forms read as verbs are lemmatised as verbs, as the reference's tagger does
    ("A man seated at a table.", ["person", "chair", "dining table"]),
    ("A dog tied to a parking meter.", ["dog", "tie", "parking meter"]),
    ("People skiing down a slope.", ["person", "skis"]),
    ("A plane taxiing on the runway.", ["airplane", "car"]),
    ("The boat is tied.", ["boat", "tie"]),
    # ... and as nouns or modifiers after a determiner, numeral or preposition
    ("A potted plant and two parking meters.", ["potted plant", "parking meter"]),
    ("Equipment for skiing.", []),
    ("A moped.", ["motorcycle"]),     # a synonym-table word is never read as a verb ("mope")
    ("Cars and taxis.", ["car", "car"]),  # plural nouns stay nouns (verb "taxis" is no taxi)
])
def test_verb_forms(ev, caption, nodes):
    assert ev.caption_to_objects(caption)[1] == nodes


@pytest.mark.parametrize("word, lemma", [
    ("people", "people"), ("men", "men"), ("women", "woman"), ("children", "child"),
    ("knives", "knife"), ("geese", "goose"), ("mice", "mouse"), ("oxen", "ox"),
    ("glasses", "glass"), ("buses", "bus"), ("skis", "ski"), ("scissors", "scissors"),
    ("vases", "vas"), ("calves", "calf"), ("taxis", "taxi"), ("buffaloes", "buffalo"),
    ("policemen", "policeman"), ("puppies", "puppy"), ("benches", "bench"), ("dogs", "dog"),
    ("bus", "bus"), ("glass", "glass"),
])
def test_wordnet_noun_lemmas(word, lemma):
    """Values of NLTK's WordNetLemmatizer().lemmatize(word) with WordNet 3.0."""
    assert noun_lemma(word) == lemma


@pytest.mark.parametrize("word, lemma", [
    ("seated", "seat"), ("tied", "tie"), ("tying", "tie"), ("skiing", "ski"), ("born", "bear"),
    ("taxiing", "taxi"), ("potted", "pot"), ("parking", "park"), ("shipped", "ship"),
])
def test_wordnet_verb_lemmas(word, lemma):
    """Values of NLTK's WordNetLemmatizer().lemmatize(word, "v") with WordNet 3.0."""
    assert verb_lemma(word) == lemma


@pytest.mark.parametrize("text, tokens", [
    ("a dog. a cat.", ["a", "dog", ".", "a", "cat", "."]),
    ("mr. smith's dog can't run.", ["mr.", "smith", "'s", "dog", "ca", "n't", "run", "."]),
    ("e.g. a dog", ["e.g", ".", "a", "dog"]),     # Punkt's English model does not list "e.g"
    ("1,000 birds, 3.5 cm at 10:30", ["1,000", "birds", ",", "3.5", "cm", "at", "10:30"]),
    ('"hi," she said.', ["``", "hi", ",", "''", "she", "said", "."]),
    ("a dog...a cat (white)!", ["a", "dog", "...", "a", "cat", "(", "white", ")", "!"]),
    ("a t-shirt and/or a cap; gonna rain", ["a", "t-shirt", "and/or", "a", "cap", ";", "gon",
                                            "na", "rain"]),
    ("the dogs' bowls.the end", ["the", "dogs", "'", "bowls.the", "end"]),
    ("a dog.\" the cat", ["a", "dog", ".", "''", "the", "cat"]),
])
def test_tokenizer(text, tokens):
    assert word_tokenize(text) == tokens


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_file_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(ValueError, match="nope.json: instances file not found"):
        chair.CHAIR(missing, CAPTIONS)
    empty = _write(tmp_path, "empty.json", "  \n")
    with pytest.raises(ValueError, match="empty.json: captions file is empty"):
        chair.CHAIR(INSTANCES, empty)
    broken = _write(tmp_path, "broken.json", '{"annotations": [\n  {"image_id": 1,,}\n]}')
    with pytest.raises(ValueError, match=r"broken.json: not valid JSON \(line 2"):
        chair.CHAIR(INSTANCES, broken)
    listed = _write(tmp_path, "list.json", "[]")
    with pytest.raises(ValueError, match="list.json: expected a COCO-format JSON object"):
        chair.CHAIR(listed, CAPTIONS)
    no_categories = _write(tmp_path, "inst.json", json.dumps({"annotations": []}))
    with pytest.raises(ValueError, match="inst.json: missing field 'categories'"):
        chair.CHAIR(no_categories, CAPTIONS)


@pytest.mark.parametrize("instances, captions, match", [
    ({**INSTANCES, "annotations": [{"image_id": 1}]}, CAPTIONS,
     r"instances \(dict\): annotations\[0\] lacks 'category_id'"),
    ({**INSTANCES, "annotations": [{"image_id": 1, "category_id": 99}]}, CAPTIONS,
     r"annotations\[0\] has category_id 99, which is not in 'categories'"),
    ({**INSTANCES, "categories": [{"id": 1, "name": "unicorn"}]}, CAPTIONS,
     r"categories\[0\] name 'unicorn' is not a COCO object"),
    ({**INSTANCES, "annotations": [{"image_id": 9, "category_id": 1}]}, CAPTIONS,
     r"instances \(dict\): annotations\[0\] has image_id 9, which is not in the file's"),
    (INSTANCES, {**CAPTIONS, "annotations": [{"image_id": 1, "caption": "ok"},
                                             {"image_id": 7, "caption": "a dog"}]},
     r"captions \(dict\): annotations\[1\] has image_id 7"),
    (INSTANCES, {"annotations": [{"image_id": 1, "caption": None}]},
     r"annotations\[0\] caption is not a string"),
    (INSTANCES, {"images": []}, "captions \\(dict\\): missing field 'annotations'"),
])
def test_malformed_annotations(instances, captions, match):
    with pytest.raises(ValueError, match=match):
        chair.CHAIR(instances, captions)


def test_malformed_generated(ev):
    with pytest.raises(ValueError, match="no generated captions"):
        ev.compute([])
    with pytest.raises(ValueError, match="generated caption 1: image_id 5 .int. is not in"):
        ev.compute([{"image_id": 1, "caption": "a dog"}, {"image_id": 5, "caption": "a dog"}])
    with pytest.raises(ValueError, match="image_id '1' .str. is not in"):
        ev.compute([{"image_id": "1", "caption": "a dog"}])
    with pytest.raises(ValueError, match="generated caption 0 must be a dict with"):
        ev.compute([{"image_id": 1, "text": "a dog"}])
    with pytest.raises(ValueError, match=r"caption 0 \(image_id 1\): caption is NoneType"):
        ev.compute([{"image_id": 1, "caption": None}])
