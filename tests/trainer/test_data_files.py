"""The user's own data: file readers (HF datasets), record forms, loss masks, natural partitions,
held-out evaluation data, and training on each form end to end."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from splitlora.config import ConfigError, load_config
from splitlora.data import IGNORE_INDEX, WordTokenizer, synthetic_examples, tokenize
from splitlora.data.formats import DataFileError, read_rows
from splitlora.data.loading import load_records
from splitlora.data.records import (Chat, PromptCompletion, RecordKeys, SkipCounter, Text, detect_format,
                                    encode_records, examples_to_records, generation_items,
                                    generation_items_from_examples, rows_to_records)

from trainer_testutil import tiny_config

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TWO_TURNS = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"},
             {"role": "user", "content": "Bye now"}, {"role": "assistant", "content": "See you"}]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def gpt2_tokenizer(shared_data):
    from splitlora.data import load_tokenizer

    return load_tokenizer(shared_data / "gpt2-tokenizer")


# ---------------------------------------------------------------------------------------------
# Readers
# ---------------------------------------------------------------------------------------------

ROWS = [{"prompt": "a b", "completion": " c", "n": 1}, {"prompt": "d", "completion": " e f", "n": 2}]


@pytest.mark.parametrize("source", ["jsonl", "json", "csv", "parquet", "hf_disk"])
def test_every_reader_gives_the_rows_written(tmp_path, source):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list(ROWS)
    path = tmp_path / f"data.{source}"
    if source == "jsonl":
        write_jsonl(path, ROWS)
    elif source == "json":
        path.write_text(json.dumps(ROWS), encoding="utf-8")
    elif source == "csv":
        ds.to_csv(str(path), index=False)
    elif source == "parquet":
        ds.to_parquet(str(path))
    else:
        ds.save_to_disk(str(path))
    assert read_rows(source, path, "data.train_path") == ROWS


@pytest.mark.parametrize("content, message", [
    (b"", "is empty"),
    (b'{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion":\n', "line 2 is not valid JSON"),
    (b'["not", "an", "object"]\n', "line 1 is not a JSON object"),
    (b'{"prompt": "caf\xe9"}\n', "not valid UTF-8"),
])
def test_malformed_jsonl_is_an_error_naming_the_key_and_file(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataFileError, match=message) as info:
        read_rows("jsonl", path, "data.train_path")
    assert str(info.value).startswith("data.train_path:") and str(path) in str(info.value)


def test_missing_paths_name_the_key(tmp_path):
    with pytest.raises(DataFileError, match=r"data.eval_path: no such file '.*nope.csv'"):
        read_rows("csv", tmp_path / "nope.csv", "data.eval_path")
    with pytest.raises(DataFileError, match="is not a folder; data.source hf_disk reads a folder"):
        read_rows("hf_disk", tmp_path / "nope", "data.train_path")


# ---------------------------------------------------------------------------------------------
# Record forms and skipping
# ---------------------------------------------------------------------------------------------

def test_detect_format_from_columns():
    keys = RecordKeys()
    assert detect_format({"messages", "id"}, keys)[0] == "chat"
    assert detect_format({"prompt", "completion"}, keys)[0] == "prompt_completion"
    assert detect_format({"text"}, keys)[0] == "text"
    assert detect_format({"context", "completion"}, RecordKeys(prompt="context"))[0] == "prompt_completion"
    with pytest.raises(ValueError, match=r"cannot tell the record form from the columns \['context', 'target'\]"):
        detect_format({"context", "target"}, keys)


def test_unusable_rows_are_skipped_and_counted_by_reason():
    rows = [{"prompt": "p", "completion": "c"}, {"prompt": "p"}, {"prompt": "p", "completion": "  "},
            {"prompt": "p", "completion": 5}, {"prompt": None, "completion": "c"}, {"prompt": "q", "completion": "d"}]
    skips = SkipCounter("training")
    records, kept = rows_to_records(rows, "prompt_completion", RecordKeys(), skips)
    assert kept == [0, 5] and [r.prompt for r in records] == ["p", "q"]
    assert skips.total == 6 and skips.skipped == 4
    summary = skips.summary()
    assert summary.startswith("skipped 4 of 6 training records")
    for reason in ("missing 'completion'", "empty completion", "'completion' not a string", "missing 'prompt'"):
        assert reason in summary


def test_chat_rows_are_checked():
    rows = [{"messages": TWO_TURNS},
            {"messages": [{"role": "user", "content": "x"}]},
            {"messages": [{"role": "user", "content": "x"}, {"role": "bot", "content": "y"}]},
            {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": 3}]},
            {"messages": "hello"},
            {"messages": TWO_TURNS[:3]}]
    skips = SkipCounter("training")
    records, kept = rows_to_records(rows, "chat", RecordKeys(), skips)
    assert kept == [0] and records[0].messages[1] == ("assistant", "Hello there")
    assert skips.skipped == 5


def test_chat_in_a_csv_cell_is_json_text(tmp_path):
    datasets = pytest.importorskip("datasets")
    path = tmp_path / "chats.csv"
    datasets.Dataset.from_list([{"messages": json.dumps(TWO_TURNS)}, {"messages": "not json"}]).to_csv(
        str(path), index=False)
    skips = SkipCounter("training")
    records, kept = rows_to_records(read_rows("csv", path, "data.train_path"), "chat", RecordKeys(), skips)
    assert kept == [0] and records[0].messages == tuple((m["role"], m["content"]) for m in TWO_TURNS)
    assert "not a JSON list of messages" in skips.summary()


def test_prompt_completion_encoding_equals_the_e2e_tokenize():
    examples = synthetic_examples(12, seed=4)
    tok = WordTokenizer.from_examples(examples)
    reference = tokenize(examples, tok, max_length=40)
    data, kept = encode_records(examples_to_records(examples), tok, 40)
    assert kept == list(range(12))
    for name in ("input_ids", "attention_mask", "labels", "num_target_tokens", "truncated"):
        assert torch.equal(getattr(data, name), getattr(reference, name)), name


def test_on_long_skips_or_truncates_the_completion():
    tok = WordTokenizer.from_texts(["a b c d e f g h"])
    records = [PromptCompletion("a b", " c d e f g h"), PromptCompletion("a", " b"),
               PromptCompletion("a b c d e f", " g")]
    skips = SkipCounter("training")
    data, kept = encode_records(records, tok, 5, "skip", skips=skips)
    # "a b c d e f" alone is 6 tokens: no completion token fits in 5 either way.
    assert kept == [1] and skips.skipped == 2
    skips = SkipCounter("training")
    data, kept = encode_records(records, tok, 5, "truncate", skips=skips)
    assert kept == [0, 1] and skips.skipped == 1
    assert data.truncated.tolist() == [True, False]
    # The prompt is kept whole, the completion cut at max_length: labels on its first 3 tokens only.
    assert tok.decode(data.input_ids[0][:5].tolist()) == "a b c d e"
    assert data.labels[0].tolist() == [IGNORE_INDEX, IGNORE_INDEX] + data.input_ids[0, 2:5].tolist()


def test_text_form_labels_every_token():
    tok = WordTokenizer.from_texts(["one two three"])
    data, _ = encode_records([Text("one two three")], tok, 16)
    ids = tok.encode("one two three") + [tok.eos_id]
    assert data.input_ids[0].tolist() == ids and data.labels[0].tolist() == ids
    assert generation_items([Text("one two three")], tok)[0] == []


def _labelled_and_not(tok, data, row=0):
    """The decoded text of each maximal run of labelled and of unlabelled tokens of a row."""
    n = int(data.attention_mask[row].sum())
    ids, labels = data.input_ids[row, :n].tolist(), data.labels[row, :n].tolist()
    runs, current, state = [], [], None
    for token, label in zip(ids, labels):
        labelled = label != IGNORE_INDEX
        if state is not None and labelled != state:
            runs.append((tok.decode(current), state))
            current = []
        current.append(token)
        state = labelled
    runs.append((tok.decode(current), state))
    return runs


def test_chat_mask_with_a_template_from_the_config(shared_data, tmp_path):
    tok = gpt2_tokenizer(shared_data)
    template_file = tmp_path / "chatml.jinja"
    template_file.write_text(CHATML)
    chat = Chat(tuple((m["role"], m["content"]) for m in TWO_TURNS))
    for template in (CHATML, str(template_file)):
        data, _ = encode_records([chat], tok, 128, chat_template=template)
        # Hand-written: exactly the two assistant replies and their end-of-turn text carry labels.
        assert _labelled_and_not(tok, data) == [
            ("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", False),
            ("Hello there<|im_end|>\n", True),
            ("<|im_start|>user\nBye now<|im_end|>\n<|im_start|>assistant\n", False),
            ("See you<|im_end|>\n", True),
        ]
    items, _ = generation_items([chat], tok, chat_template=CHATML)
    # The generation prompt is the training prefix up to the last reply.
    assert tok.decode(items[0].prompt_ids) == ("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello there"
                                               "<|im_end|>\n<|im_start|>user\nBye now<|im_end|>\n<|im_start|>assistant\n")
    assert items[0].references == ("See you",)


def test_chat_without_a_template_names_the_fix(shared_data):
    tok = gpt2_tokenizer(shared_data)
    with pytest.raises(ValueError, match="has no chat template; set data.chat_template"):
        encode_records([Chat((("user", "a"), ("assistant", "b")))], tok, 32)


def test_a_template_that_rewrites_earlier_turns_is_refused(shared_data):
    tok = gpt2_tokenizer(shared_data)
    # Renders only the last message: a conversation's beginning is not the beginning of its rendering.
    template = "{{ messages[-1]['content'] }}{% if add_generation_prompt %}>{% endif %}"
    with pytest.raises(ValueError, match="cannot be located"):
        encode_records([Chat(tuple((m["role"], m["content"]) for m in TWO_TURNS))], tok, 64, chat_template=template)


def _smollm2_tokenizer():
    """SmolLM2's tokenizer from the converted cache, else from the GGUF package; else skip."""
    from transformers import AutoTokenizer

    from splitlora.data import HFTokenizer
    from splitlora.models import NAMED_MODELS, default_cache_dir

    cached = default_cache_dir() / "models" / "smollm2-135m"
    if (cached / "tokenizer_config.json").is_file():
        return HFTokenizer(AutoTokenizer.from_pretrained(str(cached), local_files_only=True))
    spec = NAMED_MODELS["smollm2-135m"]
    if importlib.util.find_spec(spec.module) is None or importlib.util.find_spec("gguf") is None:
        pytest.skip(f"SmolLM2's tokenizer needs `{spec.install}` (or a converted copy in {cached})")
    return HFTokenizer(AutoTokenizer.from_pretrained(str(spec.source_folder()), gguf_file=spec.gguf_file))


