"""The `hooked-llava` command line (`explain`, `sweep`, `quickstart`).

- `main.py`: `quickstart`, `explain` and `main(argv)`, the console entry point (`hooked_llava.cli.main:main`).
- `sweep.py`: the `sweep` command (study B over a dataset), its flags and its checks.
- `arguments.py`: checks of the arguments, before the model loads where possible (`UsageError`).

The top layer: may import `analyses` and every package of `hooked_llava`.
"""
