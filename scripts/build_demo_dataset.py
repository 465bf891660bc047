"""Build the demo's chat dataset from a real source: Python's standard library.

Every record asks what a standard-library function does and answers with the
first sentence of that function's own docstring, written by the CPython
developers. The result is shipped as ``mlxtune/data/demo/*.jsonl`` so every
machine trains on the same bytes; run this again to rebuild it:

    .venv/bin/python scripts/build_demo_dataset.py
"""

from __future__ import annotations

import importlib
import inspect
import json
import random
import re
from pathlib import Path

MODULES = [
    "os", "os.path", "shutil", "json", "re", "math", "random", "statistics", "itertools",
    "functools", "collections", "textwrap", "string", "datetime", "time", "pathlib",
    "subprocess", "tempfile", "glob", "fnmatch", "base64", "hashlib", "zlib", "gzip",
    "csv", "heapq", "bisect", "copy", "operator", "uuid", "urllib.parse", "html",
    "difflib", "calendar", "fractions", "decimal", "secrets", "struct", "inspect", "logging",
]
QUESTIONS = [
    "In Python, what does `{name}` do?",
    "What is `{name}` for in Python's standard library?",
    "Briefly, what does the Python function `{name}` do?",
]
OUT = Path(__file__).resolve().parent.parent / "mlxtune" / "data" / "demo"


def first_sentence(doc: str) -> str | None:
    """The docstring's opening sentence, if it reads like prose."""
    paragraph = inspect.cleandoc(doc).split("\n\n")[0].replace("\n", " ").strip()
    sentence = re.split(r"(?<=[.!?])\s", paragraph)[0].strip()
    if not (25 <= len(sentence) <= 200) or not sentence[0].isupper():
        return None
    if sentence.startswith(("Return", "Copy", "Compute")) or sentence.endswith("."):
        return sentence if sentence.endswith(".") else sentence + "."
    return None


def records() -> list[dict]:
    out, seen = [], set()
    for module_name in MODULES:
        module = importlib.import_module(module_name)
        for attr in sorted(dir(module)):
            if attr.startswith("_"):
                continue
            obj = getattr(module, attr)
            if not (inspect.isfunction(obj) or inspect.isbuiltin(obj)):
                continue
            if getattr(obj, "__module__", module_name) not in (module_name, None, "posix"):
                continue  # re-exported from another module
            answer = first_sentence(obj.__doc__ or "")
            name = f"{module_name}.{attr}"
            if answer is None or answer in seen:
                continue
            seen.add(answer)
            question = QUESTIONS[len(out) % len(QUESTIONS)].format(name=name)
            out.append({"messages": [{"role": "user", "content": question},
                                     {"role": "assistant", "content": answer}]})
    return out


def main() -> None:
    data = records()
    random.Random(0).shuffle(data)
    cut = max(16, len(data) // 8)
    OUT.mkdir(parents=True, exist_ok=True)
    for name, part in (("valid", data[:cut]), ("train", data[cut:])):
        with open(OUT / f"stdlib_{name}.jsonl", "w") as f:
            for record in part:
                f.write(json.dumps(record) + "\n")
        print(f"{OUT / f'stdlib_{name}.jsonl'}: {len(part)} records")


if __name__ == "__main__":
    main()
