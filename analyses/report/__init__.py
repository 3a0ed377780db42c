"""The `hooked-llava explain` report: one question about one image, explained in one HTML file.

- `report.py`: the `Report` the page is written from, and what the sections share.
- `explain.py`: `explain` computes the report; `write_html` writes it.
- `patches.py`: the image sections (study A's patch map, its attention baseline, patches in vocabulary space).
- `html.py`: the self-contained page, figures embedded as PNG.

The report sits above the other analyses packages and may import any of them.
"""
