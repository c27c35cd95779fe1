"""Greedy answers of the embedded default on the test prompts, both panes, with a fast path on and off."""


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
