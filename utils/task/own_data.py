"""Evaluate on your own data: a small JSONL or CSV of `prompt` and reference `answer`, through base and fine-tune.

Works for any task, not only prices. Per item: each model's greedy answer (both rows of one batch through
`Backend.evaluate_chunk`), whether it equals or contains the reference (after folding case and white space),
and the log-probability of the reference answer under each model, teacher-forced (`Backend.score_rows`, the
token lens's machinery), the answer's tokens split from the prompt's as lm-evaluation-harness does (encode
prompt + answer, keep what follows the prompt's own encoding). Totals per model, and the items that flip.

The file is read as text and parsed with json / csv only: never executed, never stored (the caller deletes the
upload once read), capped in bytes, items and characters.
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field

from utils.core.errors import InputError
from utils.core.seam import BASE, FINE_TUNED, Backend

MAX_FILE_BYTES = 1_000_000  # an upload larger than this is refused before it is parsed
MAX_ITEMS = 200
MAX_PROMPT_CHARS = 4_000
MAX_ANSWER_CHARS = 1_000
CHUNK = 8  # items per batch (two rows each: base and fine-tune)
MODELS = {BASE: 0.0, FINE_TUNED: 1.0}  # the two rows of every item, by adapter strength


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str


@dataclass(frozen=True)
class ModelAnswer:
    """One model on one item."""

    text: str  # its greedy answer
    exact: bool  # equals the reference, case and white space folded
    contains: bool  # holds the reference somewhere, case and white space folded
    logprob_answer: float  # log p(reference answer | prompt), natural log, summed over its tokens


@dataclass
class ItemScore:
    example: Example
    answer_tokens: int
    models: dict[str, ModelAnswer]

    @property
    def logprob_gain(self) -> float:
        """How much more likely the fine-tune finds the reference than the base (nats; > 0: more likely)."""
        return self.models[FINE_TUNED].logprob_answer - self.models[BASE].logprob_answer


@dataclass
class OwnDataReport:
    items: list[ItemScore]
    seconds: float
    max_new_tokens: int
    totals: dict[str, dict[str, float]] = field(default_factory=dict)

    def flips(self) -> dict[str, list[int]]:
        """Items (by index) where "contains the reference" changed: fixed by the fine-tune, or broken by it."""
        fixed = [
            i
            for i, s in enumerate(self.items)
            if s.models[FINE_TUNED].contains and not s.models[BASE].contains
        ]
        broken = [
            i
            for i, s in enumerate(self.items)
            if s.models[BASE].contains and not s.models[FINE_TUNED].contains
        ]
        return {"fixed": fixed, "broken": broken}


def fold(text: str) -> str:
    """Case and white space folded, for comparing answers. Example: fold("  Paris\\n") == "paris" """
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def parse_examples(data: bytes, name: str = "") -> list[Example]:
    """Examples from the bytes of a JSONL file (one {"prompt": ..., "answer": ...} object a line) or a CSV file
    with a header row naming `prompt` and `answer` columns; the format is taken from the name, else sniffed.

    Example: parse_examples(b'{"prompt": "2+2=", "answer": "4"}') -> [Example("2+2=", "4")]
    """
    if not isinstance(data, (bytes, bytearray)):
        raise InputError("The data must be a file (JSONL or CSV).")
    if len(data) > MAX_FILE_BYTES:
        raise InputError(f"The file has {len(data):,} bytes; at most {MAX_FILE_BYTES:,} are read.")
    try:
        text = bytes(data).decode("utf-8-sig")
    except UnicodeDecodeError:
        raise InputError("The file is not UTF-8 text: save it as UTF-8 JSONL or CSV.") from None
    if not text.strip():
        raise InputError("The file is empty: give one prompt and answer per line (JSONL) or row (CSV).")
    lowered = name.lower()
    is_csv = lowered.endswith(".csv") or (
        not lowered.endswith((".jsonl", ".json")) and not text.lstrip().startswith("{")
    )
    rows = _csv_rows(text) if is_csv else _jsonl_rows(text)
    examples = [_example(row, where) for where, row in rows]
    if not examples:
        raise InputError(
            "The file holds no examples: give one prompt and answer per line (JSONL) or row (CSV)."
        )
    if len(examples) > MAX_ITEMS:
        raise InputError(
            f"The file holds {len(examples)} examples; at most {MAX_ITEMS} are evaluated at once."
        )
    return examples


def _jsonl_rows(text: str) -> Iterator[tuple[str, object]]:
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield f"line {number}", json.loads(line)
        except ValueError:
            raise InputError(
                f'Line {number} is not a JSON object: write {{"prompt": "...", "answer": "..."}} on each line.'
            ) from None


def _csv_rows(text: str) -> Iterator[tuple[str, object]]:
    reader = csv.DictReader(io.StringIO(text))
    fields = [f.strip().lower() for f in reader.fieldnames or []]
    if "prompt" not in fields or "answer" not in fields:
        raise InputError("The CSV needs a header row with the columns prompt and answer.")
    reader.fieldnames = fields
    try:
        for number, row in enumerate(reader, start=2):
            yield f"row {number}", row
    except csv.Error as exc:
        raise InputError(f"The CSV could not be read: {exc}.") from None


def _example(row, where: str) -> Example:
    if not isinstance(row, dict):
        raise InputError(f'{where.capitalize()} is not an object with "prompt" and "answer".')
    prompt, answer = row.get("prompt"), row.get("answer")
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError(f"{where.capitalize()}: prompt is missing or empty.")
    if not isinstance(answer, str) or not answer.strip():
        raise InputError(f"{where.capitalize()}: answer is missing or empty (it must be text).")
    if len(prompt) > MAX_PROMPT_CHARS or len(answer) > MAX_ANSWER_CHARS:
        raise InputError(
            f"{where.capitalize()} is too long: prompts up to {MAX_PROMPT_CHARS:,} characters, answers up to "
            f"{MAX_ANSWER_CHARS:,}."
        )
    kept = "".join(c for c in prompt if c in "\n\t" or unicodedata.category(c) not in ("Cc", "Cs"))
    return Example(kept, answer)


def answer_ids(backend: Backend, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids): the answer's tokens are what prompt + answer encodes to after the prompt's own
    encoding (lm-evaluation-harness's split), so the score is that of the text as the model would read it."""
    prompt_ids, _ = backend.encode(prompt, 1)
    whole, _ = backend.encode(prompt + answer, 1)
    return prompt_ids, whole[len(prompt_ids) :]


