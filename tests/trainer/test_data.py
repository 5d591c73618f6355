"""splitlora.data: E2E reading, synthetic task, tokenizers, tokenization, partitions, loaders."""
from collections import Counter

import pytest
import torch

from splitlora.data import (
    DEFAULT_SEPARATOR,
    IGNORE_INDEX,
    TARGET_PREFIX,
    ClientLoader,
    Example,
    HFTokenizer,
    WordTokenizer,
    group_skew,
    load_dataset,
    load_tokenizer,
    mr_to_text_form,
    parse_mr,
    partition,
    read_e2e,
    ref_to_text_form,
    synthetic_examples,
    tokenize,
)

# ---------------------------------------------------------------------------------------------
# E2E files
# ---------------------------------------------------------------------------------------------


def test_read_e2e_txt(shared_data):
    examples = read_e2e(shared_data / "e2e" / "valid.txt")
    assert len(examples) == 4672
    first = examples[0]
    assert first.source == "name : Alimentum | area : city centre | family friendly : no"
    assert first.target == ("There is a place in the city centre , Alimentum , that is not "
                            "family - friendly .")
    assert parse_mr(first.source) == {"name": "Alimentum", "area": "city centre",
                                      "familyFriendly": "no"}
    last = examples[-1]
    assert parse_mr(last.source)["eatType"] == "coffee shop"  # spelled "Type : coffee shop"
    assert parse_mr(last.source)["priceRange"] == "moderate"  # spelled "price : moderate"
    assert last.group == "English"  # food first, then eatType
    assert len({e.source for e in examples}) == 547
    assert len(read_e2e(shared_data / "e2e" / "test.txt")) == 4693


def test_read_e2e_csv_groups_references_by_mr(shared_data):
    examples = read_e2e(shared_data / "e2e" / "devset.csv", text_form=False)
    assert len(examples) == 4672
    refs = Counter(e.source for e in examples)
    assert len(refs) == 547
    first = examples[0]
    assert first.source == "name[Alimentum], area[city centre], familyFriendly[no]"
    assert first.target == "There is a place in the city centre, Alimentum, that is not family-friendly."
    assert refs[first.source] == 6
    # The CSV and the text release are the same data: same number of references per source.
    txt = Counter(e.source for e in read_e2e(shared_data / "e2e" / "valid.txt"))
    assert sorted(refs.values()) == sorted(txt.values())
    # Same canonical fields from both spellings.
    assert parse_mr(first.source) == parse_mr(next(iter(txt)))
    test = read_e2e(shared_data / "e2e" / "testset_w_refs.csv", text_form=False)
    assert len(test) == 4693 and len({e.source for e in test}) == 630
    assert {e.group for e in test if "food[" not in e.source} <= {"pub", "restaurant", "coffee shop",
                                                                  "unknown"}


@pytest.mark.parametrize("csv_name, txt_name", [("testset_w_refs.csv", "test.txt"), ("devset.csv", "valid.txt")])
def test_read_e2e_csv_in_text_form_matches_the_text_release(shared_data, csv_name, txt_name):
    # The text files are the same data as the CSVs, line for line, written the way the trainer
    # learns it: the CSV read in text form must give the same prompts, and the same references
    # but for the text files' own inconsistencies of word splitting ("isn 't" vs "is n't").
    csv_examples = read_e2e(shared_data / "e2e" / csv_name)
    txt_examples = read_e2e(shared_data / "e2e" / txt_name)
    assert len(csv_examples) == len(txt_examples)
    assert [e.source for e in csv_examples] == [e.source for e in txt_examples]
    assert [e.group for e in csv_examples] == [e.group for e in txt_examples]
    same = sum(c.target == t.target for c, t in zip(csv_examples, txt_examples))
    # Measured: 4,652 of 4,693 (test) and 4,597 of 4,672 (dev); as published, 139 and 137.
    assert same >= 0.98 * len(csv_examples), f"only {same} of {len(csv_examples)} references split as in {txt_name}"
    # Splitting only ever inserts or removes spaces: the characters are the CSV's.
    squash = lambda text: "".join(text.split())
    assert all(squash(c.target) == squash(t.target) for c, t in zip(csv_examples, txt_examples))


