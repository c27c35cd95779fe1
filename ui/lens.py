"""The Lens: what every tab needs of the one loaded model — the engine, the profile, and the engine's calls
wrapped for ZeroGPU (on a ZeroGPU Space they run in a GPU worker for a reserved time; elsewhere spaces.GPU
returns them unchanged)."""

import spaces

from ui.common import evaluation_seconds, gpu_seconds, warn_all
from utils import views
from utils.engine import Engine, GenerationSettings, Row
from utils.errors import InputError
from utils.profiles import LLAMA31_PRICER

LENS_SECONDS = 30  # ZeroGPU reservation for one teacher-forced scoring pass


def _rows_duration(prompt, rows, settings=None, stop_event=None) -> int:
    """spaces.GPU's duration for Engine.stream_rows / run_rows, called with the same arguments as they are."""
    return gpu_seconds(settings.max_new_tokens if settings else 64, len(rows))


def _evaluation_duration(items, progress=None, strengths=()) -> int:
    return evaluation_seconds(len(items), 2 + len(strengths))


class Lens:
    """The one Engine and what the tabs share of it. Tabs hold a Lens; none holds the model itself."""

    def __init__(self, pair_or_engine):
        self.engine = pair_or_engine if isinstance(pair_or_engine, Engine) else Engine(pair_or_engine)
        self.pair = self.engine.pair
        self.profile = self.pair.profile
        self.tokenizer = self.engine.tokenizer
        self.config = self.pair.model.config
        self.adapter_lora = views.adapter_lora(self.pair.adapter_dir, self.profile.lora)
        self.loaded_name = f"Loaded: {self.profile.name}"
        self.show_reference = self.profile.name != LLAMA31_PRICER.name
        self.stream_rows = spaces.GPU(duration=_rows_duration)(self.engine.stream_rows)
        self.run_rows = spaces.GPU(duration=_rows_duration)(self.engine.run_rows)
        self.next_tokens = spaces.GPU(duration=20)(self.engine.next_token_views_rows)
        self.forward_rows = spaces.GPU(duration=LENS_SECONDS)(self.engine.forward_rows)
        self.evaluate_items = spaces.GPU(duration=_evaluation_duration)(self._evaluate_locked)

    @property
    def has_adapter(self) -> bool:
        return self.engine.has_adapter

    def require_pricer(self, what: str) -> None:
        if not self.profile.is_pricer:
            raise InputError(
                f"{what} needs a pricer profile (one with a task prompt); {self.profile.name} has none."
            )

    def require_adapter(self, what: str) -> None:
        if not self.has_adapter:
            raise InputError(f"{what} needs the adapter, but none is loaded (base-only).")

    def both_or_base(self) -> str:
        return "both" if self.has_adapter else "base"

    def finished_run(self, prompt: str, rows: list[Row], settings: GenerationSettings, notices=()):
        """run_rows with its notices (a clamped setting, a prompt cut to fit the context) shown as warnings."""
        result = self.run_rows(prompt, rows, settings)
        warn_all((*notices, *result.notices))
        return result

    def prices(self, prompt: str, texts: dict[str, str], rows: list[Row]) -> tuple[dict, dict]:
        """The next-token views after the prompt and the price read from each row's text, keyed by row."""
        next_views = self.next_tokens(prompt, rows, views.CHART_TOKENS)
        labels = {row.key: row.label for row in rows}
        return next_views, views.price_estimates(texts, next_views, self.tokenizer, views.TOPK, labels)

    def _evaluate_locked(self, items, progress=None, strengths=()):
        from utils.evaluate import evaluate_items

        with self.engine.exclusive():
            return evaluate_items(
                self.pair.model,
                self.tokenizer,
                items,
                batch_size=8,
                progress=progress,
                template=self.profile.task_prompt,
                strengths=strengths,
            )
