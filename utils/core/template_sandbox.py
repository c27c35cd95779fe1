"""Chat templates rendered as transformers renders them, and a visitor's own template rendered in a process of
its own that can read nothing but the messages.

`render` builds the same Jinja environment as transformers' apply_chat_template (an immutable sandbox,
trim_blocks and lstrip_blocks, loop controls, its tojson, raise_exception, dict, namespace and the
{% generation %} tag), so a tokenizer's template gives the text apply_chat_template gives. The templates the
server's own files ship render in-process. A visitor's template runs through `render_isolated`: this file run
as a script by a fresh interpreter (`python -I`, only jinja2 and the standard library imported), with a cap on
its memory and CPU time and a wall-clock time-out, fed the messages and the special tokens' spellings on
standard input. The sandbox refuses attribute access to Python internals (a template that reaches for
`__class__` or `os` gets a SecurityError); the separate process bounds what the sandbox does not: a loop that
never ends, a string of ten gigabytes. Nothing of the server (its environment, files, token, model) is in
that process's reach beyond what any Python process could open, and the sandbox lets a template call nothing
that opens files.

Run as a script, it reads {"template", "contexts": [...]} as JSON and writes {"texts": [...]} or {"error"}.
"""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime

MAX_TEMPLATE_CHARS = 8_000  # a chat template is a few hundred to a few thousand characters
MAX_RENDERED_CHARS = 200_000  # more than a prompt can hold in any context the app serves
ISOLATED_TIMEOUT_S = 4.0  # wall clock for the isolated render, start-up included (about 0.1 s normally)
ISOLATED_CPU_S = 2  # CPU seconds the isolated process may use
ISOLATED_MEMORY_BYTES = 1 << 30  # its address space


class TemplateRefused(Exception):
    """The template could not be rendered: the message says why, for the person who wrote it."""


def environment(with_clock: bool = True):
    """The Jinja environment transformers' apply_chat_template renders in (transformers 5,
    utils/chat_template_utils.py), less its assistant-mask tracking: {% generation %} renders its body."""
    import jinja2
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    class TemplateDict:
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check_name(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"A namespace cannot hold {name!r}.")

    class Sandbox(ImmutableSandboxedEnvironment):
        def unsafe_undefined(self, obj, attribute):
            # the sandbox's own answer is an empty value that only fails when used; a visitor's template that
            # reaches for an internal is refused outright, so its author is told
            if not with_clock:
                raise jinja2.exceptions.SecurityError(
                    f"access to attribute {attribute!r} of a {type(obj).__name__} is not allowed"
                )
            return super().unsafe_undefined(obj, attribute)

    env = Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["dict"] = TemplateDict()
    env.globals["namespace"] = TemplateNamespace
    if with_clock:  # the server's own templates may print today's date; a visitor's reads the messages only
        env.globals["strftime_now"] = lambda format: datetime.now().strftime(format)
    return env


def render(template: str, contexts: list[dict], with_clock: bool = True) -> list[str]:
    """Each context (messages, add_generation_prompt, the special tokens' spellings) through the template,
    or TemplateRefused with the template's error."""
    import jinja2

    try:
        compiled = environment(with_clock).from_string(template)
        texts = [compiled.render(**context) for context in contexts]
    except jinja2.exceptions.SecurityError as exc:
        raise TemplateRefused(f"The template tried to reach something it may not ({exc}).") from None
    except jinja2.exceptions.TemplateSyntaxError as exc:
        raise TemplateRefused(
            f"The template has a syntax error on line {exc.lineno}: {exc.message}"
        ) from None
    except jinja2.exceptions.TemplateError as exc:
        raise TemplateRefused(f"The template stopped with an error: {exc}") from None
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, ZeroDivisionError) as exc:
        raise TemplateRefused(f"The template failed ({type(exc).__name__}: {str(exc)[:200]}).") from None
    if any(len(text) > MAX_RENDERED_CHARS for text in texts):
        raise TemplateRefused(f"The template wrote more than {MAX_RENDERED_CHARS:,} characters.")
    return texts


def render_isolated(template: str, contexts: list[dict]) -> list[str]:
    """`render` of a visitor's template in a fresh interpreter with bounded memory, CPU and time."""
    if len(template) > MAX_TEMPLATE_CHARS:
        raise TemplateRefused(
            f"The template has {len(template):,} characters; at most {MAX_TEMPLATE_CHARS:,}."
        )
    request = json.dumps({"template": template, "contexts": contexts})
    try:
        done = subprocess.run(
            [sys.executable, "-I", __file__],
            input=request,
            capture_output=True,
            text=True,
            timeout=ISOLATED_TIMEOUT_S,
            env={},
            cwd="/",
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise TemplateRefused(
            f"The template did not finish within {ISOLATED_TIMEOUT_S:.0f} s and was stopped."
        ) from None
    try:
        answer = json.loads(done.stdout)
    except ValueError:
        # killed for its memory or CPU time, or the interpreter failed: say what, not how
        raise TemplateRefused(
            "The template used more memory or time than a prompt may take and was stopped."
        ) from None
    if "error" in answer:
        raise TemplateRefused(answer["error"])
    return answer["texts"]


def _isolated_main() -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (ISOLATED_MEMORY_BYTES, ISOLATED_MEMORY_BYTES))
    resource.setrlimit(resource.RLIMIT_CPU, (ISOLATED_CPU_S, ISOLATED_CPU_S))
    request = json.loads(sys.stdin.read())
    try:
        answer = {"texts": render(request["template"], request["contexts"], with_clock=False)}
    except TemplateRefused as exc:
        answer = {"error": str(exc)}
    except (MemoryError, RecursionError) as exc:
        what = "memory" if isinstance(exc, MemoryError) else "recursion"
        answer = {"error": f"The template used more {what} than a prompt may take and was stopped."}
    sys.stdout.write(json.dumps(answer))


if __name__ == "__main__":
    _isolated_main()
