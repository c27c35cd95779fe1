"""The token lens: after a comparison, every token of both panes coloured by how much more likely the
fine-tune found it than the base, with both models' top next tokens on hover, the KL along each text and the
totals; plus /token_lens. The scores come from the comparison's own GPU call (ui/lens.py: After)."""

import gradio as gr

from ui.common import TABLE, user_errors
from ui.durations import pane_lens_too_long
from ui.lens import After, Lens
from ui.prompt_format import PromptFormats
from ui.views.lens import LENS_CSS, kl_figure, lens_html, lens_json, summary_markdown
from utils.core import inputs
from utils.core.errors import InputError
from utils.core.seam import BASE, FINE_TUNED, PANE_LABELS, GenerationSettings


class TokenLens:
    def __init__(self, lens: Lens):
        self.lens = lens
        self.formats = PromptFormats(lens)

    def _require(self) -> None:
        if not self.lens.has_adapter:
            raise InputError(
                "The token lens scores each text under the base and the fine-tune, but no adapter is loaded "
                "(base-only): there is no fine-tune to compare with."
            )

    @user_errors
    def token_lens(
        self,
        prompt: str,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
        panes: list | None = None,
        pair: list | None = None,
        prompt_format: str | dict | None = None,
        base_format: str | dict | None = None,
    ) -> dict:
        """Generate both panes (as /compare does), then score every token of each under both models; or any
        set of panes, each text under every pane's model.

        Args:
            prompt: the text to continue
            max_new_tokens: tokens per pane, 1-512 (larger values are clamped); the first 256 are scored
            temperature: 0 for greedy decoding (deterministic), up to 2 to sample
            top_p: nucleus sampling mass, 0.01-1
            seed: seeds the sampler, 0 to 4294967295
            panes: null for base and fine-tuned; else 2 to 6 panes as /compare takes them, [{"adapter": name or
                null, "strength": s}, ...]
            pair: with panes, the two panes compared token by token, as 1-based positions [a, b] (default: the
                last and the first)
            prompt_format: what each model is given, as /compare takes it; each model reads every text after
                its own pane's prompt
            base_format: the base pane's own format (without panes), as /compare takes it
        Returns:
            token_lens: {"panes": {"base" | "fine_tuned": {"text", "tokens": [{"token", "token_id",
            "logprob_base", "logprob_fine_tuned", "kl", "top_base": [[token, probability], ...],
            "top_fine_tuned": [...]}], "logprob_base", "logprob_fine_tuned", "perplexity_base",
            "perplexity_fine_tuned", "cut_from"}}}. logprob_* are natural-log probabilities of each token
            given everything before it (the pane totals are their sums); kl is KL(fine-tuned || base) of the
            next-token distributions at that position, in nats; cut_from is the text's token count when only
            the first 256 were scored, else null. With panes: {"panes": [{"label", "text", "cut_from",
            "logprob_under": {model label: log p of the text}, "tokens": [{"token", "token_id", "logprob_under":
            {model label: float}, "kl_vs_base": {model label: KL(model || base) at that position}}]}],
            "kl_vs_base": {model label: mean KL per token}, "pair": {"a", "b", "kl_a_b"}}
        """
        settings, notices = GenerationSettings.checked(max_new_tokens, temperature, top_p, seed)
        self._require()
        rows, formats = self.formats.rows_and_formats(prompt_format, base_format, panes)
        rows, rendered = self.formats.apply(prompt, rows, formats, settings.max_new_tokens)
        notices = [*notices, *self.formats.warnings(rendered)]
        if panes is not None:
            return self._pane_lens(prompt, rows, pair, settings, notices)
        _, after = self.lens.finished_run(prompt, rows, settings, notices, After(lens_strength=1.0))
        return lens_json(after.scored)

    def _pane_lens(self, prompt, rows, pair, settings, notices) -> dict:
        from utils.analysis.pane_lens import lens_json as pane_lens_json

        if len(rows) < 2:
            raise InputError("The token lens compares models: give at least two panes.")
        if pair is None:
            chosen = (rows[-1].key, rows[0].key)
        else:
            if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                raise InputError("pair must be two pane positions, such as [3, 1].")
            index = [inputs.parse_number("pair", p, integer=True) - 1 for p in pair]
            if not all(0 <= i < len(rows) for i in index) or index[0] == index[1]:
                raise InputError(f"pair must be two different pane positions from 1 to {len(rows)}.")
            chosen = (rows[index[0]].key, rows[index[1]].key)
        too_long = pane_lens_too_long(self.lens.backend, prompt, rows, settings.max_new_tokens)
        if too_long:
            raise InputError(f"{too_long}; shorten the prompt, lower max_new_tokens or use fewer panes.")
        _, after = self.lens.finished_run(prompt, rows, settings, notices, After(pane_pair=chosen))
        return pane_lens_json(after.pane_lens)


def lens_outputs(scored: dict, rows) -> tuple:
    """The lens section's values (in layout()'s order) for a finished comparison's scores."""
    labels = {k: PANE_LABELS[k] for k in (BASE, FINE_TUNED)} | {row.key: row.label for row in rows}
    return (
        gr.Column(visible=True),
        lens_html(scored, labels),
        summary_markdown(scored, labels),
        kl_figure(scored, labels),
    )


def layout(tab: TokenLens) -> dict:
    """The lens section under the Compare panes; returns its outputs, in the order lens_outputs fills them."""
    with gr.Column(visible=False) as column:
        gr.Markdown(
            "### Token lens: where the two models disagree\n"
            "Both texts scored by both models (teacher-forced, one batch of four rows). Colour: "
            "log p<sub>fine-tuned</sub>(token) − log p<sub>base</sub>(token)."
            if tab.lens.has_adapter
            else "### Token lens\nNot available: no adapter is loaded (base-only)."
        )
        if not tab.lens.info.exact_kl:
            gr.Markdown(
                f"KL here is approximate: {tab.lens.info.name} returns only its top "
                f"{tab.lens.info.max_top_k} log-probabilities per token, so KL is taken over the tokens both "
                "models list plus one bucket for the rest. That is a lower bound: it misses the rest's share of "
                "the probability times the KL inside it (the README's Serving from vLLM).",
                elem_id="lens-kl-approximate",
            )
        html = gr.HTML(css_template=LENS_CSS, elem_id="lens-token-lens")
        summary = gr.Markdown(elem_id="lens-token-summary", elem_classes=TABLE)
        plot = gr.Plot(show_label=False, elem_id="lens-token-kl")
    return {"outputs": [column, html, summary, plot]}
