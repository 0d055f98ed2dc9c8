"""The chat-format module: rendering, loss masks, generation prompts."""

from __future__ import annotations

import copy

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from tunedesk.chat_format import (
    IGNORE_INDEX,
    ChatFormatError,
    PromptOptions,
    call_arguments,
    encode_conversation,
    encode_prompt,
    render_prompt,
    stop_token_ids,
)
from tunedesk.train.sample_data import generate_pairs
from tunedesk.train.tiny_base import TinyBaseConfig, build_tiny_base

# Qwen2.5-Instruct's template shape, written out by hand (default system prompt included),
# to check the mask logic on a template the project did not write for itself.
QWEN_STYLE_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

LLAMA3_STYLE_TEMPLATE = (
    "{{ '<|begin_of_text|>' }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' "
    "+ message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}"
)

CONVERSATION = [
    {"role": "system", "content": "你是基金客服。"},
    {"role": "user", "content": "申购费多少？"},
    {"role": "assistant", "content": "申购费为1.5%。"},
    {"role": "user", "content": "赎回呢？"},
    {"role": "assistant", "content": "持有7天以上0.5%。"},
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    pairs = generate_pairs(400, seed=3)
    texts = [p["prompt"] for p in pairs] + [p["completion"] for p in pairs]
    out = tmp_path_factory.mktemp("base") / "tiny"
    cfg = TinyBaseConfig(
        vocab_size=800,
        hidden_size=64,
        num_hidden_layers=1,
        num_attention_heads=1,
        num_key_value_heads=1,
        intermediate_size=128,
    )
    build_tiny_base(out, texts, cfg, log=lambda _: None)
    return AutoTokenizer.from_pretrained(out)


def trained_text(tok, enc) -> str:
    return tok.decode([t for t, m in zip(enc.input_ids, enc.loss_mask, strict=True) if m])


def test_chatml_render_is_exact(tokenizer):
    enc = encode_conversation(tokenizer, CONVERSATION)
    assert enc.text == (
        "<|im_start|>system\n你是基金客服。<|im_end|>\n"
        "<|im_start|>user\n申购费多少？<|im_end|>\n"
        "<|im_start|>assistant\n申购费为1.5%。<|im_end|>\n"
        "<|im_start|>user\n赎回呢？<|im_end|>\n"
        "<|im_start|>assistant\n持有7天以上0.5%。<|im_end|>\n"
    )
    # Tokens round-trip to the rendered text.
    assert tokenizer.decode(enc.input_ids) == enc.text


def test_mask_covers_exactly_the_answers_and_their_end_token(tokenizer):
    enc = encode_conversation(tokenizer, CONVERSATION)
    assert trained_text(tokenizer, enc) == "申购费为1.5%。<|im_end|>持有7天以上0.5%。<|im_end|>"
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    # Each answer's last trained token is <|im_end|>; the newline after it is not trained.
    ends = [i for i, t in enumerate(enc.input_ids) if t == im_end and enc.loss_mask[i]]
    assert len(ends) == 2
    for i in ends:
        assert enc.loss_mask[i + 1] == 0
    labels = enc.labels
    assert all(
        (lab == IGNORE_INDEX) == (m == 0) for lab, m in zip(labels, enc.loss_mask, strict=True)
    )


def test_weight_zero_turns_are_not_trained(tokenizer):
    conv = copy.deepcopy(CONVERSATION)
    conv[2]["weight"] = 0
    enc = encode_conversation(tokenizer, conv)
    assert trained_text(tokenizer, enc) == "持有7天以上0.5%。<|im_end|>"


def test_generation_prompt_plus_answer_is_the_training_text(tokenizer):
    prompt = render_prompt(tokenizer, CONVERSATION[:4])
    full = encode_conversation(tokenizer, CONVERSATION).text
    assert prompt.endswith("<|im_start|>assistant\n")
    assert full == prompt + "持有7天以上0.5%。<|im_end|>\n"
    ids = encode_prompt(tokenizer, CONVERSATION[:4])
    assert ids == encode_conversation(tokenizer, CONVERSATION).input_ids[: len(ids)]
    assert stop_token_ids(tokenizer)[0] == tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_a_finished_conversation_opens_a_new_turn_or_continues_the_last(tokenizer):
    """As OpenAI and vLLM take a conversation that ends with the assistant: a new assistant
    turn follows it, or with `continue_final_message` the last answer is left open."""
    finished = render_prompt(tokenizer, CONVERSATION)
    assert finished == encode_conversation(tokenizer, CONVERSATION).text + "<|im_start|>assistant\n"
    started = [*CONVERSATION[:-1], {**CONVERSATION[-1], "content": "申购费为"}]
    opened = render_prompt(
        tokenizer,
        started,
        options=PromptOptions(add_generation_prompt=False, continue_final_message=True),
    )
    assert opened.endswith("<|im_start|>assistant\n申购费为")
    with pytest.raises(ChatFormatError, match="can't both be true"):
        render_prompt(tokenizer, started, options=PromptOptions(continue_final_message=True))
    with pytest.raises(ChatFormatError, match="last message to be the assistant"):
        render_prompt(
            tokenizer,
            CONVERSATION[:-1],
            options=PromptOptions(add_generation_prompt=False, continue_final_message=True),
        )


def test_qwen_style_handwritten_template(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = QWEN_STYLE_TEMPLATE
    conv = [
        {"role": "user", "content": "货币基金多久到账？"},
        {"role": "assistant", "content": "一般T+1到账。"},
    ]
    enc = encode_conversation(tok, conv)
    assert enc.text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n货币基金多久到账？<|im_end|>\n"
        "<|im_start|>assistant\n一般T+1到账。<|im_end|>\n"
    )
    assert trained_text(tok, enc) == "一般T+1到账。<|im_end|>"


def test_llama3_style_template_uses_its_own_end_of_turn(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.add_special_tokens(
        {
            "additional_special_tokens": [
                "<|begin_of_text|>",
                "<|start_header_id|>",
                "<|end_header_id|>",
                "<|eot_id|>",
            ]
        }
    )
    tok.chat_template = LLAMA3_STYLE_TEMPLATE
    tok.eos_token = "<|eot_id|>"
    enc = encode_conversation(tok, CONVERSATION[1:3])
    assert trained_text(tok, enc) == "申购费为1.5%。<|eot_id|>"


def test_tool_calls_render_and_train(tokenizer):
    conv = [
        {"role": "user", "content": "查一下960101的净值"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "get_nav", "arguments": '{"code": "960101"}'},
                }
            ],
        },
        {"role": "tool", "content": '{"nav": 1.2345}', "tool_call_id": "c1"},
        {"role": "assistant", "content": "最新净值为1.2345。"},
    ]
    tools = [{"type": "function", "function": {"name": "get_nav", "parameters": {}}}]
    enc = encode_conversation(tokenizer, conv, tools=tools)
    assert (
        "<tools>" in enc.text and '<tool_response>\n{"nav": 1.2345}\n</tool_response>' in enc.text
    )
    assert trained_text(tokenizer, enc) == (
        '<tool_call>\n{"name": "get_nav", "arguments": {"code": "960101"}}\n</tool_call>'
        "<|im_end|>最新净值为1.2345。<|im_end|>"
    )


