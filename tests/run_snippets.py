"""Run one page's Python blocks in order, in this fresh interpreter; report each as a JSON line.

Usage: ``python run_snippets.py BLOCKS.json RESULTS.jsonl``, from the page's working
directory. BLOCKS.json is a list of ``{"location", "path", "line", "source"}``. Each block
is compiled with its page's path and line numbers, so a traceback points into the page.
A line ``{"location", "error"}`` (``error`` is ``null`` when the block ran) is written and
flushed as each block ends; the first failing block stops the page, since the blocks
after it build on it.
"""

from __future__ import annotations

import ast
import asyncio
import inspect
import json
import os
import sys
import traceback
import types


def main() -> None:
    blocks_path, results_path = sys.argv[1:]
    sys.path[0] = os.getcwd()  # the page's directory, where its named files were saved
    with open(blocks_path) as file:
        blocks = json.load(file)
    # A real __main__ module, so that whatever looks a class's module up in sys.modules
    # (dataclasses, pydantic, pickle) finds the blocks' names there, as in a pasted script.
    main_module = types.ModuleType("__main__")
    sys.modules["__main__"] = main_module
    namespace = main_module.__dict__
    with open(results_path, "w") as results:
        for block in blocks:
            error = None
            try:
                padded = "\n" * (block["line"] - 1) + block["source"]
                code = compile(padded, block["path"], "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
                if code.co_flags & inspect.CO_COROUTINE:
                    asyncio.run(eval(code, namespace))
                else:
                    exec(code, namespace)
            except BaseException:
                error = traceback.format_exc()
            results.write(json.dumps({"location": block["location"], "error": error}) + "\n")
            results.flush()
            if error is not None:
                break


if __name__ == "__main__":
    main()
