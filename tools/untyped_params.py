"""Count function parameters without a type annotation (``self`` and ``cls`` excepted), and
functions without a return annotation, per folder.

    python tools/untyped_params.py                  # deploykit/ and plugins/ (tests left out)
    python tools/untyped_params.py deploykit -v     # list every untyped parameter
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def count(folder: Path, verbose: bool = False) -> tuple[int, int, int, int]:
    """(untyped parameters, parameters, functions without a return type, functions)."""
    untyped = params = no_return = functions = 0
    for path in sorted(folder.rglob("*.py")):
        if "tests" in path.relative_to(folder).parts or "__pycache__" in path.parts:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            functions += 1
            if node.returns is None and node.name != "__init__":
                no_return += 1
            a = node.args
            every = a.posonlyargs + a.args + a.kwonlyargs + [x for x in (a.vararg, a.kwarg) if x is not None]
            for i, arg in enumerate(every):
                if i == 0 and arg.arg in ("self", "cls"):
                    continue
                params += 1
                if arg.annotation is None:
                    untyped += 1
                    if verbose:
                        print(f"{path.relative_to(ROOT)}:{node.lineno}: {node.name}({arg.arg})")
    return untyped, params, no_return, functions


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="*", default=["deploykit", "plugins"])
    parser.add_argument("-v", "--verbose", action="store_true", help="list every untyped parameter")
    args = parser.parse_args(argv)
    for name in args.folders:
        untyped, params, no_return, functions = count(ROOT / name, args.verbose)
        print(f"{name}/: {untyped} of {params} parameters untyped; "
              f"{no_return} of {functions} functions without a return type")
    return 0


if __name__ == "__main__":
    sys.exit(main())
