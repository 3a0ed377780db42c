"""The `hooked-llava` command line (`explain`, `sweep`, `quickstart`).

- `main.py`: the commands and `main(argv)`, the console entry point (`hooked_llava.cli.main:main`).
- `arguments.py`: checks of the arguments, before the model loads where possible (`UsageError`).

The top layer: may import `analyses` and every package of `hooked_llava`.
"""
