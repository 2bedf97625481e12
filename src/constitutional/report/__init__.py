"""The HTML report of a run directory (`cai report`): `html.py` assembles the page, `plots.py` draws
the figures (matplotlib, Agg canvas) as PNG data URIs, so the report is one self-contained file."""
