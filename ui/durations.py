"""Each GPU call's ZeroGPU reservation, from the work it will do (utils/core/gpu_budget.py): the prompt tokens
counted with the loaded tokenizer, in the server process, when spaces.GPU asks for the duration. Every function
takes the same arguments as the GPU call it sizes (spaces.GPU calls it so)."""

import logging

from utils.core.gpu_budget import Work, generation, scoring
from utils.core.row_prompts import prompt_length

log = logging.getLogger("lora_lens")

LENS_TOKENS = 256  # tokens of each text the token lens scores (utils/analysis/token_lens.py)
# the token lens across panes reads every pane's text under every pane's model (and the base): at most this many
# tokens in all, else it is left out with a notice (a long prompt times 42 rows would spend a visitor's quota)
PANE_LENS_TOKENS = 32_768
EVAL_BATCH = 8  # catalog items per batch of an evaluation (each item one row per pane)
OWN_DATA_BATCH = 8  # your own examples per batch (utils/task/own_data.py: CHUNK)
ANATOMY_S = 10  # GPU seconds of the adapter anatomy beyond a worker's start (SVDs of r x r products)


def pane_lens_tokens(prompt_tokens: int, rows: int, max_new_tokens: int) -> int:
    """Tokens the token lens across `rows` panes reads at most: every text under every model and the base."""
    return (prompt_tokens + min(max_new_tokens, LENS_TOKENS)) * rows * (rows + 1)


def pane_lens_too_long(backend, prompt: str, rows, max_new_tokens: int) -> str | None:
    """Why the token lens across these panes' rows would read too much with this prompt (over
    PANE_LENS_TOKENS), or None where it fits."""
    prompt_tokens = prompt_length(backend, prompt, rows, max_new_tokens)
    if pane_lens_tokens(prompt_tokens, len(rows), max_new_tokens) <= PANE_LENS_TOKENS:
        return None
    n = len(rows)
    return f"{n} texts under {n} models would read more than {PANE_LENS_TOKENS:,} tokens with this prompt"


class Durations:
    """The durations of a Lens's GPU calls, under its budget (read when asked: tests and measurement change it)."""

    def __init__(self, lens):
        self.lens = lens

    def generation(self, prompt, rows, settings, after=None) -> int:
        """One batch over the prompt, then what `after` asks for (ui/lens.py: After)."""
        n = prompt_length(self.lens.backend, prompt, rows, settings.max_new_tokens)
        work = generation(n, len(rows), settings.max_new_tokens)
        if after is not None and after.price_scan:
            work += scoring(n, len(rows))
        if after is not None and after.lens_strength is not None:  # every pane's text under two models
            work += scoring(n + min(settings.max_new_tokens, LENS_TOKENS), 2 * len(rows))
        if after is not None and after.score_under_rows is not None:
            work += scoring(n + settings.max_new_tokens, len(rows))
        if after is not None and after.pane_pair is not None:  # every pane's text under every pane's model
            work += scoring(pane_lens_tokens(n, len(rows), settings.max_new_tokens), 1)
        return self._reserve("generation", work)

    def catalog_works(self, items, panes) -> list[Work]:
        """Per evaluation batch of EVAL_BATCH items: every prompt once per pane, the answer's few tokens."""
        from utils.task.evaluate import MAX_NEW_TOKENS
        from utils.task.pricing import build_prompt

        tokens = [
            len(
                self.lens.backend.encode(
                    build_prompt(item.description, self.lens.profile.task_prompt), MAX_NEW_TOKENS
                )[0]
            )
            for item in items
        ]
        return [
            Work(prefill_tokens=sum(tokens[i : i + EVAL_BATCH]) * len(panes), steps=MAX_NEW_TOKENS)
            for i in range(0, len(items), EVAL_BATCH)
        ]

    def evaluation(self, items, panes) -> int:
        return self._reserve("evaluation", sum(self.catalog_works(items, panes), Work()))

    def own_data_works(self, examples, max_new_tokens) -> list[Work]:
        """Per batch of OWN_DATA_BATCH examples: the greedy answers (both rows in one generate()) and each
        reference teacher-forced (two rows)."""
        tokens = [len(self.lens.backend.encode(e.prompt + e.answer, 1)[0]) for e in examples]
        return [
            Work(prefill_tokens=4 * sum(tokens[i : i + OWN_DATA_BATCH]), steps=max_new_tokens)
            for i in range(0, len(examples), OWN_DATA_BATCH)
        ]

    def forgetting_works(self, passages, models) -> list[Work]:
        """Per batch of passages: each passage read once per model, nothing generated."""
        from utils.task.forgetting import BATCH_PASSAGES

        return [
            scoring(sum(len(p.token_ids) for p in passages[i : i + BATCH_PASSAGES]), len(models))
            for i in range(0, len(passages), BATCH_PASSAGES)
        ]

    def forgetting(self, passages, models) -> int:
        return self._reserve("forgetting", sum(self.forgetting_works(passages, models), Work()))

    def own_data(self, examples, max_new_tokens) -> int:
        return self._reserve("own data", sum(self.own_data_works(examples, max_new_tokens), Work()))

    def anatomy(self, *_names) -> int:
        """The anatomy of one adapter, or two compared (the adapters' names do not change the work)."""
        return self._reserve("anatomy", Work(), ANATOMY_S)

    def _reserve(self, what: str, work: Work, extra_s: float = 0) -> int:
        budget = self.lens.budget
        seconds = budget.seconds(work, extra_s)
        log.info("ZeroGPU %s call: %d s reserved for %s (%s)", what, seconds, work, budget.figures())
        return seconds
