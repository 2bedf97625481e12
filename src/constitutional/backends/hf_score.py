"""Scoring for the `hf` backend: log p(option | prompt) for multiple-choice options and whole
continuations (the protocol's `option_logprobs` and `sequence_logprobs`).

All options of a prompt are scored in one forward pass: the options are appended after the prompt
and a 4D attention mask lets each option see the prompt and its own earlier tokens only (a "tree"
of continuations sharing the prompt's positions), after the shared prefix's KV cache
(`hf_cache.py`).
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..errors import UserError


class Scoring:
    """`HFBackend`'s scoring calls (see the module docstring)."""

    def _option_ids(self, prompt_ids: list[int], prompt: str, option: str, where: str) -> list[int]:
        """Token ids of `option` as a continuation of `prompt`, checked to round-trip."""
        if not option:
            raise UserError(f"{where}: empty option string; options must contain text")
        full = self._encode_text(prompt + option)
        if full[: len(prompt_ids)] == prompt_ids and len(full) > len(prompt_ids):
            ids = full[len(prompt_ids) :]
        else:  # the tokenizer merged across the boundary: score the option's own tokens
            ids = self.tokenizer(option, add_special_tokens=False)["input_ids"]
        unk = self.tokenizer.unk_token_id
        decoded = self.tokenizer.decode(ids, skip_special_tokens=False)
        if not ids or (unk is not None and unk in ids and self.tokenizer.unk_token not in option) or decoded.strip() != option.strip():
            raise UserError(
                f"{where}: option {option!r} cannot be expressed by the tokenizer of {self.name} "
                f"(it round-trips to {decoded!r}); use options made of characters the tokenizer knows"
            )
        return ids

    @torch.no_grad()
    def option_logprobs(self, prompts: Sequence[str], options: Sequence[Sequence[str]]) -> list[list[float]]:
        """log p(option | prompt) summed over the option's tokens, for every option of every prompt.

        prompts: N raw-text prompts; options: N lists of option strings. One forward per prompt
        (batched): [prompt][option 1]...[option k] with a tree attention mask.
        """
        if len(prompts) != len(options):
            raise ValueError("prompts and options differ in length")
        rows = []
        for i, (prompt, opts) in enumerate(zip(prompts, options)):
            if not opts:
                raise UserError(f"prompt {i}: no options to score")
            p_ids = self._encode_text(prompt)
            o_ids = [self._option_ids(p_ids, prompt, o, f"prompt {i} option {j}") for j, o in enumerate(opts)]
            self._check_length(p_ids + [t for o in o_ids for t in o], i, "prompt with its options")
            rows.append((i, p_ids, o_ids))
        results: list[list[float]] = [[] for _ in prompts]
        if not rows:
            return results
        p = self._split_prefix([r[1] for r in rows])
        prefix = tuple(rows[0][1][:p])
        order = sorted(rows, key=lambda r: -(len(r[1]) + sum(len(o) for o in r[2])))
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            for (i, _, _), scores in zip(batch, self._score_batch(prefix, batch)):
                results[i] = scores
        return results

    def sequence_logprobs(self, prompts: Sequence[str], continuations: Sequence[str]) -> list[float]:
        """log p(continuation | prompt) in nats, one per pair."""
        return [s[0] for s in self.option_logprobs(prompts, [[c] for c in continuations])]

    def _score_batch(self, prefix: tuple[int, ...], batch) -> list[list[float]]:
        P, B = len(prefix), len(batch)
        seqs, positions, trees = [], [], []
        for _, p_ids, o_ids in batch:
            own = list(p_ids[P:])
            n = len(own)
            seq, pos, group = own[:], list(range(P, P + n)), [-1] * n
            for k, o in enumerate(o_ids):
                seq += o
                pos += list(range(P + n, P + n + len(o)))
                group += [k] * len(o)
            seqs.append(seq)
            positions.append(pos)
            trees.append((n, group, o_ids))
        T = max(len(s) for s in seqs)
        input_ids = torch.full((B, T), self.pad_id, dtype=torch.long)
        position_ids = torch.zeros((B, T), dtype=torch.long)
        allowed = torch.zeros((B, T, P + T), dtype=torch.bool)
        allowed[:, :, :P] = True
        for r, (seq, pos, (n, group, _)) in enumerate(zip(seqs, positions, trees)):
            m = len(seq)
            input_ids[r, :m] = torch.tensor(seq)
            position_ids[r, :m] = torch.tensor(pos)
            g = torch.tensor(group)
            idx = torch.arange(m)
            causal = idx[None, :] <= idx[:, None]
            # prompt keys are visible to everyone; option keys only to later tokens of the same option
            same = (g[None, :] == -1) | (g[None, :] == g[:, None])
            allowed[r, :m, P : P + m] = causal & same
            allowed[r, m:, P:] = torch.eye(T, dtype=torch.bool)[m:]  # padding rows see themselves
        # Logits only where an option token is predicted: the last prompt token and each option's
        # tokens but its last (the full (B, T, vocab) tensor would be GBs for long prompts).
        preds = []
        for n, _, o_ids in trees:
            if n == 0:
                raise RuntimeError("prompt suffix is empty; _split_prefix keeps one token per row")
            row, start = [], n
            for o in o_ids:
                row.append([n - 1] + list(range(start, start + len(o) - 1)))
                start += len(o)
            preds.append(row)
        keep = sorted({q for row in preds for opt in row for q in opt})
        col = {q: k for k, q in enumerate(keep)}
        # scoring reads the prefix cache but needs no new one
        keep_t = torch.tensor(keep, device=self.device)
        out = self._masked_forward(prefix, input_ids, allowed, position_ids, use_cache=False, logits_to_keep=keep_t)
        self.stats["prefill_tokens"] += int(sum(len(s) for s in seqs))
        logp = torch.log_softmax(out.logits.float(), dim=-1).cpu()
        return [
            [float(sum(logp[r, col[q], t] for q, t in zip(opt_preds, o))) for opt_preds, o in zip(row, o_ids)]
            for r, (row, (_, _, o_ids)) in enumerate(zip(preds, trees))
        ]

    def brute_force_option_logprobs(self, prompt: str, options: Sequence[str]) -> list[float]:
        """Reference for tests: each option scored in its own plain forward pass, no cache, no mask tricks."""
        p_ids = self._encode_text(prompt)
        out = []
        for j, o in enumerate(options):
            o_ids = self._option_ids(p_ids, prompt, o, f"option {j}")
            ids = torch.tensor([p_ids + o_ids], device=self.device)
            with torch.no_grad():
                logp = torch.log_softmax(self.model(input_ids=ids).logits.float(), dim=-1)[0].cpu()
            out.append(float(sum(logp[len(p_ids) - 1 + t, tok] for t, tok in enumerate(o_ids))))
        return out
