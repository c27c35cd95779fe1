"""Greedy answers of the embedded default on the test prompts, both panes, with a fast path on and off; and a count
of the greedy loop's compiled steps."""


def greedy_answers_with_and_without(engine, switch) -> dict[bool, list]:
    """{enabled: [pane key -> token ids, per prompt]} for `switch.enabled` False and True (restored to True)."""
    from utils.core.seam import GenerationSettings
    from utils.task.catalog import example_descriptions
    from utils.task.pricing import build_prompt

    prompts = [build_prompt(d) for d in example_descriptions(4)] + ["The three primary colours are"]
    mode = "both" if engine.has_adapter else "base"
    runs = {}
    for enabled in (False, True):
        switch.enabled = enabled
        try:
            runs[enabled] = [
                {
                    k: p.token_ids
                    for k, p in engine.run(p, mode, GenerationSettings(max_new_tokens=16)).panes.items()
                }
                for p in prompts
            ]
        finally:
            switch.enabled = True
    return runs


def counting_compiled_steps(monkeypatch) -> list[int]:
    """The steps each compiled `lora_lens::decode_steps` call takes, from now on (the greedy loop's calls of 1, 2,
    4, then 8 steps: utils/runtime/greedy_loop.py)."""
    import torch

    calls: list[int] = []
    real = torch.ops.lora_lens.decode_steps

    def counted(*args):
        chosen, logits = real(*args)
        calls.append(chosen.shape[0])
        return chosen, logits

    monkeypatch.setattr(torch.ops.lora_lens, "decode_steps", counted, raising=False)
    return calls
