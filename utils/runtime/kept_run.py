"""A generation kept for the teacher-forced scoring that follows it (the token lens, the pane lens, the price
views), so that scoring computes only what the generation did not.

The token lens scores each pane's text under the base and the fine-tune: four rows over prompt + text, a
teacher-forced pass that cost as much as the generation itself (bench/bench_engine.py: 1.04x, 2-core AMD EPYC).
But a text under the model that wrote it is exactly what the generation computed, one step at a time: the
logits of each step (kept here). And a text under another model shares its prompt with that model's own row,
whose keys and values the generation cached (kept here too). So the lens's own rows cost nothing, and its cross
rows run over their texts only, after the prompt's cached keys and values.

What is kept is matched token for token: a row is served from it only where its strengths (per layer too) and
adapter are a generation row's, and its tokens that row's prompt and text. The generation's logits come from
decode steps rather than one pass over the whole text, so they equal a plain forward pass's up to float32
rounding (tests compare within 1e-4, as for the pass itself). Kept on the CPU only (a GPU call's tensors do not
outlive it on ZeroGPU), within a memory budget, and released when the scoring is done.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

KEPT_LOGITS_BUDGET_BYTES = 256 * 2**20  # rows x steps x vocabulary float32 logits a run may keep


def fits_budget(rows: int, steps: int, vocabulary: int) -> bool:
    """Whether a run of these rows and steps may keep its logits (generate() holds them all until it ends)."""
    return rows * steps * vocabulary * 4 <= KEPT_LOGITS_BUDGET_BYTES


@dataclass
class KeptRun:
    """One generation's rows: their model (strengths, adapter), tokens, logits of every step and cache."""

    uses: list  # per row: (strength or per-layer strengths, adapter position), as Engine.placement gives them
    tokens: list[list[int]]  # per row: prompt + generated ids, without padding
    prompt_lengths: list[int]
    pads: list[int]  # each row's left padding in the generation batch (its cache entries start there)
    logits: torch.Tensor  # [rows, steps, vocabulary] float32: step t predicts the row's generated token t
    cache: object  # the generation's transformers Cache: keys and values of every token but the last

    @classmethod
    def of(cls, placed: tuple[list, list], prompts: list[list[int]], out) -> KeptRun | None:
        """From generate()'s output (return_dict_in_generate, output_logits) for rows left-padded as
        generation.left_padded pads them; None where it holds no logits or cache."""
        if not getattr(out, "logits", None) or getattr(out, "past_key_values", None) is None:
            return None
        width = max(len(ids) for ids in prompts)
        generated = out.sequences[:, width:].tolist()
        logits = torch.stack([step.float() for step in out.logits], dim=1)
        return cls(
            uses=list(zip(*placed, strict=True)),
            tokens=[list(ids) + row for ids, row in zip(prompts, generated, strict=True)],
            prompt_lengths=[len(ids) for ids in prompts],
            pads=[width - len(ids) for ids in prompts],
            logits=logits,
            cache=out.past_key_values,
        )

    def _rows_of(self, use) -> list[int]:
        return [g for g, kept in enumerate(self.uses) if kept == use]

    def own_logits(self, use, sequence: list[int], keep: int) -> torch.Tensor | None:
        """Logits [len(sequence) - 1 - keep, vocabulary] (position j predicting sequence[keep + j + 1]) where the
        sequence's inputs (all but its last token, which is only scored) are a row's prompt and the start of its
        text, under that row's own model; else None."""
        for g in self._rows_of(use):
            prompt = self.prompt_lengths[g]
            first, end = keep - (prompt - 1), len(sequence) - prompt  # steps whose logits are wanted
            inputs = sequence[:-1]
            if first >= 0 and end <= self.logits.shape[1] and inputs == self.tokens[g][: len(inputs)]:
                return self.logits[g, first:end]
        return None

    def reusable(self, use, sequence: list[int], keep: int) -> tuple[int, int]:
        """(generation row, tokens) whose cached keys and values serve the start of this sequence under this
        model: the longest prefix shared with a row of that model, at most up to position `keep` (the first
        position whose logits are wanted must be computed); (-1, 0) where none."""
        best = (-1, 0)
        for g in self._rows_of(use):
            cached = self.tokens[g][
                : len(self.tokens[g]) - 1
            ]  # the last generated token was never a model input
            shared = 0
            for a, b in zip(sequence[: keep + 1], cached, strict=False):
                if a != b:
                    break
                shared += 1
            shared = min(shared, keep)
            if shared > best[1]:
                best = (g, shared)
        return best

    def past_for(self, rows: list[int], length: int, config):
        """A cache of the first `length` tokens of these generation rows (in this order), for a batch that goes
        on from there."""
        from transformers.cache_utils import DynamicCache

        cache = DynamicCache(config=config)
        for index, layer in enumerate(self.cache.layers):
            keys = torch.cat([layer.keys[g : g + 1, :, self.pads[g] : self.pads[g] + length] for g in rows])
            values = torch.cat(
                [layer.values[g : g + 1, :, self.pads[g] : self.pads[g] + length] for g in rows]
            )
            cache.update(keys, values, index)
        return cache


