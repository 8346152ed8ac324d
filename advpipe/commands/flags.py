"""Config fields as the command line spells them: the library's errors name fields, the CLI shows flags."""

from __future__ import annotations

import re
from typing import Sequence

#: fields whose flag is not ``--`` + the field with dashes
FLAG_NAMES = {
    "attack_options": "--attack-opt",
    "aug_options": "--aug-opt",
    "method_options": "--method-opt",
    "autocast_dtype": "--precision",
    "target": "--targeted",
}


def flag_name(field: str) -> str:
    """The flag of a config field: ``weight_decay`` -> ``--weight-decay``."""
    return FLAG_NAMES.get(field, "--" + field.replace("_", "-"))


#: quoted text ('...' or "...", as ``{value!r}`` writes user values) is never rewritten
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")


def with_flags(message: str, fields: Sequence[str]) -> str:
    """``message`` with each named field written as its flag: whole words only, never inside quotes or paths."""
    if not fields:
        return message
    names = "|".join(re.escape(f) for f in sorted(set(fields), key=len, reverse=True))
    word = re.compile(rf"(?<![\w\-./\\])({names})(?![\w\-/\\])")
    parts, last = [], 0
    for quoted in _QUOTED.finditer(message):
        parts += [word.sub(lambda m: flag_name(m.group(1)), message[last:quoted.start()]), quoted.group(0)]
        last = quoted.end()
    parts.append(word.sub(lambda m: flag_name(m.group(1)), message[last:]))
    return "".join(parts)
