"""constitutional: Constitutional AI (Bai et al., 2022) end to end on any causal language model.

Stages (one module each under `constitutional.stages`): red-teaming, critique -> revision (SL-CAI),
SFT, response sampling, AI-feedback labeling, preference-model training, RL against the preference
model (RL-CAI), context distillation, evaluation and the HTML report. See docs/ARCHITECTURE.md.
"""

__version__ = "0.1.0"