class KeptRunScoring:
    """Engine's teacher-forced logits, served from the kept run where it can (mixed into Engine: uses its
    model, lock, threads, placement and pad id, and `kept`, which stream_rows sets)."""

    kept: KeptRun | None = None

    def release_kept_run(self) -> None:
        self.kept = None

    def vocabulary_size(self) -> int:
        """Entries of a row of logits: the output layer's, which may be padded beyond the tokenizer's."""
        return int(getattr(self.config, "vocab_size", 0) or len(self.tokenizer))

    def row_logits(self, sequences: list[list[int]], strengths: list, keep: list[int]) -> list[torch.Tensor]:
        """Per row, float32 logits [len(sequence) - 1 - keep, vocabulary] on the CPU, position j predicting
        sequence[keep + j + 1]: from the kept run's own steps, else computed after its cached prompt, else by
        one plain teacher-forced pass (Engine.forward_rows)."""
        uses = list(zip(*self.placement(strengths), strict=True))  # an unknown adapter fails before the lock
        out: list = [None] * len(sequences)
        if self.kept is not None:  # else straight to one plain pass
            self._from_kept(out, sequences, strengths, uses, keep)
        rest = [i for i, row in enumerate(out) if row is None]
        if rest:
            first = min(keep[i] for i in rest)
            logits = self.forward_rows(
                [sequences[i] for i in rest], [strengths[i] for i in rest], [keep[i] for i in rest]
            )
            for r, i in enumerate(rest):
                out[i] = logits[r, keep[i] - first : len(sequences[i]) - 1 - first]
        return out

    def _from_kept(self, out: list, sequences, strengths, uses, keep) -> None:
        """Into `out`, each row the kept run serves: its own logits, or one pass after its cached prompt."""
        from utils.runtime.scoring import teacher_forced_logits

        with self.exclusive():
            kept = self.kept
            if kept is None:  # released or replaced since the caller looked
                return
            groups: dict[int, list[tuple[int, int]]] = {}
            for i, (sequence, use) in enumerate(zip(sequences, uses, strict=True)):
                out[i] = kept.own_logits(use, sequence, keep[i])
                if out[i] is None:
                    g, length = kept.reusable(use, sequence, keep[i])
                    if length:
                        groups.setdefault(length, []).append((i, g))
            for length, members in groups.items():
                # each member's tokens after the cached `length`, scored from its keep_from on
                first = min(keep[i] for i, _ in members) - length
                logits = teacher_forced_logits(
                    self.model,
                    self.threads,
                    self.pad_id,
                    [sequences[i][length:] for i, _ in members],
                    self.placement([strengths[i] for i, _ in members]),
                    first,
                    past=lambda m=members, n=length: kept.past_for([g for _, g in m], n, self.model.config),
                    past_length=length,
                )
                for r, (i, _) in enumerate(members):
                    out[i] = logits[r, keep[i] - length - first : len(sequences[i]) - 1 - length - first]
