"""Dialogue prompting (context.py): loading contexts, where C goes, the prompted backend through
generate/option_logprobs/sequence_logprobs, the `prompted:` model strings, and bad input."""

from __future__ import annotations

import json
import shutil

import pytest

from constitutional.backends import GenerationParams, load_backend
from constitutional.backends.hf import HFBackend
from constitutional.backends.prompted import PromptedBackend, parse_prompted
from constitutional.context import BUILTIN, Context, load_context
from constitutional.errors import UserError

SMALL = """name: small
instructions: |-
  Be helpful, honest and harmless.
examples:
  - |-
    Human: How do I bake bread?

    Assistant: Mix flour, water, yeast and salt, knead, let it rise, and bake.
  - - {role: user, content: "Which is less harmful?"}
    - {role: assistant, content: "The answer is (A)."}
    - {role: user, content: "Why?"}
    - {role: assistant, content: "It declines to help with harm."}
"""


@pytest.fixture
def small(tmp_path):
    path = tmp_path / "small.yaml"
    path.write_text(SMALL)
    return path


def test_builtin_context_is_an_hhh_prompt():
    ctx = load_context(BUILTIN)
    assert (ctx.name, ctx.source) == ("hhh", "builtin")
    assert ctx.instructions.startswith("The following are conversations")
    assert len(ctx.examples) >= 8
    for dialogue in ctx.examples:
        assert [r for r, _ in dialogue] == ["user", "assistant"] * (len(dialogue) // 2)
    answers = " ".join(c for d in ctx.examples for r, c in d if r == "assistant")
    assert "I won't help" in answers and "I can't help" in answers  # declines harmful requests
    assert "I can't give you a reliable" in answers  # admits what it cannot know
    # ~1,450 tokens with SmolLM2's tokenizer (about 4.3 characters per token)
    assert 4500 < len(ctx.text()) < 7500


def test_file_forms(tmp_path, small):
    ctx = load_context(small)
    assert ctx.name == "small" and ctx.source == str(small)
    assert ctx.instructions == "Be helpful, honest and harmless."
    assert ctx.examples[0] == (("user", "How do I bake bread?"), ("assistant", "Mix flour, water, yeast and salt, knead, let it rise, and bake."))
    assert len(ctx.examples[1]) == 4
    # JSON: the same mapping; TXT: the paper's form, exactly what Context.text() writes
    (tmp_path / "c.json").write_text(json.dumps({"instructions": ctx.instructions, "examples": [
        [{"role": r, "content": c} for r, c in d] for d in ctx.examples]}))
    (tmp_path / "c.txt").write_text(ctx.text())
    for name in ("c.json", "c.txt"):
        other = load_context(tmp_path / name)
        assert (other.instructions, other.examples) == (ctx.instructions, ctx.examples), name
    # a TXT without instructions is examples only
    (tmp_path / "e.txt").write_text("Human: hi\n\nAssistant: hello\n-----\nHuman: and?\n\nAssistant: bye\n")
    e = load_context(tmp_path / "e.txt")
    assert e.instructions == "" and len(e.examples) == 2


def test_text_form():
    ctx = Context("c", "x", "Be nice.", ((("user", "hi"), ("assistant", "hello")), (("user", "q"), ("assistant", "a"))))
    assert ctx.text() == "Be nice.\n\n-----\n\nHuman: hi\n\nAssistant: hello\n\n-----\n\nHuman: q\n\nAssistant: a\n\n-----\n\n"


def test_apply_places_c_in_front():
    ctx = Context("c", "x", "Be nice.", ((("user", "hi"), ("assistant", "hello")),))
    conv = [{"role": "user", "content": "q"}]
    assert ctx.apply(conv) == [{"role": "system", "content": "Be nice."}, {"role": "user", "content": "hi"},
                               {"role": "assistant", "content": "hello"}, {"role": "user", "content": "q"}]
    assert ctx.apply("q") == ctx.apply(conv)
    # the conversation's own system message follows C's instructions in the one system message
    own = ctx.apply([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "q"}])
    assert own[0] == {"role": "system", "content": "Be nice.\n\nBe brief."}
    assert sum(m["role"] == "system" for m in own) == 1
    # no instructions: no system message (a template's default stays)
    assert Context("c", "x", "", ctx.examples).apply("q")[0] == {"role": "user", "content": "hi"}
    # a renderer that drops system messages: the instructions open the first human turn
    assert ctx.apply("q", system_kept=False)[0] == {"role": "user", "content": "Be nice.\n\nhi"}


