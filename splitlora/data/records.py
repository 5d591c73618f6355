"""Record forms: how one row of data becomes token ids, a loss mask and a generation prompt.

Three forms (``data.format``):

- :class:`PromptCompletion`: ``prompt`` then ``completion`` and the tokenizer's eos; loss on the
  completion (and eos) only. Prompt and completion are encoded separately and concatenated, so the
  prompt tokens seen at generation time are exactly the ones seen in training (no BPE merge
  across the boundary). E2E and the synthetic task are this form (prompt ``source + " ||"``).
- :class:`Chat`: a list of ``{role, content}`` messages rendered with the tokenizer's own chat
  template (or ``data.chat_template``); loss on every assistant turn (its content and the
  template's end-of-turn text), none on system or user text. The assistant spans come from
  rendering the conversation up to each assistant turn (with and without it), so any template
  whose renderings of a conversation's prefixes are prefixes of its rendering works; one that is
  not (it rewrites earlier turns) is refused with a message, never trained on with a wrong mask.
- :class:`Text`: plain causal LM loss on every token.

Rows that cannot be trained on (a missing key, an empty completion, a wrong type, a record longer
than ``data.max_length`` with ``data.on_long: skip``) are skipped and counted by reason
(:class:`SkipCounter`), reported in one line at the end of loading.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from tqdm.auto import tqdm

from .dataset import TokenizedDataset, rows_to_dataset
from .e2e import DEFAULT_SEPARATOR, TARGET_PREFIX, Example

__all__ = [
    "RECORD_FORMS", "ON_LONG", "PromptCompletion", "Chat", "Text", "Record", "RecordKeys",
    "SkipCounter", "GenerationItem", "ChatRenderer", "detect_format", "rows_to_records",
    "examples_to_records", "encode_records", "generation_items", "generation_items_from_examples",
    "record_texts",
]

RECORD_FORMS = ("prompt_completion", "chat", "text")
ON_LONG = ("skip", "truncate")
CHAT_ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class PromptCompletion:
    prompt: str
    completion: str
    group: str = ""
    key: Optional[str] = None  # what names the prompt in evaluation outputs (default: the prompt)
    reference: Optional[str] = None  # the reference text for scoring (default: the completion, stripped)


@dataclass(frozen=True)
class Chat:
    messages: Tuple[Tuple[str, str], ...]  # (role, content) pairs
    group: str = ""

    def as_dicts(self) -> List[dict]:
        return [{"role": role, "content": content} for role, content in self.messages]


@dataclass(frozen=True)
class Text:
    text: str
    group: str = ""


Record = Union[PromptCompletion, Chat, Text]


@dataclass(frozen=True)
class RecordKeys:
    """Column names of the three forms (data.prompt_key, ...)."""

    prompt: str = "prompt"
    completion: str = "completion"
    messages: str = "messages"
    text: str = "text"


@dataclass(frozen=True)
class GenerationItem:
    """One prompt to continue at evaluation, with every reference text it has.

    ``key`` names the prompt in outputs and groups references (E2E: the meaning representation);
    ``prompt_ids`` are exactly the token ids that precede the completion in training.
    """

    key: str
    prompt_ids: tuple[int, ...]
    references: tuple[str, ...]


class SkipCounter:
    """Records left out of training, counted by reason, for one summary line."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.total = 0
        self.reasons: Counter = Counter()

    def seen(self, n: int = 1) -> None:
        self.total += n

    def skip(self, reason: str) -> None:
        self.reasons[reason] += 1

    @property
    def skipped(self) -> int:
        return sum(self.reasons.values())

    def summary(self) -> Optional[str]:
        if not self.reasons:
            return None
        parts = ", ".join(f"{n} {reason}" for reason, n in self.reasons.most_common())
        return f"skipped {self.skipped} of {self.total} {self.what} records: {parts}"


# ---------------------------------------------------------------------------------------------
# Rows -> records
# ---------------------------------------------------------------------------------------------

def detect_format(columns: Iterable[str], keys: RecordKeys) -> Tuple[str, str]:
    """(form, why) from a file's column names: messages -> chat, prompt and completion ->
    prompt_completion, text -> text. Raises ValueError listing the columns when none fits."""
    columns = set(columns)
    if keys.messages in columns:
        return "chat", f"column {keys.messages!r}"
    if keys.prompt in columns and keys.completion in columns:
        return "prompt_completion", f"columns {keys.prompt!r} and {keys.completion!r}"
    if keys.text in columns:
        return "text", f"column {keys.text!r}"
    raise ValueError(
        f"data.format: cannot tell the record form from the columns {sorted(columns)}: expected "
        f"{keys.messages!r} (chat), {keys.prompt!r} + {keys.completion!r} (prompt_completion) or "
        f"{keys.text!r} (text); name yours with data.messages_key / data.prompt_key / "
        f"data.completion_key / data.text_key, or set data.format")