def test_chat_mask_with_smollm2s_own_template():
    tok = _smollm2_tokenizer()
    chat = Chat(tuple((m["role"], m["content"]) for m in TWO_TURNS))
    data, _ = encode_records([chat], tok, 128)
    system = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    assert _labelled_and_not(tok, data) == [
        (system + "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", False),
        ("Hello there<|im_end|>\n", True),
        ("<|im_start|>user\nBye now<|im_end|>\n<|im_start|>assistant\n", False),
        ("See you<|im_end|>\n", True),
    ]
    # The ids are the template's own tokenization of the whole conversation.
    whole = tok.hf.apply_chat_template(list(TWO_TURNS), tokenize=True, return_dict=False)
    n = int(data.attention_mask[0].sum())
    assert data.input_ids[0, :n].tolist() == list(whole)
    _, stops = generation_items([chat], tok)
    assert tok.hf.convert_tokens_to_ids("<|im_end|>") in stops


def test_generation_items_group_references_of_one_prompt():
    examples = synthetic_examples(5, seed=1)
    tok = WordTokenizer.from_examples(examples)
    doubled = examples + [examples[0].__class__(examples[0].source, "another reference", examples[0].group)]
    items = generation_items_from_examples(doubled, tok)
    assert [i.key for i in items] == [e.source for e in examples]
    assert items[0].references == (examples[0].target, "another reference")
    assert items[0].prompt_ids == tuple(tok.encode(examples[0].source + " ||"))