def evaluation_steps(
    backend: Backend, examples: list[Example], max_new_tokens: int = 32
) -> Iterator[tuple[int, int] | OwnDataReport]:
    """(done, total) after each chunk, then the report (a generator, so progress can cross a process boundary)."""
    _require_adapter(backend)
    started = time.perf_counter()
    scored: list[ItemScore] = []
    for start in range(0, len(examples), CHUNK):
        scored += score_examples(backend, examples[start : start + CHUNK], max_new_tokens)
        yield len(scored), len(examples)
    yield build_report(scored, time.perf_counter() - started, max_new_tokens)


def score_examples(backend: Backend, chunk: list[Example], max_new_tokens: int = 32) -> list[ItemScore]:
    """One chunk of examples: greedy answers of both models in one batch, and the reference's log-probability."""
    _require_adapter(backend)
    answers = backend.evaluate_chunk([e.prompt for e in chunk], list(MODELS.values()), max_new_tokens, 1)
    logprobs, lengths = _reference_logprobs(backend, chunk)
    scored = []
    for i, example in enumerate(chunk):
        models = {}
        for m, key in enumerate(MODELS):
            text = answers[m][i].text
            models[key] = ModelAnswer(
                text=text,
                exact=fold(text) == fold(example.answer),
                contains=fold(example.answer) in fold(text),
                logprob_answer=logprobs[i][m],
            )
        scored.append(ItemScore(example, lengths[i], models))
    return scored


def _require_adapter(backend: Backend) -> None:
    if not backend.has_adapter:
        raise InputError(
            "Evaluating your data compares base and fine-tune, but no adapter is loaded (base-only)."
        )


def build_report(scored: list[ItemScore], seconds: float, max_new_tokens: int) -> OwnDataReport:
    report = OwnDataReport(scored, seconds, max_new_tokens)
    report.totals = _totals(scored)
    return report


def _reference_logprobs(backend: Backend, chunk: list[Example]) -> tuple[list[list[float]], list[int]]:
    """log p(answer | prompt) of every example under each model: one teacher-forced batch per example."""
    out, lengths = [], []
    for example in chunk:
        prompt_ids, ids = answer_ids(backend, example.prompt, example.answer)
        lengths.append(len(ids))
        if not ids:
            out.append([0.0] * len(MODELS))
            continue
        scores = backend.score_rows(
            [prompt_ids + ids] * len(MODELS), list(MODELS.values()), len(prompt_ids) - 1
        )
        out.append([math.fsum(row.logprobs) for row in scores.rows])
    return out, lengths


def _totals(items: list[ItemScore]) -> dict[str, dict[str, float]]:
    n = len(items)
    tokens = sum(s.answer_tokens for s in items) or 1
    return {
        key: {
            "exact_match": sum(s.models[key].exact for s in items) / n,
            "contains": sum(s.models[key].contains for s in items) / n,
            "mean_logprob_answer": math.fsum(s.models[key].logprob_answer for s in items) / n,
            "logprob_per_answer_token": math.fsum(s.models[key].logprob_answer for s in items) / tokens,
        }
        for key in MODELS
    }