def test_mr_to_text_form():
    csv_mr = ("name[The Punter], eatType[restaurant], food[Indian], priceRange[less than £20], "
              "customer rating[low], area[riverside], familyFriendly[no], near[Express by Holiday Inn]")
    text = ("name : The Punter | Type : restaurant | food : Indian | price : less than £ 20 | "
            "customer rating : low | area : riverside | family friendly : no | near : Express by Holiday Inn")
    assert mr_to_text_form(csv_mr) == text
    assert mr_to_text_form(text) == text  # already in text form: unchanged
    assert parse_mr(mr_to_text_form(csv_mr)) == {**parse_mr(csv_mr), "priceRange": "less than £ 20"}
    assert mr_to_text_form("name[Zizzi], priceRange[£20-25]") == "name : Zizzi | price : £ 20 - 25"
    # Field order is kept, an attribute E2E does not have keeps its name.
    assert mr_to_text_form("near[Avalon], name[X], stars[4]") == "near : Avalon | name : X | stars : 4"
    with pytest.raises(ValueError, match="not an E2E meaning representation"):
        mr_to_text_form("just some words")


@pytest.mark.parametrize("raw, text", [
    ("A coffee shop in the city centre area called Blue Spice.",
     "A coffee shop in the city centre area called Blue Spice ."),
    ("It isn't a family-friendly establishment.", "It is n't a family - friendly establishment ."),
    ("There's a pub, it's cheap; you'll like it, won't you?",
     "There 's a pub , it 's cheap ; you 'll like it , wo n't you ?"),
    ("Prices are less than £20 at 'The Mill'", "Prices are less than £ 20 at ' The Mill '"),
    ("There is a pub  called Zizzi located near The Sorrento.", "There is a pub called Zizzi located near The Sorrento ."),
    ("the riverside area's Giraffe", "the riverside area 's Giraffe"),
])
def test_ref_to_text_form(raw, text):
    assert ref_to_text_form(raw) == text
    assert ref_to_text_form(text) == text  # idempotent: text-form references stay as they are


def test_read_e2e_csv_text_form_of_a_small_file(tmp_path):
    path = tmp_path / "small.csv"
    path.write_text('mr,ref\n"name[X], eatType[pub], priceRange[more than £30]","X\'s a pub, isn\'t it?"\n',
                    encoding="utf-8")
    assert read_e2e(path) == [Example("name : X | Type : pub | price : more than £ 30", "X 's a pub , is n't it ?",
                                      "pub")]
    assert read_e2e(path, text_form=False) == [Example("name[X], eatType[pub], priceRange[more than £30]",
                                                       "X's a pub, isn't it?", "pub")]


def test_read_e2e_csv_quoting(tmp_path):
    path = tmp_path / "tricky.csv"
    path.write_text(
        'mr,ref\n'
        '"name[A, B], eatType[pub]","Says ""hello"", then, leaves."\n'
        'name[C],plain ref\n'
        '"name[D], food[Thai]","two\nlines"\n',
        encoding="utf-8",
    )
    examples = read_e2e(path, text_form=False)
    assert examples == [
        Example("name[A, B], eatType[pub]", 'Says "hello", then, leaves.', "pub"),
        Example("name[C]", "plain ref", "unknown"),
        Example("name[D], food[Thai]", "two\nlines", "Thai"),
    ]
    assert read_e2e(path, group_by="name", text_form=False)[0].group == "A, B"


