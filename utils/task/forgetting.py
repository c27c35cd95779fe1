"""What the fine-tune forgot: a fixed sample of general text scored under the base and under the fine-tune (and
any other strengths or adapters), teacher-forced, as peft's forgetting metric does (cross-entropy on general
text before and after training).

The sample is real prose not written by this project: Natsume Soseki's novel *Botchan*, in the 1919 English
translation by Yasotaro Morri, Project Gutenberg eBook #8868 (public domain; the file keeps Project
Gutenberg's header and licence). It is the text the sentencepiece package's source distribution ships as its
test data (sentencepiece 0.2.3, `test/botchan.txt`), copied unchanged into `data/general-text/`. The body
between Project Gutenberg's START and END lines is cut into passages of PASSAGE_TOKENS tokens at line ends;
the sample is the first SAMPLE_PASSAGES of them (over 20,000 tokens with SmolLM2's and Llama 3.1's
tokenizers). Each passage is one row per model of a teacher-forced batch: every token after the first is
scored given the ones before it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from utils.core.errors import InputError
from utils.core.profiles import REPO_ROOT
from utils.core.seam import Backend, Use

SAMPLE_FILE = REPO_ROOT / "data" / "general-text" / "botchan.txt"
SAMPLE_SOURCE = (
    "Natsume Soseki, Botchan (Master Darling), tr. Yasotaro Morri (1919); Project Gutenberg eBook #8868, "
    "public domain; as shipped in sentencepiece 0.2.3's source (test/botchan.txt)"
)
PASSAGE_TOKENS = 256  # tokens per passage at most (cut at a line end)
SAMPLE_PASSAGES = 96  # the sample: the first passages of the book
BATCH_PASSAGES = 4  # passages per teacher-forced batch (each one row per model)


@dataclass(frozen=True)
class Passage:
    index: int
    token_ids: list[int]
    text: str


@dataclass
class PassageScore:
    """One passage under every model: log-probability of each token after the first."""

    passage: Passage
    logprobs: dict[str, list[float]]  # model -> per token (len(token_ids) - 1 values)
    kl: dict[str, list[float]]  # model -> KL(model || base) per position

    def cross_entropy(self, model: str) -> float:
        values = self.logprobs[model]
        return -math.fsum(values) / len(values)


@dataclass
class ForgettingReport:
    models: dict[str, Use]  # model name -> what runs it ("base" first)
    passages: list[PassageScore]
    seconds: float
    totals: dict[str, dict[str, float]] = field(default_factory=dict)

    def most_forgotten(self, model: str, n: int = 5) -> list[tuple[PassageScore, float]]:
        """The passages whose cross-entropy rose most under `model` against the base."""
        rises = [(p, p.cross_entropy(model) - p.cross_entropy("base")) for p in self.passages]
        return sorted(rises, key=lambda x: -x[1])[:n]


def sample_text() -> str:
    """The book's body, between Project Gutenberg's START and END lines."""
    try:
        text = SAMPLE_FILE.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise InputError(
            f"The general-text sample {SAMPLE_FILE.name} is missing from data/general-text."
        ) from exc
    start = text.index("\n", text.index("*** START OF THIS PROJECT GUTENBERG EBOOK")) + 1
    end = text.index("*** END OF THIS PROJECT GUTENBERG EBOOK")
    return text[start:end]


def load_passages(backend: Backend, n: int = SAMPLE_PASSAGES) -> list[Passage]:
    """The first n passages of the sample, each at most PASSAGE_TOKENS tokens, cut at line ends (a line longer
    than a passage is cut at PASSAGE_TOKENS)."""
    passages, current, lines = [], [], []
    for line in sample_text().splitlines(keepends=True):
        ids = backend.encode(line, 1)[0]
        if current and len(current) + len(ids) > PASSAGE_TOKENS:
            passages.append(Passage(len(passages), current, "".join(lines)))
            current, lines = [], []
            if len(passages) == n:
                return passages
        current = current + ids[: PASSAGE_TOKENS - len(current)]
        lines.append(line)
    if current and len(passages) < n:
        passages.append(Passage(len(passages), current, "".join(lines)))
    return passages


def check_passages(n_passages) -> int:
    from utils.core.inputs import parse_number, require_range

    n = parse_number("n_passages", n_passages, integer=True)
    require_range("n_passages", n, (1, SAMPLE_PASSAGES))
    return int(n)


def score_passages(
    backend: Backend, passages: Sequence[Passage], models: dict[str, Use]
) -> Iterator[list[PassageScore]]:
    """Batches of BATCH_PASSAGES passages, each passage a row per model, KL of each model against the base."""
    names = list(models)
    base = names.index("base")
    for start in range(0, len(passages), BATCH_PASSAGES):
        chunk = passages[start : start + BATCH_PASSAGES]
        sequences = [p.token_ids for p in chunk for _ in names]
        uses = [models[name] for _ in chunk for name in names]
        pairs = [
            (i * len(names) + m, i * len(names) + base)
            for i in range(len(chunk))
            for m in range(len(names))
            if m != base
        ]
        scores = backend.score_rows(sequences, uses, 0, 0, pairs)
        out = []
        for i, passage in enumerate(chunk):
            rows = {name: i * len(names) + m for m, name in enumerate(names)}
            out.append(
                PassageScore(
                    passage,
                    {name: scores.rows[row].logprobs for name, row in rows.items()},
                    {
                        name: scores.kl[(row, rows["base"])]
                        if name != "base"
                        else [0.0] * (len(passage.token_ids) - 1)
                        for name, row in rows.items()
                    },
                )
            )
        yield out


def build_report(scored: list[PassageScore], models: dict[str, Use], seconds: float) -> ForgettingReport:
    """Per model: mean cross-entropy per token over all passages, its perplexity, the change against the base."""
    report = ForgettingReport(models, scored, seconds)
    tokens = sum(len(p.logprobs["base"]) for p in scored)
    base_ce = -math.fsum(v for p in scored for v in p.logprobs["base"]) / tokens
    for name in models:
        ce = -math.fsum(v for p in scored for v in p.logprobs[name]) / tokens
        kl = [v for p in scored for v in p.kl[name]]
        report.totals[name] = {
            "cross_entropy": ce,
            "perplexity": math.exp(ce),
            "change_vs_base": ce - base_ce,
            "perplexity_ratio_vs_base": math.exp(ce - base_ce),
            "mean_kl_vs_base": math.fsum(kl) / len(kl) if kl else 0.0,
            "tokens": tokens,
        }
    return report
