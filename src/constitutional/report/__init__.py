"""The HTML report of a run directory (`cai report`): `html.py` assembles the page from one module
per section (`overview.py`, `elo.py`, `revision_rounds.py`, `behaviour.py`, `sft.py`,
`preference_model.py`, `labeler.py`, `rl.py`, `dpo.py`, `distill.py`, `chains.py`; shared helpers in
`common.py`), `plots.py` draws the figures (matplotlib, Agg canvas) as PNG data URIs, so the report
is one self-contained file."""