def _type_name(value) -> str:
    return "null" if value is None else type(value).__name__


def _string_field(row: Mapping, key: str, what: str, skips: SkipCounter, *, allow_empty=False) -> Optional[str]:
    if key not in row or row[key] is None:
        skips.skip(f"missing {key!r}")
        return None
    value = row[key]
    if not isinstance(value, str):
        skips.skip(f"{key!r} not a string")
        return None
    if not allow_empty and not value.strip():
        skips.skip(f"empty {what}")
        return None
    return value


def _messages(row: Mapping, key: str, skips: SkipCounter) -> Optional[Tuple[Tuple[str, str], ...]]:
    value = row.get(key)
    if value is None:
        skips.skip(f"missing {key!r}")
        return None
    if isinstance(value, str):
        # A CSV cell cannot hold a list: a conversation there is written as JSON text.
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            skips.skip(f"{key!r} a string that is not a JSON list of messages")
            return None
    if not isinstance(value, (list, tuple)) or not value:
        skips.skip(f"{key!r} not a non-empty list of messages")
        return None
    messages = []
    for message in value:
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str) \
                or not isinstance(message.get("content"), str):
            skips.skip("a message without a string 'role' and 'content'")
            return None
        if message["role"] not in CHAT_ROLES:
            skips.skip(f"a message with role {message['role']!r} (expected one of {', '.join(CHAT_ROLES)})")
            return None
        # Only role and content: Arrow fills a field that some other message has (name, ...)
        # with null, which a template would render.
        messages.append((message["role"], message["content"]))
    assistant = [content for role, content in messages if role == "assistant"]
    if not assistant:
        skips.skip("conversation without an assistant turn")
        return None
    if not messages[-1][0] == "assistant" or not messages[-1][1].strip():
        # The last turn is the one evaluation asks for; an empty one teaches nothing.
        skips.skip("conversation not ending with a non-empty assistant turn")
        return None
    return tuple(messages)


def rows_to_records(rows: Sequence[Mapping], form: str, keys: RecordKeys, skips: SkipCounter,
                    groups: Optional[Sequence[str]] = None) -> Tuple[List[Record], List[int]]:
    """The records of the usable rows, and the index of each one's row. Unusable rows are
    counted in `skips`. `groups` (one per row) sets each record's group."""
    if form not in RECORD_FORMS:
        raise ValueError(f"data.format: {form!r} is not a record form; choose one of {', '.join(RECORD_FORMS)}")
    records: List[Record] = []
    kept: List[int] = []
    for index, row in enumerate(rows):
        skips.seen()
        group = "" if groups is None else groups[index]
        if form == "prompt_completion":
            prompt = _string_field(row, keys.prompt, "prompt", skips, allow_empty=True)
            if prompt is None:
                continue
            completion = _string_field(row, keys.completion, "completion", skips)
            if completion is None:
                continue
            record: Record = PromptCompletion(prompt, completion, group)
        elif form == "chat":
            messages = _messages(row, keys.messages, skips)
            if messages is None:
                continue
            record = Chat(messages, group)
        else:
            text = _string_field(row, keys.text, "text", skips)
            if text is None:
                continue
            record = Text(text, group)
        records.append(record)
        kept.append(index)
    return records, kept


def examples_to_records(examples: Sequence[Example], separator: str = DEFAULT_SEPARATOR) -> List[PromptCompletion]:
    """E2E / synthetic examples as prompt/completion records, encoded exactly as `tokenize` does."""
    return [PromptCompletion(e.source + separator, TARGET_PREFIX + e.target, e.group, key=e.source,
                             reference=e.target) for e in examples]


# ---------------------------------------------------------------------------------------------
# Chat templates
# ---------------------------------------------------------------------------------------------

_END_OF_TURN_CANDIDATES = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")


