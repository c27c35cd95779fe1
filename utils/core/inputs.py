"""Checks of what a visitor or a client sends: numbers, prompts, strengths, item counts, flags, LoRA settings.

Each returns the clean value or raises InputError with a message written for the person who sent it (the UI
shows it as a toast, the API as an AppError). Ranges live here, next to the checks that enforce them.
"""

from __future__ import annotations

import math
import re
import unicodedata

from utils.core.errors import InputError
from utils.core.profiles import LoraSettings

MAX_NEW_TOKENS_RANGE = (1, 512)
TEMPERATURE_RANGE = (0.0, 2.0)
TOP_P_RANGE = (0.01, 1.0)
SEED_RANGE = (0, 2**32 - 1)
MAX_PROMPT_CHARS = 32_000  # refuse-by-truncation before tokenizing, so a huge paste cannot stall the server
STRENGTH_RANGE = (-2.0, 3.0)  # adapter strength s: 0 = base, 1 = fine-tune, < 0 subtracts the update
MAX_SWEEP_ROWS = 6  # strengths in one sweep (one batch row each)
N_ITEMS_RANGE = (1, 200)  # catalog items in one evaluation
R_RANGE = (1, 1024)
ALPHA_RANGE = (0.0, 65536.0)  # exclusive low end: alpha must be positive
MAX_TARGETS = 32
_MODULE_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,100}$")


def parse_number(name: str, value, integer: bool = False):
    """A finite int or float from a number or numeric text, or an InputError naming the setting.

    Example: parse_number("seed", " 7 ", integer=True) -> 7; parse_number("top_p", "nan") raises
    """
    if isinstance(value, bool) or value is None:
        raise InputError(f"{name} must be a number, not {value!r}.")
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise InputError(f"{name} must be a number, not {value[:40]!r}.") from None
    if not isinstance(value, (int, float)):
        raise InputError(f"{name} must be a number, not {type(value).__name__}.")
    if isinstance(value, float) and not math.isfinite(value):
        raise InputError(f"{name} must be a finite number, not {value}.")
    if integer:
        if float(value) != int(value):
            raise InputError(f"{name} must be a whole number, not {value}.")
        return int(value)
    return float(value)


def require_range(name: str, value, bounds) -> None:
    lo, hi = bounds
    if not lo <= value <= hi:
        raise InputError(f"{name} must be between {lo} and {hi}; got {value}.")


def clean_prompt(prompt) -> tuple[str, list[str]]:
    """The prompt with control characters removed and its size bounded, plus notices of what changed.

    Example: clean_prompt("a\\x00b") -> ("ab", ["Removed 1 control character(s) from the prompt."])
    """
    if not isinstance(prompt, str):
        raise InputError(f"The prompt must be text, not {type(prompt).__name__}.")
    notices = []
    kept = "".join(c for c in prompt if c in "\n\t" or unicodedata.category(c) not in ("Cc", "Cs"))
    if len(kept) != len(prompt):
        notices.append(f"Removed {len(prompt) - len(kept)} control character(s) from the prompt.")
    if not kept.strip():
        raise InputError("The prompt is empty: type some text (for the pricer, a product description).")
    if len(kept) > MAX_PROMPT_CHARS:
        notices.append(f"The prompt was cut to its last {MAX_PROMPT_CHARS:,} characters.")
        kept = kept[-MAX_PROMPT_CHARS:]
    return kept, notices


def check_strength(value, name: str = "strength") -> float:
    """A strength in STRENGTH_RANGE, from a number or numeric text. Example: check_strength("0.5") -> 0.5"""
    s = parse_number(name, value)
    require_range(name, s, STRENGTH_RANGE)
    return s


def parse_strengths(text) -> list[float]:
    """A sweep's strengths from "0, 0.5, 1" (commas or spaces), 1 to MAX_SWEEP_ROWS values, each in range.

    Example: parse_strengths("0,0.5 1") -> [0.0, 0.5, 1.0]
    """
    if isinstance(text, (list, tuple)):
        parts = list(text)
    elif isinstance(text, str):
        parts = [p for p in text.replace(",", " ").split() if p]
    else:
        raise InputError(f'strengths must be text such as "0, 0.5, 1", not {type(text).__name__}.')
    if not parts:
        raise InputError('strengths is empty: give 1 to 6 numbers, such as "0, 0.5, 1, 1.5, 2".')
    if len(parts) > MAX_SWEEP_ROWS:
        raise InputError(f"At most {MAX_SWEEP_ROWS} strengths in one sweep; got {len(parts)}.")
    return [check_strength(p, f"strength {i + 1}") for i, p in enumerate(parts)]


def check_n_items(n_items) -> int:
    """The number of catalog items to evaluate, 1..200. Example: check_n_items(20.0) == 20"""
    n = parse_number("n_items", n_items, integer=True)
    lo, hi = N_ITEMS_RANGE
    if not lo <= n <= hi:
        raise InputError(f"n_items must be between {lo} and {hi}; got {n}.")
    return n


def check_flag(name: str, value) -> bool:
    """A yes/no argument: a bool, or 0 / 1 (what some clients send). Anything else is refused."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise InputError(f"{name} must be true or false, not {value!r}.")


def parse_lora_inputs(r, alpha, target_modules) -> LoraSettings:
    """LoRA settings from UI / API values, validated: r 1..1024, 0 < alpha <= 65536, named linear layers.

    `target_modules` is a comma-separated string ("q_proj, v_proj"), a list of names, or "all-linear".
    Whether the names exist in a model is checked by utils.analysis.sizing against that model's layers.
    Example: parse_lora_inputs("32", 64, "q_proj,v_proj") -> LoraSettings(r=32, alpha=64, target_modules=(...))
    """
    r = parse_number("r", r, integer=True)
    if not R_RANGE[0] <= r <= R_RANGE[1]:
        raise InputError(f"r must be between {R_RANGE[0]} and {R_RANGE[1]}; got {r}.")
    alpha = parse_number("alpha", alpha, integer=False)
    if not ALPHA_RANGE[0] < alpha <= ALPHA_RANGE[1]:
        raise InputError(f"alpha must be greater than 0 and at most {ALPHA_RANGE[1]:g}; got {alpha:g}.")
    if alpha.is_integer():
        alpha = int(alpha)
    if isinstance(target_modules, str):
        names = target_modules.split(",")
    elif isinstance(target_modules, (list, tuple)) and all(isinstance(t, str) for t in target_modules):
        names = list(target_modules)
    else:
        raise InputError("target_modules must be text: module names separated by commas, or all-linear.")
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise InputError("Name at least one target module (e.g. q_proj,v_proj), or use all-linear.")
    if len(names) > MAX_TARGETS:
        raise InputError(f"At most {MAX_TARGETS} target modules; got {len(names)}.")
    bad = [n for n in names if not _MODULE_NAME.match(n)]
    if bad:
        raise InputError(
            f"{bad[0][:40]!r} is not a module name: use letters, digits, '_', '.' or '-' (e.g. q_proj)."
        )
    return LoraSettings(r=r, alpha=alpha, target_modules=tuple(dict.fromkeys(names)))