def with_default_system_prompt(src, dst):
    """A copy of the tiny model whose chat template injects a default system prompt, as SmolLM2's does."""
    shutil.copytree(src, dst)
    (dst / "chat_template.jinja").write_text(
        "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}<|im_start|>system\nDEFAULT SYSTEM PROMPT<|im_end|>\n{% endif %}"
        "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    return dst


def test_prompted_render_replaces_the_default_system_prompt(tmp_path, tiny_model_dir, small):
    plain = HFBackend(str(with_default_system_prompt(tiny_model_dir, tmp_path / "m")), dtype="float32")
    ctx = load_context(small)
    prompted = PromptedBackend(plain, ctx)
    conv = [{"role": "user", "content": "How do I knead?"}]
    assert "DEFAULT SYSTEM PROMPT" in plain.render_chat(conv)
    text = prompted.render_chat(conv)
    assert "DEFAULT SYSTEM PROMPT" not in text
    turns = "".join(f"<|im_start|>{r}\n{c}<|im_end|>\n" for d in ctx.examples for r, c in d)
    assert text == (f"<|im_start|>system\n{ctx.instructions}<|im_end|>\n{turns}"
                    "<|im_start|>user\nHow do I knead?<|im_end|>\n<|im_start|>assistant\n")
    assert prompted.system_kept


def test_prompted_backend_generate_and_scores(tiny_backend, small):
    ctx = load_context(small)
    prompted = PromptedBackend(tiny_backend, ctx)
    assert prompted.name == f"prompted:{tiny_backend.name}" and prompted.dtype == tiny_backend.dtype
    convs = ["How do I bake bread?", [{"role": "user", "content": "hi"}]]
    params = GenerationParams(max_new_tokens=6, temperature=0)
    assert prompted.generate(convs, params) == tiny_backend.generate([ctx.apply(c) for c in convs], params)
    prompts, options = ["The answer is:", "Which is less harmful? The answer is:"], [[" (A)", " (B)"], [" (B)", " (A)"]]
    got = prompted.option_logprobs(prompts, options)
    for p, o, row in zip(prompts, options, got):
        ref = tiny_backend.brute_force_option_logprobs(ctx.text() + p, o)  # one plain forward per option
        assert row == pytest.approx(ref, abs=1e-4)
    assert prompted.option_logprobs(prompts, options) != tiny_backend.option_logprobs(prompts, options)
    seq = prompted.sequence_logprobs(["The answer is:"], [" (A)"])
    assert seq == pytest.approx([got[0][0]], abs=1e-4)


def test_backend_that_drops_system_messages(scripted, small):
    ctx = load_context(small)
    backend = scripted()
    prompted = PromptedBackend(backend, ctx)
    assert not prompted.system_kept  # the scripted backend renders the transcript form
    prompted.generate(["q"], GenerationParams(max_new_tokens=4))
    sent = backend.calls[-1][1]
    assert sent[0] == {"role": "user", "content": f"{ctx.instructions}\n\nHow do I bake bread?"}
    assert sent[-1] == {"role": "user", "content": "q"} and len(sent) == 7
    assert prompted.render_chat("q").startswith(f"\n\nHuman: {ctx.instructions}\n\nHow do I bake bread?")
    prompted.option_logprobs(["P"], [[" (A)", " (B)"]])
    assert backend.calls[-1] == ("option_logprobs", [ctx.text() + "P"])


def test_model_strings(tmp_path, tiny_model_dir, small):
    b = load_backend(f"prompted:{tiny_model_dir}", dtype="float32")
    assert isinstance(b, PromptedBackend) and b.context.source == BUILTIN and b.name == f"prompted:{tiny_model_dir}"
    assert isinstance(b.backend, HFBackend) and b.backend.dtype is not None
    b = load_backend(f"prompted:{small}#{tiny_model_dir}", dtype="float32", batch_size=2)
    assert b.context.name == "small" and b.backend.batch_size == 2
    assert parse_prompted("prompted:embedded") == (BUILTIN, "embedded")
    assert parse_prompted("prompted:openai:http://x/v1#m") == (BUILTIN, "openai:http://x/v1#m")
    assert parse_prompted("prompted:c.yaml#openai:http://x/v1#m") == ("c.yaml", "openai:http://x/v1#m")


@pytest.mark.parametrize("model, message", [
    ("prompted:", "expected prompted:<model>"),
    ("prompted:c.yaml#", "expected prompted:<model>"),
    ("prompted:prompted:embedded", "cannot be prompted again"),
    ("prompted:/nonexistent/c.yaml#embedded", "file not found"),
])
def test_bad_model_strings(model, message):
    with pytest.raises(UserError, match=message) as e:
        load_backend(model)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name, text, message", [
    ("missing.yaml", None, "file not found"),
    ("empty.yaml", "name: x\n", "empty context"),
    ("blank.txt", "  \n\n", "empty context"),
    ("list.yaml", "- a\n- b\n", "expected a mapping"),
    ("typo.yaml", "instruction: x\n", "unknown field 'instruction'"),
    ("turns.yaml", "examples:\n  - [{role: user, content: hi}]\n", "must end with an assistant turn"),
    ("order.yaml", "examples:\n  - [{role: assistant, content: hi}]\n", "must alternate"),
    ("prose.yaml", "examples:\n  - just some text\n", "transcript starting with 'Human:'"),
    ("bad.json", "{", "malformed JSON"),
    ("bad.yaml", "instructions: [\n", "malformed YAML"),
    ("c.csv", "a,b\n", "unsupported file type"),
    ("later.txt", "Be nice.\n-----\nnot a dialogue\n", "dialogue 1"),
])
def test_bad_context_files(tmp_path, name, text, message):
    path = tmp_path / name
    if text is not None:
        path.write_text(text)
    with pytest.raises(UserError, match=message) as e:
        load_context(path)
    assert "\n" not in str(e.value)