def test_call_arguments_train_in_the_spelling_they_are_served_with(tokenizer):
    """Compact, spaced or inline arguments all render as the template's `tojson` writes them:
    the text serving renders a call in and holds a forced call to."""

    def trained_call(arguments):
        call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": arguments}}
        conv = [
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": "", "tool_calls": [call]},
        ]
        return trained_text(tokenizer, encode_conversation(tokenizer, conv))

    spaced = trained_call('{"基金": "960101", "n": [1, 2]}')
    assert '"arguments": {"基金": "960101", "n": [1, 2]}}' in spaced
    assert trained_call('{"基金":"960101","n":[1,2]}') == spaced
    assert trained_call({"基金": "960101", "n": [1, 2]}) == spaced
    # vLLM's rule for what is not an object: it reads as {}.
    for odd in ("", None, "[1]", "not json"):
        assert '"arguments": {}}' in trained_call(odd)
    assert call_arguments('{"a":1}') == {"a": 1} and call_arguments("42") == {}


def test_tiny_base_loads_and_round_trips(tokenizer, tmp_path_factory):
    path = tokenizer.name_or_path
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.model_type == "qwen2"
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in model.generation_config.eos_token_id
    ids = encode_prompt(tokenizer, CONVERSATION[:2])
    out = model.generate(
        input_ids=__import__("torch").tensor([ids]), max_new_tokens=5, do_sample=False
    )
    assert out.shape[1] > len(ids)