def test_read_e2e_txt_skips_blank_lines_and_strips(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("name : X | Type : pub||X is a pub . \r\n\n", encoding="utf-8")
    assert read_e2e(path) == [Example("name : X | Type : pub", "X is a pub .", "pub")]


@pytest.mark.parametrize("line", ["name : X no separator", "||only a ref", "name : X||", "a||b||c"])
def test_read_e2e_txt_malformed(tmp_path, line):
    path = tmp_path / "bad.txt"
    path.write_text(f"name : A||fine .\nname : B||fine .\n{line}\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.txt:3:"):
        read_e2e(path)


def test_read_e2e_csv_errors(tmp_path):
    missing = tmp_path / "missing.csv"
    missing.write_text("mr,text\nname[A],x\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"missing\.csv.*'mr' and 'ref'"):
        read_e2e(missing)
    short = tmp_path / "short.csv"
    short.write_text("mr,ref\nname[A],x\nname[B]\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"short\.csv:3:"):
        read_e2e(short)
    extra = tmp_path / "extra.csv"
    extra.write_text("mr,ref\nname[A],x,y\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"extra\.csv:2:"):
        read_e2e(extra)
    with pytest.raises(FileNotFoundError):
        read_e2e(tmp_path / "nope.txt")


# ---------------------------------------------------------------------------------------------
# Synthetic task and datasets by name
# ---------------------------------------------------------------------------------------------


def test_synthetic_deterministic_and_seeded():
    a, b = synthetic_examples(300, seed=1), synthetic_examples(300, seed=1)
    assert a == b
    c = synthetic_examples(300, seed=2)
    assert a != c
    assert synthetic_examples(50, seed=1) == a[:50]  # prefix property
    assert len({e.source for e in a}) == 300
    assert {e.group for e in a} == {"pub", "coffee shop", "restaurant"}
    words = {w for e in a for w in e.target.split()}
    assert 20 <= len(words) <= 120  # a small, learnable vocabulary
    # The target is a function of the source, and realizes every attribute value in it.
    for e in a[:50]:
        fields = parse_mr(e.source)
        assert e.group == fields["eatType"]
        for key, value in fields.items():
            if key not in ("familyFriendly", "eatType"):
                assert value in e.target, (key, e)


def test_load_dataset_synthetic():
    train, evals = load_dataset("synthetic", num_train=100, num_eval=20, seed=3)
    assert len(train) == 100 and len(evals) == 20
    assert not {e.source for e in train} & {e.source for e in evals}
    train2, evals2 = load_dataset("synthetic", num_train=150, num_eval=20, seed=3)
    assert evals2 == evals and train2[:100] == train
    with pytest.raises(ValueError, match="synthetic, e2e"):
        load_dataset("wikitext")
    with pytest.raises(ValueError, match="num_train"):
        load_dataset("synthetic", num_train=0)


def test_load_dataset_e2e(shared_data):
    train, evals = load_dataset("e2e", train_path=shared_data / "e2e" / "valid.txt",
                                eval_path=shared_data / "e2e" / "test.txt",
                                num_train=500, num_eval=100, seed=0)
    assert len(train) == 500 and len(set(train)) >= 495
    # Eval keeps whole sources: every reference of each chosen source is there.
    full = Counter(e.source for e in read_e2e(shared_data / "e2e" / "test.txt"))
    chosen = Counter(e.source for e in evals)
    assert 0 < len(evals) <= 100
    assert all(full[s] == n for s, n in chosen.items())


def test_load_dataset_e2e_from_env(shared_data, monkeypatch):
    monkeypatch.setenv("SPLITLORA_DATA", str(shared_data))
    train, evals = load_dataset("e2e", num_eval=30)
    assert len(train) == 4672 and len(evals) <= 30
    monkeypatch.delenv("SPLITLORA_DATA")
    with pytest.raises(ValueError, match="SPLITLORA_DATA"):
        load_dataset("e2e")


# ---------------------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------------------


def test_word_tokenizer_round_trip(tmp_path):
    examples = synthetic_examples(200, seed=0)
    tok = load_tokenizer(None, examples)
    assert isinstance(tok, WordTokenizer)
    assert (tok.pad_id, tok.eos_id) == (0, 1) and tok.vocab_size == len(tok.vocab)
    for e in examples[:50]:
        for text in (e.source + DEFAULT_SEPARATOR, TARGET_PREFIX + e.target, e.target):
            ids = tok.encode(text)
            assert tok.unk_id not in ids
            assert tok.decode(ids) == text
    # The vocabulary does not depend on the order of the examples.
    assert WordTokenizer.from_examples(examples[::-1]).vocab == tok.vocab
    # Unknown words map to <unk>; known ones do not.
    ids = tok.encode("The Eagle munches Klingon food")
    assert ids.count(tok.unk_id) == 2
    # Save and load through load_tokenizer.
    tok.save(tmp_path / "word.json")
    again = load_tokenizer(tmp_path / "word.json")
    assert isinstance(again, WordTokenizer) and again.vocab == tok.vocab
    with pytest.raises(ValueError, match="examples"):
        load_tokenizer(None)


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "absent")
    with pytest.raises(ValueError, match="no tokenizer found"):
        load_tokenizer(tmp_path)


# ---------------------------------------------------------------------------------------------
# tokenize
# ---------------------------------------------------------------------------------------------


def _check_layout(ds, examples, tok, separator=DEFAULT_SEPARATOR):
    for i, e in enumerate(examples):
        prompt = tok.encode(e.source + separator)
        completion = tok.encode(TARGET_PREFIX + e.target) + [tok.eos_id]
        n = len(prompt) + len(completion)
        row, mask, labels = ds.input_ids[i], ds.attention_mask[i], ds.labels[i]
        assert row[:n].tolist() == prompt + completion
        assert mask[:n].eq(1).all() and mask[n:].eq(0).all()
        assert row[n:].eq(tok.pad_id).all()
        assert labels[:len(prompt)].eq(IGNORE_INDEX).all()
        assert labels[len(prompt):n].tolist() == completion
        assert labels[n:].eq(IGNORE_INDEX).all()
        assert int(ds.num_target_tokens[i]) == len(completion)


def test_tokenize_layout_word_tokenizer():
    examples = synthetic_examples(30, seed=5)
    tok = load_tokenizer(None, examples)
    ds = tokenize(examples, tok, max_length=256)
    lengths = [len(tok.encode(e.source + DEFAULT_SEPARATOR))
               + len(tok.encode(TARGET_PREFIX + e.target)) + 1 for e in examples]
    assert ds.input_ids.shape == (30, max(lengths))  # padded to the longest, not to max_length
    assert ds.input_ids.dtype == ds.attention_mask.dtype == ds.labels.dtype == torch.long
    assert ds.num_truncated == 0
    _check_layout(ds, examples, tok)
    # subset and batch select rows.
    sub = ds.subset([3, 1])
    assert len(sub) == 2 and torch.equal(sub.input_ids[0], ds.input_ids[3])
    batch = ds.batch([1, 3], trim=True)
    assert batch["input_ids"].shape[1] == max(lengths[1], lengths[3])
    assert torch.equal(batch["labels"], ds.labels[[1, 3], :batch["labels"].shape[1]])
    with pytest.raises(IndexError):
        ds.batch([30])


def test_tokenize_truncation():
    examples = synthetic_examples(10, seed=0)
    tok = load_tokenizer(None, examples)
    prompt_lens = [len(tok.encode(e.source + DEFAULT_SEPARATOR)) for e in examples]
    max_length = max(prompt_lens) + 3
    ds = tokenize(examples, tok, max_length=max_length)
    assert ds.seq_len == max_length
    expected_cut = 0
    for i, e in enumerate(examples):
        p = prompt_lens[i]
        completion = tok.encode(TARGET_PREFIX + e.target) + [tok.eos_id]
        cut = p + len(completion) > max_length
        expected_cut += cut
        assert bool(ds.truncated[i]) == cut
        kept = min(max_length - p, len(completion))
        labels = ds.labels[i, p:p + kept].tolist()
        assert labels == completion[:kept]  # a prefix: the eos goes with the cut tail
        assert (labels[-1] == tok.eos_id) != cut
        assert int(ds.num_target_tokens[i]) == kept >= 1
    assert 0 < expected_cut == ds.num_truncated
    with pytest.raises(ValueError, match=r"max_length=5.*needs \d+"):
        tokenize(examples, tok, max_length=5)


def test_tokenize_gpt2(shared_data):
    tok = load_tokenizer(shared_data / "gpt2-tokenizer")
    assert isinstance(tok, HFTokenizer)
    assert tok.eos_id == 50256 and tok.pad_id == 50256 and tok.vocab_size == 50257
    assert load_tokenizer(shared_data / "gpt2-tokenizer" / "tokenizer.json").encode("Hello") == \
        tok.encode("Hello")
    examples = read_e2e(shared_data / "e2e" / "valid.txt")[:8]
    ds = tokenize(examples, tok, max_length=128)
    _check_layout(ds, examples, tok)
    # Pad shares the eos id: the real eos is labelled, the padding after it is not.
    for i in range(len(examples)):
        n = int(ds.attention_mask[i].sum())
        assert int(ds.labels[i, n - 1]) == tok.eos_id
        assert ds.labels[i, n:].eq(IGNORE_INDEX).all()
    assert tok.decode(ds.labels[0][ds.labels[0] != IGNORE_INDEX]) == \
        TARGET_PREFIX + examples[0].target + "<|endoftext|>"


# ---------------------------------------------------------------------------------------------
# partition
# ---------------------------------------------------------------------------------------------


def _covers_once(parts, n):
    flat = [i for p in parts for i in p]
    return sorted(flat) == list(range(n))


@pytest.mark.parametrize("n,k", [(10, 3), (100, 7), (5, 5), (9, 1)])
def test_partition_iid(n, k):
    groups = ["g"] * n
    parts = partition(groups, k, "iid", seed=1)
    assert len(parts) == k and _covers_once(parts, n)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert partition(groups, k, "iid", seed=1) == parts
    if n > k > 1:
        assert partition(groups, k, "iid", seed=2) != parts


def test_partition_dirichlet_covers_and_skews():
    groups = [f"g{i % 6}" for i in range(600)]
    small, large = [], []
    for seed in range(5):
        for alpha, out in ((0.05, small), (100.0, large)):
            parts = partition(groups, 8, "dirichlet", alpha=alpha, seed=seed)
            assert len(parts) == 8 and _covers_once(parts, 600)
            assert all(parts)
            out.append(group_skew(groups, parts))
    mean_small, mean_large = sum(small) / 5, sum(large) / 5
    assert mean_small > 0.4 and mean_large < 0.1, (mean_small, mean_large)
    iid = partition(groups, 8, "iid", seed=0)
    assert group_skew(groups, iid) < 0.1


def test_partition_dirichlet_rebalances_empty_clients():
    # One group, tiny alpha: nearly everything lands on one client; the rest must be refilled.
    groups = ["only"] * 20
    for seed in range(5):
        parts = partition(groups, 10, "dirichlet", alpha=0.01, seed=seed)
        assert all(parts) and _covers_once(parts, 20)
    parts = partition(["a", "b", "c"], 3, "dirichlet", alpha=0.01, seed=0)
    assert sorted(len(p) for p in parts) == [1, 1, 1]


def test_partition_errors():
    groups = ["a", "b", "c"]
    with pytest.raises(ValueError, match="num_clients"):
        partition(groups, 0)
    with pytest.raises(ValueError, match="more than the 3 examples"):
        partition(groups, 4)
    with pytest.raises(ValueError, match="iid, dirichlet"):
        partition(groups, 2, "shards")
    with pytest.raises(ValueError, match="alpha"):
        partition(groups, 2, "dirichlet", alpha=0.0)
    with pytest.raises(ValueError, match="alpha"):
        partition(groups, 2, "dirichlet", alpha=-1)


# ---------------------------------------------------------------------------------------------
# ClientLoader
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_dataset():
    examples = synthetic_examples(40, seed=0)
    return tokenize(examples, load_tokenizer(None, examples), max_length=128)


def test_client_loader_epochs(small_dataset):
    indices = list(range(5, 29))  # 24 examples
    loader = ClientLoader(small_dataset, indices, batch_size=6, seed=0, client_id=2)
    seen = torch.cat([loader.next_indices() for _ in range(4)])
    assert sorted(seen.tolist()) == indices  # one pass covers each example once
    assert loader.epoch == 0
    batch = loader.next_batch()
    assert loader.epoch == 1
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].shape == (6, small_dataset.seq_len)
    # Batches that straddle the end of a pass keep their size.
    odd = ClientLoader(small_dataset, range(7), batch_size=3)
    assert all(odd.next_indices().numel() == 3 for _ in range(10))
    # Fewer examples than batch_size: the batch is the whole client.
    assert ClientLoader(small_dataset, [1, 2], batch_size=8).next_indices().numel() == 2
    with pytest.raises(ValueError, match="no examples"):
        ClientLoader(small_dataset, [], batch_size=2)


def test_client_loader_streams_differ_per_client_and_seed(small_dataset):
    def draw(**kw):
        loader = ClientLoader(small_dataset, range(40), batch_size=8, **kw)
        return [loader.next_indices().tolist() for _ in range(3)]

    assert draw(seed=0, client_id=0) == draw(seed=0, client_id=0)
    assert draw(seed=0, client_id=0) != draw(seed=0, client_id=1)
    assert draw(seed=0, client_id=0) != draw(seed=1, client_id=0)


@pytest.mark.parametrize("k", [0, 2, 3, 7])
def test_client_loader_resume(small_dataset, k):
    indices = [0, 3, 4, 8, 9, 11, 15, 16, 20, 22, 30, 31, 33]  # 13: passes do not split evenly
    m = 9
    uninterrupted = ClientLoader(small_dataset, indices, batch_size=5, seed=7, client_id=1)
    for _ in range(k):
        uninterrupted.next_batch()
    state = uninterrupted.state_dict()
    state = torch.load(_roundtrip(state), weights_only=False)  # as a checkpoint would
    expected = [uninterrupted.next_batch() for _ in range(m)]

    resumed = ClientLoader(small_dataset, indices, batch_size=5, seed=12345, client_id=9)
    resumed.load_state_dict(state)
    got = [resumed.next_batch() for _ in range(m)]
    for a, b in zip(expected, got):
        for key in a:
            assert torch.equal(a[key], b[key])
    assert resumed.epoch == uninterrupted.epoch

    with pytest.raises(ValueError, match="examples"):
        ClientLoader(small_dataset, indices[:-1], batch_size=5).load_state_dict(state)


def _roundtrip(obj):
    import io

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return buffer
