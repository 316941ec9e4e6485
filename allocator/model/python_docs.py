"""The embedded "python-docs" corpus: pydoc's topic pages and the docstrings of pure-Python stdlib modules.

Run as a script by allocator/model/calibration_data.py in a fresh `python -I -S` (it prints the documents as JSON),
so it imports nothing but the standard library: what another package patched in the calling process cannot change
the corpus. Keep it stdlib-only."""

import importlib
import inspect
import json
import sys
import warnings

MIN_DOC_CHARS = 200  # shorter docstrings are mostly one-liners: little text, many EOS separators

# Pure-Python stdlib modules with substantial docstrings; part of the corpus definition, so keep the order fixed.
# (unittest's classes live in unittest.case, hence both.)
DOC_MODULES = (
    "argparse", "collections", "json", "pathlib", "textwrap", "string", "functools", "itertools", "dataclasses",
    "enum", "typing", "datetime", "decimal", "fractions", "statistics", "random", "heapq", "bisect", "contextlib",
    "csv", "logging", "unittest", "subprocess", "threading", "queue", "email.message", "http.client",
    "urllib.parse", "xml.etree.ElementTree", "shutil", "tempfile", "zipfile", "tarfile", "pickle", "copy",
    "pprint", "inspect", "ast", "difflib", "calendar", "configparser", "glob", "fnmatch", "gettext", "base64",
    "unittest.case", "doctest", "optparse", "smtplib", "ftplib", "codecs", "http.server",
)


def collect() -> list[str]:
    """The corpus's documents, in their fixed order."""
    from pydoc_data.topics import topics

    docs = [topics[key] for key in sorted(topics)]
    seen: set[str] = set()
    for mod_name in DOC_MODULES:
        try:
            mod = importlib.import_module(mod_name)
        except ImportError:  # a stripped-down Python may lack some modules; the corpus just gets smaller
            continue
        texts = [inspect.getdoc(mod)]
        for name, obj in sorted(vars(mod).items()):
            # Only the module's own public classes/functions: re-exports would duplicate other modules' text.
            if name.startswith("_") or not (inspect.isclass(obj) or inspect.isfunction(obj)):
                continue
            if getattr(obj, "__module__", None) != mod.__name__:
                continue
            texts.append(inspect.getdoc(obj))
            if inspect.isclass(obj):  # public methods defined by the class itself (inherited ones come with the parent)
                texts.extend(inspect.getdoc(f) for m, f in sorted(vars(obj).items())
                             if not m.startswith("_") and inspect.isfunction(f))
        for text in texts:
            # getdoc inherits a parent's docstring for undocumented subclasses; `seen` keeps each text once.
            if text and len(text) >= MIN_DOC_CHARS and text not in seen:
                seen.add(text)
                docs.append(text)
    return [d for d in docs if len(d) >= MIN_DOC_CHARS]


if __name__ == "__main__":
    # Reading some docstrings (typing.io, typing.re) emits DeprecationWarning: noise here, and fatal under -W error.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        json.dump(collect(), sys.stdout)
