"""Write worker/settings/vllm_flags.json from the argument parser of the vLLM installed here.

    .venv-vllm/bin/python tools/gen_vllm_flags.py [OUTPUT]

(OUTPUT: worker/settings/vllm_flags.json unless given)

Run it with the Python that has the vLLM this project pins (the Makefile's
VLLM_VERSION); tests/settings/test_vllm_flags.py runs it the same way and fails when the stored
file and the pinned vLLM disagree, so an upgrade shows every flag that came, went or
changed. The worker reads the file and never imports vLLM.

For each `vllm serve` option: its flag (the first long spelling), its kind (`value`
takes a value; `switch` is `--x`/`--no-x`; `flag` is a bare store-true flag), the
value's type as the worker checks it (int, float, size: `1k`/`2M` as vLLM reads them,
size_or_auto, json, json_or_text, text), whether it takes several values, and the
choices argparse has.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

TYPES = {"int": "int", "float": "float", "human_readable_int": "size",
         "human_readable_int_or_auto": "size_or_auto", "loads": "json",
         "parse_dataclass": "json", "union_dict_and_str": "json_or_text"}


def _type(action: argparse.Action) -> str:
    kind = action.type
    name = getattr(kind, "__name__", "")
    if name == "_optional_type" and kind.__closure__:  # vLLM's optional_type(inner)
        inner = kind.__closure__[0].cell_contents
        name = getattr(inner, "__name__", "")
    return TYPES.get(name, "text")


def describe(action: argparse.Action) -> dict[str, Any] | None:
    longs = [o for o in action.option_strings if o.startswith("--")]
    if not longs or isinstance(action, argparse._HelpAction):
        return None
    if isinstance(action, argparse.BooleanOptionalAction):
        kind, value_type = "switch", None
    elif isinstance(action, argparse._StoreTrueAction):
        kind, value_type = "flag", None
    else:
        kind, value_type = "value", _type(action)
    choices = None if action.choices is None else [str(c) for c in action.choices]
    if isinstance(action.choices, (set, frozenset)):  # no order of its own: a stable one
        choices = sorted(choices, key=lambda c: (len(c), c) if c.isdigit() else (0, c))
    several = action.nargs in ("+", "*") or isinstance(action, argparse._AppendAction)
    return {"flag": longs[0], "kind": kind, "type": value_type, "several": several,
            "choices": choices}


def checked_once_started() -> dict[str, list[str]]:
    """Flags vLLM's parser takes as any text and its config refuses only once vLLM has
    started (seconds to minutes later): their values from vLLM's own lists, so that the
    worker refuses a wrong one before the spawn."""
    from typing import get_args

    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS
    from vllm.model_executor.model_loader import LoadFormats

    return {"--quantization": sorted(QUANTIZATION_METHODS),
            "--load-format": sorted(get_args(LoadFormats))}


def main() -> None:
    import vllm
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = make_arg_parser(FlexibleArgumentParser(prog="vllm serve"))
    flags = sorted((d for a in parser._actions if (d := describe(a))), key=lambda d: d["flag"])
    later = checked_once_started()
    for flag in flags:
        if flag["choices"] is None and flag["flag"] in later:
            flag["choices"] = later[flag["flag"]]
    out = sys.argv[1] if len(sys.argv) > 1 else "worker/settings/vllm_flags.json"
    rows = ",\n".join(json.dumps(flag) for flag in flags)  # one flag a line: readable diffs
    with open(out, "w", encoding="utf-8") as stream:
        stream.write(f'{{"vllm": {json.dumps(vllm.__version__)}, "flags": [\n{rows}\n]}}\n')
    print(f"{len(flags)} flags of vLLM {vllm.__version__} written to {out}")


if __name__ == "__main__":
    main()