class ChatRenderer:
    """Renders conversations with a tokenizer's chat template, or with `template` (a Jinja string,
    or the path of a file holding one) when given; splits a conversation into labelled spans."""

    def __init__(self, tokenizer, template: Optional[str] = None) -> None:
        self.tokenizer = tokenizer
        if template is not None and "{" not in template:
            path = Path(template)
            if not path.is_file():
                raise ValueError(f"data.chat_template: {template!r} is neither a Jinja template (no '{{') "
                                 f"nor an existing file")
            template = path.read_text(encoding="utf-8")
        hf = getattr(tokenizer, "hf", None)
        if template is None and getattr(hf, "chat_template", None) is None:
            raise ValueError(
                f"data.format chat: the tokenizer ({tokenizer!r}) has no chat template; set "
                f"data.chat_template to a Jinja template string or to a file holding one "
                f"(e.g. a ChatML template)")
        self.template = template

    def render(self, messages: Sequence[Mapping], add_generation_prompt: bool) -> str:
        hf = getattr(self.tokenizer, "hf", None)
        if hf is not None:
            return hf.apply_chat_template(list(messages), tokenize=False, chat_template=self.template,
                                          add_generation_prompt=add_generation_prompt)
        from transformers.utils.chat_template_utils import render_jinja_template

        eos = getattr(self.tokenizer, "EOS", "")
        rendered, _ = render_jinja_template([list(messages)], chat_template=self.template,
                                            add_generation_prompt=add_generation_prompt,
                                            bos_token="", eos_token=eos)
        return rendered[0]

    def spans(self, chat: Chat) -> List[Tuple[str, bool]]:
        """The rendered conversation as consecutive (text, is_assistant) spans."""
        messages = chat.as_dicts()
        full = self.render(messages, add_generation_prompt=False)
        spans: List[Tuple[str, bool]] = []
        position = 0
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self.render(messages[:i], add_generation_prompt=True) if i else ""
            through = self.render(messages[:i + 1], add_generation_prompt=False)
            if not (through.startswith(before) and full.startswith(through) and len(before) >= position):
                raise ValueError(
                    "data.chat_template: the chat template does not render a conversation's first turns "
                    "as the beginning of the whole conversation (it rewrites earlier turns, as some "
                    "templates do with reasoning), so the assistant tokens cannot be located; use a "
                    "template without that, via data.chat_template")
            spans.append((full[position:len(before)], False))
            spans.append((full[len(before):len(through)], True))
            position = len(through)
        if position < len(full):
            spans.append((full[position:], False))
        return [(text, label) for text, label in spans if text]

    def stop_ids(self) -> Tuple[int, ...]:
        """Token ids that end an assistant turn: the tokenizer's eos and the first special token
        after a probe reply (the template's end-of-turn), when the tokenizer has one."""
        stops = {int(self.tokenizer.eos_id)}
        hf = getattr(self.tokenizer, "hf", None)
        if hf is None:
            return tuple(sorted(stops))
        special = set(getattr(hf, "all_special_ids", []) or [])
        vocab = hf.get_vocab()
        special.update(vocab[t] for t in _END_OF_TURN_CANDIDATES if t in vocab)
        probe = Chat((("user", "Hi"), ("assistant", "Hello")))
        reply = next(text for text, label in self.spans(probe) if label)
        after = reply.split("Hello", 1)[-1]
        for token in self.tokenizer.encode(after):
            if token in special:
                stops.add(int(token))
                break
        return tuple(sorted(stops))


# ---------------------------------------------------------------------------------------------
# Records -> token ids and loss masks
# ---------------------------------------------------------------------------------------------

def _encode_spans(tokenizer, spans: Sequence[Tuple[str, bool]]) -> Tuple[List[int], List[bool]]:
    ids: List[int] = []
    mask: List[bool] = []
    for text, label in spans:
        piece = tokenizer.encode(text)
        ids.extend(piece)
        mask.extend([label] * len(piece))
    return ids, mask


def _encode_one(record: Record, tokenizer, renderer: Optional[ChatRenderer]) -> Tuple[List[int], List[bool], int]:
    """(ids, label mask, prompt length): the prompt length is the shortest prefix that must be
    kept whole for the record to make sense (PromptCompletion's prompt), else 0."""
    if isinstance(record, PromptCompletion):
        prompt = tokenizer.encode(record.prompt)
        completion = tokenizer.encode(record.completion) + [tokenizer.eos_id]
        return prompt + completion, [False] * len(prompt) + [True] * len(completion), len(prompt)
    if isinstance(record, Chat):
        ids, mask = _encode_spans(tokenizer, renderer.spans(record))
        return ids, mask, 0
    ids = tokenizer.encode(record.text) + [tokenizer.eos_id]
    return ids, [True] * len(ids), 0


