"""Built-in data (constitution, few-shot examples, prompt sets, multiple-choice comparisons) and loaders."""
