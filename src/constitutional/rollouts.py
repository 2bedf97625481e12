"""RL rollouts through the project's generation backend instead of HF `generate` (`cai rl`).

TRL 1.16's `RLOOTrainer` and `GRPOTrainer` sample the completions of a step with
`model.generate` on one left-padded batch: every row decodes until the longest is done and the
prompts are encoded in full. Neither offers a hook for another generator on this path (GRPO's
`rollout_func` is marked experimental and replaces its whole tokenisation; RLOO has none), but both
tokenise the prompts in `_tokenize_prompts(prompts)` and then call
`_generate_single_turn(prompt_ids, images, multimodal_fields, ...)`. The mixins below override
those two: the step's prompts are sampled by `HFBackend.from_model(policy)` (`generate_ids`, the
backend's batched decode with the shared-prefix KV cache; finished rows leave the batch), and TRL
gets the same completion token ids its own path would give (the end-of-turn token appended when a
sample ended by itself). TRL then computes every log-probability itself from those ids (the
policy's and the reference's, one forward each), so the loss is unchanged; tests/unit/test_rl.py
checks them against a brute-force forward.

Under bf16 autocast on the CPU the samples come from a plain bf16 copy of the policy's weights as
they are at that step (`decode_copy`, 270 MB for 135M parameters, made in 0.2-0.4 s): decoding the float32
policy through accelerate's autocast and TRL's patched forward took twice as long per token.

Sampling: temperature, top_p and repetition_penalty as TRL's config says (other samplers, top_k
or min_p, are refused by `check_sampling`). The G samples of a prompt are one request with n = G;
the seed is a function of (seed, step, process), so a resumed run samples what an uninterrupted one
would have. TRL's own path is kept when the backend cannot reproduce it: multimodal prompts, a
prompt the backend tokenises differently from TRL, or a model with more than one end-of-turn
token (the backend's ids do not say which one ended a sample).
"""

from __future__ import annotations

import sys

from .errors import UserError

SEED_STRIDE = 1_000_003  # steps apart, so (seed, step) pairs do not collide


def check_sampling(args) -> None:
    """A `UserError` for TRL sampling settings the backend does not implement."""
    if getattr(args, "top_k", 0) not in (0, None) or getattr(args, "min_p", None) is not None or getattr(args, "generation_kwargs", None):
        raise UserError("rl: the backend's rollouts sample with temperature, top_p and repetition_penalty only; top_k, min_p and generation_kwargs are not supported")


def decode_copy(model, dtype):
    """A copy of `model`'s weights in `dtype` as a plain module, for sampling: the policy under
    training is float32 behind accelerate's autocast and TRL's wrappers, and decoding through them
    costs 2x a plain bf16 model (the training computes in bf16 under autocast, so its samples come
    from the same matmul precision). Its weights are made anew each step, the policy's as they are now."""
    import torch
    from transformers.initialization import no_init_weights

    with no_init_weights(), torch.device(next(model.parameters()).device):
        copy = type(model)._from_config(model.config, dtype=dtype)
    copy.load_state_dict({k: v.detach() for k, v in model.state_dict().items()}, strict=True)  # copies into dtype
    copy.tie_weights()
    if getattr(model, "generation_config", None) is not None:
        copy.generation_config = model.generation_config
    return copy.eval()


def group_runs(prompt_ids: list[list[int]]) -> list[tuple[int, int]]:
    """(start, count) of each run of equal consecutive prompts (TRL repeats each prompt G times in a row)."""
    runs: list[tuple[int, int]] = []
    for i, ids in enumerate(prompt_ids):
        if runs and prompt_ids[runs[-1][0]] == ids:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((i, 1))
    return runs


class BackendRollouts:
    """Mixin for a TRL online trainer (RLOO, GRPO): sample the step's completions with the backend."""

    _rollout_prompts = None
    _rollout_note = False

    def _tokenize_prompts(self, prompts: list):
        self._rollout_prompts = prompts
        return super()._tokenize_prompts(prompts)

    def _backend_completions(self, prompt_ids: list[list[int]]) -> list[list[int]] | None:
        """Completion ids (with the end-of-turn token when a sample ended) per prompt row, or None
        where TRL's own path must sample (see the module docstring)."""
        import torch
        from trl.models.utils import unwrap_model_for_generation

        from .backends import GenerationParams
        from .backends.hf import HFBackend

        convs = self._rollout_prompts
        self._rollout_prompts = None
        if convs is None or len(convs) != len(prompt_ids) or getattr(self, "tools", None):
            return None
        with (
            unwrap_model_for_generation(self.model_wrapped, self.accelerator, gather_deepspeed3_params=self.args.ds3_gather_for_generation,
                                        gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs) as policy,
            torch.no_grad(),
            self._dist.summon_full_params(self.model_wrapped, recurse=False),
        ):
            was_training = policy.training
            plain = self.args.bf16 and policy.device.type == "cpu" and not hasattr(policy, "peft_config")
            sampler = decode_copy(policy, torch.bfloat16) if plain else policy
            backend = HFBackend.from_model(sampler, self.processing_class, name="policy", batch_size=len(prompt_ids))
            try:
                why = self._cannot_reproduce(backend, convs, prompt_ids)
                if why:
                    if not self._rollout_note:
                        print(f"[rl] rollouts through HF generate: {why}", file=sys.stderr)
                        self._rollout_note = True
                    return None
                eos = next(iter(backend.eos_ids))
                seed = self.args.seed + SEED_STRIDE * self.state.global_step + 7919 * self.accelerator.process_index
                out: list[list[int]] = [[] for _ in prompt_ids]
                runs = group_runs(prompt_ids)
                for n in sorted({c for _, c in runs}):
                    starts = [s for s, c in runs if c == n]
                    params = GenerationParams(max_new_tokens=self.max_completion_length, temperature=self.temperature,
                                              top_p=self.top_p, repetition_penalty=self.repetition_penalty, n=n, seed=seed)
                    samples = backend.generate_ids([convs[s] for s in starts], params)
                    for k, s in enumerate(starts):
                        for j in range(n):
                            ids = list(samples[k * n + j])
                            out[s + j] = ids + [eos] if len(ids) < self.max_completion_length else ids
                return out
            finally:
                policy.train(was_training)  # the backend puts the model in eval mode

    @staticmethod
    def _cannot_reproduce(backend, convs, prompt_ids) -> str | None:
        if len(backend.eos_ids) != 1:
            return f"the model has {len(backend.eos_ids)} end-of-turn tokens"
        for conv, ids in zip(convs, prompt_ids):
            if not isinstance(conv, (str, list)) or (isinstance(conv, list) and any(not isinstance(m.get("content"), str) for m in conv)):
                return "multimodal prompts"
            if backend.tokenizer(backend.render_chat(conv), add_special_tokens=False)["input_ids"] != list(ids):
                return "the backend tokenises a prompt differently from TRL"
        return None


class RLOOBackendRollouts(BackendRollouts):
    def _generate_single_turn(self, prompt_ids, images, multimodal_fields):
        if images is None:
            out = self._backend_completions(prompt_ids)
            if out is not None:
                return out
        return super()._generate_single_turn(prompt_ids, images, multimodal_fields)


class GRPOBackendRollouts(BackendRollouts):
    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        if images is None:
            out = self._backend_completions(prompt_ids)
            if out is not None:
                return out, None  # no sampling log-probs: TRL computes the policy's itself, as on its generate path
        return super()._generate_single_turn(prompt_ids, images, multimodal_fields, num_generations, has_tool_images)