def encode_records(records: Sequence[Record], tokenizer, max_length: int, on_long: str = "truncate", *,
                   chat_template: Optional[str] = None, skips: Optional[SkipCounter] = None
                   ) -> Tuple[TokenizedDataset, List[int]]:
    """Right-padded token tensors of `records`, and the index (into `records`) of each row.

    A record longer than `max_length` is skipped (``on_long="skip"``) or cut to `max_length`
    (``"truncate"``: a prompt is kept whole and the completion cut; it counts in
    ``num_truncated``). A record with no label token left within `max_length` (a prompt as
    long as max_length) is skipped either way. Skips are counted in `skips`.
    """
    if on_long not in ON_LONG:
        raise ValueError(f"data.on_long: {on_long!r} is not allowed; choose one of {', '.join(ON_LONG)}")
    if not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an int >= 2, got {max_length!r}")
    skips = skips if skips is not None else SkipCounter("")
    renderer = None
    if any(isinstance(r, Chat) for r in records):
        renderer = ChatRenderer(tokenizer, chat_template)
    rows: List[Tuple[List[int], List[bool]]] = []
    kept: List[int] = []
    truncated: List[bool] = []
    progress = tqdm(records, desc=f"tokenizing {skips.what} records".replace("  ", " "), unit="record",
                    disable=None if len(records) > 5000 else True, leave=False)
    for index, record in enumerate(progress):
        ids, mask, prompt_len = _encode_one(record, tokenizer, renderer)
        cut = len(ids) > max_length
        if cut and on_long == "skip":
            skips.skip(f"longer than data.max_length={max_length}")
            continue
        if prompt_len + 1 > max_length or not any(mask[:max_length]):
            skips.skip(f"no completion token within data.max_length={max_length}")
            continue
        rows.append((ids[:max_length], mask[:max_length]))
        truncated.append(cut)
        kept.append(index)
    if not rows:
        raise ValueError(f"no record could be encoded ({skips.summary() or 'none given'}); check the data "
                         f"and data.max_length={max_length}")
    return rows_to_dataset(rows, truncated, tokenizer.pad_id), kept


# ---------------------------------------------------------------------------------------------
# Generation prompts for evaluation
# ---------------------------------------------------------------------------------------------

def generation_items(records: Sequence[Record], tokenizer, *, chat_template: Optional[str] = None
                     ) -> Tuple[List[GenerationItem], Tuple[int, ...]]:
    """(items, stop ids): one item per distinct prompt, in order of first appearance, with the
    references of every record that has that prompt (several references per prompt are grouped,
    as E2E's are). Text records have no reference and give none. The stop ids end a hypothesis
    (the eos, and a chat template's end-of-turn token)."""
    renderer = ChatRenderer(tokenizer, chat_template) if any(isinstance(r, Chat) for r in records) else None
    prompts: dict = {}
    references: dict = {}
    for record in records:
        if isinstance(record, PromptCompletion):
            key = record.key if record.key is not None else record.prompt
            if key not in prompts:
                prompts[key] = tuple(tokenizer.encode(record.prompt))
            reference = record.reference if record.reference is not None else record.completion.strip()
        elif isinstance(record, Chat):
            spans = renderer.spans(record)
            last = max(i for i, (_, label) in enumerate(spans) if label)
            key = "".join(text for text, _ in spans[:last])
            if key not in prompts:
                prompts[key] = tuple(_encode_spans(tokenizer, spans[:last])[0])
            reference = record.messages[-1][1].strip()
        else:
            continue
        references.setdefault(key, []).append(reference)
    items = [GenerationItem(key, prompts[key], tuple(refs)) for key, refs in references.items()]
    stops = renderer.stop_ids() if renderer is not None else (int(tokenizer.eos_id),)
    return items, stops


def generation_items_from_examples(examples: Sequence[Example], tokenizer,
                                   separator: str = DEFAULT_SEPARATOR) -> list[GenerationItem]:
    """One item per distinct source, in order of first appearance, with all its targets as
    references; the prompt is ``source + separator`` encoded as in training."""
    return generation_items(examples_to_records(examples, separator), tokenizer)[0]


def record_texts(records: Iterable[Record], chat_template: Optional[str] = None) -> List[str]:
    """Every text a word tokenizer built from the data must cover (chat: the rendered text)."""
    texts: List[str] = []
    renderer = None
    for record in records:
        if isinstance(record, PromptCompletion):
            if record.key is not None and record.reference is not None:
                # An E2E / synthetic example: its source and target, as WordTokenizer.from_examples
                # takes them, so the vocabulary (and a config-built model's size) stays what it was.
                texts.extend((record.key, record.reference))
            else:
                texts.extend((record.prompt, record.completion))
        elif isinstance(record, Text):
            texts.append(record.text)
        else:
            if renderer is None:
                renderer = ChatRenderer(_TemplateOnly(), chat_template)
            texts.extend(text for text, _ in renderer.spans(record))
    return texts


class _TemplateOnly:
    """Stands in for a tokenizer while the word vocabulary is built from rendered chats."""

    EOS = "<eos>"
    eos_id = 1

    def __repr__(self) -> str:
        return "the word tokenizer built from the data"