# ---------------------------------------------------------------------------------------------
# Loading: natural partitions, held-out evaluation data
# ---------------------------------------------------------------------------------------------

def pc_rows(n, owners="abc"):
    return [{"prompt": f"q{i} ||", "completion": f" answer {i}", "hospital": owners[i % len(owners)]}
            for i in range(n)]


def test_client_key_gives_each_value_one_client(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", pc_rows(30))
    cfg = load_config(None, ["data.source=jsonl", f"data.train_path={path}", "data.client_key=hospital",
                             "train.clients=3", "data.eval_fraction=0.2"])
    sets = load_records(cfg.data, clients=3, seed=0)
    assert sets.client_names == ["a", "b", "c"]
    for name, shard in zip(sets.client_names, sets.shards):
        assert shard and all(sets.train[i].group == name for i in shard)
    assert sorted(i for s in sets.shards for i in s) == list(range(len(sets.train)))
    cfg = load_config(None, ["data.source=jsonl", f"data.train_path={path}", "data.client_key=hospital",
                             "train.clients=4"])
    with pytest.raises(ValueError, match=r"'hospital' has 3 distinct values \('a', 'b', 'c'\).*set train.clients=3"):
        load_records(cfg.data, clients=4, seed=0)


def test_client_paths_give_each_file_one_client(tmp_path):
    paths = [write_jsonl(tmp_path / f"c{c}.jsonl", pc_rows(10 + c)) for c in range(2)]
    cfg = load_config(None, ["data.source=jsonl", f"data.client_paths=[{paths[0]},{paths[1]}]", "train.clients=2",
                             f"data.eval_path={paths[0]}"])
    sets = load_records(cfg.data, clients=2, seed=0)
    assert [len(s) for s in sets.shards] == [10, 11]
    with pytest.raises(ConfigError, match="data.client_paths: 2 files .* train.clients is 3"):
        load_config(None, ["data.source=jsonl", f"data.client_paths=[{paths[0]},{paths[1]}]", "train.clients=3"])


def test_eval_fraction_holds_out_whole_prompts_of_the_users_data(tmp_path, monkeypatch):
    rows = pc_rows(40)
    rows += [{"prompt": "q0 ||", "completion": " second reference", "hospital": "a"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    monkeypatch.setenv("SPLITLORA_DATA", str(tmp_path / "never-read"))
    cfg = load_config(None, ["data.source=jsonl", f"data.train_path={path}", "data.eval_fraction=0.25"])
    sets = load_records(cfg.data, clients=4, seed=0)
    train_prompts = {r.prompt for r in sets.train}
    eval_prompts = {r.prompt for r in sets.eval}
    assert not train_prompts & eval_prompts
    assert len(sets.train) + len(sets.eval) == 41 and 8 <= len(sets.eval) <= 11
    assert any("held out of the training data" in line for line in sets.notes)


def test_file_source_needs_a_train_path():
    with pytest.raises(ConfigError, match="data.train_path: required when data.source is jsonl"):
        load_config(None, ["data.source=jsonl"])


# ---------------------------------------------------------------------------------------------
# End to end: each form trains through `splitlora train`'s build
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("form", ["prompt_completion", "chat", "text"])
def test_each_form_trains(tmp_path, form):
    from splitlora.trainer import train

    examples = synthetic_examples(60, seed=2)
    if form == "prompt_completion":
        rows = [{"context": e.source + " ||", "completion": " " + e.target} for e in examples]
        extra = ["data.prompt_key=context"]
    elif form == "chat":
        rows = [{"messages": [{"role": "user", "content": e.source}, {"role": "assistant", "content": e.target}]}
                for e in examples]
        extra = [f"data.chat_template={json.dumps(CHATML)}"]
    else:
        rows = [{"text": e.source + " = " + e.target} for e in examples]
        extra = []
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    lines = []
    cfg = tiny_config(tmp_path, "data.source=jsonl", f"data.train_path={path}", "eval.generate=true",
                      "data.max_length=128", "model.config.n_positions=128", *extra)
    summary = train(cfg, log=lines.append, progress=False)
    assert any(f"format {form}" in line for line in lines)
    # A random 3-layer model on a word vocabulary of a few hundred tokens starts near ln(V) ~ 6.
    assert 0 < summary["eval_loss"] < 20
    if form == "text":
        assert "bleu" not in summary  # no reference to score against
    else:
        assert 0 <= summary["bleu"] <= 100
        outputs = [json.loads(line) for line in (Path(summary["adapter"]).parent / "generations.jsonl").open()]
        assert outputs and all(o["references"] for o in outputs)


def test_word_vocabulary_of_e2e_records_is_the_examples_one():
    from splitlora.data.records import record_texts

    examples = synthetic_examples(30, seed=5)
    assert WordTokenizer.from_texts(record_texts(examples_to_records(examples))).vocab == \
        WordTokenizer.from_examples(examples).vocab


def test_natural_partition_through_the_trainer_keeps_each_clients_records(tmp_path):
    from splitlora.trainer import build

    examples = synthetic_examples(40, seed=6)
    rows = [{"prompt": e.source + " ||", "completion": " " + e.target, "site": "north" if i % 4 else "south"}
            for i, e in enumerate(examples)]
    rows[1]["completion"] = ""  # skipped: the north client loses one record
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    eval_path = write_jsonl(tmp_path / "e.jsonl", rows[:6])
    lines = []
    cfg = tiny_config(tmp_path, "data.source=jsonl", f"data.train_path={path}", f"data.eval_path={eval_path}",
                      "data.client_key=site", "train.clients=2")
    built = build(cfg, log=lines.append)
    assert "data: natural partition, records per client: north=29, south=10" in lines
    for loader, site in zip(built.setup.loaders, ("north", "south")):
        assert all(built.train_records[int(i)].group == site for i in loader.indices)
    assert any("skipped 1 of 40 training records: 1 empty completion" in line for line in lines)


def test_packing_through_the_trainer_fills_rows_with_whole_records(tmp_path):
    from splitlora.trainer import build

    cfg = tiny_config(tmp_path, "data.packing=true", "data.max_length=96")
    lines = []
    built = build(cfg, log=lines.append)
    rows = sum(len(loader.dataset) for loader in built.setup.loaders)
    assert rows < len(built.train_data)  # several records per row
    assert any(f"packed {len(built.train_data)} training records into {rows} rows" in line for line in lines)
    for loader in built.setup.loaders:
        batch = loader.next_batch()
        assert "position_ids" in batch and int(batch["attention_mask"].sum()) > 0


def test_e2e_without_an_eval_path_holds_out_its_own_lines(shared_data, monkeypatch):
    """Never E2E's test.txt found through SPLITLORA_DATA: a fraction of the named training file."""
    monkeypatch.setenv("SPLITLORA_DATA", str(shared_data))
    train_file = shared_data / "e2e" / "valid.txt"
    cfg = load_config(None, ["data.source=e2e", f"data.train_path={train_file}", "data.eval_fraction=0.05",
                             "data.num_eval=null"])
    sets = load_records(cfg.data, clients=4, seed=0)
    from splitlora.data import read_e2e

    train_sources = {e.source for e in read_e2e(train_file)}
    test_sources = {e.source for e in read_e2e(shared_data / "e2e" / "test.txt")}
    eval_sources = {r.key for r in sets.eval}
    assert eval_sources <= train_sources and not eval_sources & test_sources
    assert not eval_sources & {r.key for r in sets.train}
    assert any("held out of the training data" in line for line in sets.notes)
