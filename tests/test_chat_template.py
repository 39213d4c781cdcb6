"""presets.models.chat_template renders a model folder's chat template as transformers' apply_chat_template does.

Each tokenizer folder is made here (a tokenizer trained on the bundled corpus), so nothing is downloaded.
"""

import json
import os
import shutil
from datetime import datetime

import jinja2
import pytest
from tokenizers import Tokenizer
from transformers import AutoTokenizer

from presets.models.chat_template import ChatTemplate, ChatTemplateError, load_chat_template
from presets.tools.tiny_hf import LLAMA2_CHAT_TEMPLATE, train_tokenizer

LLAMA2_SPECIAL = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}

# Meta's Llama-2-chat template: refuses a conversation whose roles do not alternate
ALTERNATING_ROLES_MESSAGE = "Conversation roles must alternate user/assistant/user/assistant/..."
LLAMA2_STRICT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('" + ALTERNATING_ROLES_MESSAGE + "') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)

# SmolLM2's ChatML (Qwen's is alike), written as literal text between block tags on their own lines: it renders as
# the one-line original only with trim_blocks (newline after a tag) and lstrip_blocks (indent before a tag)
CHATML_TEMPLATE = """\
{% for message in messages %}
    {% if loop.first and messages[0]['role'] != 'system' %}
<|im_start|>system
You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>
    {% endif %}
<|im_start|>{{ message['role'] }}
{{ message['content'] }}<|im_end|>
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}
"""

# Meta-Llama-3-8B-Instruct's template
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

# Tool-calling style: a namespace carried out of a loop, tojson (with and without indent), loop.last, continue/break
TOJSON_TEMPLATE = """\
{% set ns = namespace(system='(none)', turns=0) %}
{% for m in messages %}
    {% if m['role'] == 'system' %}
        {% set ns.system = m['content'] %}
        {% continue %}
    {% endif %}
    {% set ns.turns = ns.turns + 1 %}
{% endfor %}
<|system|>{{ ns.system }} turns={{ ns.turns }}
{% for m in messages %}
    {% if m['role'] == 'system' %}{% continue %}{% endif %}
    {% if m['role'] == 'stop' %}{% break %}{% endif %}
<|{{ m['role'] }}|>{{ m | tojson }}
    {% if m['tool_calls'] is defined %}{{ m['tool_calls'] | tojson(indent=2) }}{% endif %}
    {% if not loop.last %}<|sep|>{% endif %}
{% endfor %}
{% if add_generation_prompt %}<|assistant|>{% endif %}
"""

CHATML_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
LLAMA3_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
TOJSON_TOKENS = ["<|unk|>", "<|system|>", "<|user|>", "<|assistant|>", "<|sep|>"]

# name: (template, named special tokens, all the added tokens the tokenizer is trained with)
TEMPLATES = {
    "llama2": (LLAMA2_CHAT_TEMPLATE, LLAMA2_SPECIAL, ["<unk>", "<s>", "</s>"]),
    "llama2-strict": (LLAMA2_STRICT_TEMPLATE, LLAMA2_SPECIAL, ["<unk>", "<s>", "</s>"]),
    "chatml": (
        CHATML_TEMPLATE,
        {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
        CHATML_TOKENS,
    ),
    "llama3": (LLAMA3_TEMPLATE, {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}, LLAMA3_TOKENS),
    "tojson": (
        TOJSON_TEMPLATE,
        {
            "bos_token": "<|system|>",
            "eos_token": "<|sep|>",
            "unk_token": "<|unk|>",
            "mask_token": "<|user|>",
            "cls_token": "<|assistant|>",
        },
        TOJSON_TOKENS,
    ),
}

DIALOGS = {
    "user-only": [{"role": "user", "content": "Hello!"}],
    "with-system": [
        {"role": "system", "content": "You answer in one sentence."},
        {"role": "user", "content": "What is a tokenizer?"},
    ],
    "multi-turn": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a prime."},
        {"role": "assistant", "content": " 7 \n"},
        {"role": "user", "content": "  And an even one?  "},
    ],
    "unicode": [
        {"role": "user", "content": "Grüße 👋 — 你好! <b>\"quotes\" & 'apostrophes'</b>\n\ttab"},
        {"role": "assistant", "content": "Ça va 🙂"},
        {"role": "user", "content": "ありがとう 🎉🎉"},
    ],
}

# Keys whose value is None are dropped before rendering (OpenAI clients send content=None with tool calls)
TOOL_CALL_DIALOG = [
    {"role": "user", "content": "Weather in Paris?", "name": None},
    {"role": "assistant", "content": None, "tool_calls": [{"name": "weather", "arguments": {"city": "Paris"}}]},
    {"role": "tool", "content": '{"temp": 21}'},
    {"role": "stop", "content": "never rendered"},
    {"role": "user", "content": "never rendered either"},
]


def write_folder(path, template: str, special: dict[str, str], added: list[str]) -> str:
    """A tokenizer folder as transformers saves it, with `template` as its chat template."""
    tokenizer = train_tokenizer(added)
    for name, token in special.items():
        setattr(tokenizer, name, token)
    tokenizer.chat_template = template
    tokenizer.save_pretrained(path)
    return str(path)


def move_template_to_config(folder: str, template: str, special: dict[str, str]) -> str:
    """The older layout, by hand: the template in tokenizer_config.json, special tokens as AddedToken objects."""
    os.remove(os.path.join(folder, "chat_template.jinja"))
    config = read_config(folder)
    config["chat_template"] = template
    config.update(
        {name: {"__type": "AddedToken", "content": token, "special": True} for name, token in special.items()}
    )
    write_config(folder, config)
    return folder


def read_config(folder: str) -> dict:
    with open(os.path.join(folder, "tokenizer_config.json"), encoding="utf-8") as f:
        return json.load(f)


def write_config(folder: str, config: dict) -> None:
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f)


def copy_folder(src: str, dst) -> str:
    shutil.copytree(src, dst, dirs_exist_ok=True)
    return str(dst)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """{(template name, "jinja" | "config"): folder}, each made once for this module."""
    made = {}
    for name, (template, special, added) in TEMPLATES.items():
        made[name, "jinja"] = write_folder(tmp_path_factory.mktemp(name), template, special, added)
        config_folder = copy_folder(made[name, "jinja"], tmp_path_factory.mktemp(name + "-config"))
        made[name, "config"] = move_template_to_config(config_folder, template, special)
    return made


def input_ids(encoding):
    """apply_chat_template(tokenize=True)'s ids, whether it returned a list or a BatchEncoding."""
    return encoding["input_ids"] if not isinstance(encoding, list) else encoding


def test_transformers_saves_the_template_as_chat_template_jinja_not_in_tokenizer_config(folders):
    folder = folders["chatml", "jinja"]
    with open(os.path.join(folder, "chat_template.jinja"), encoding="utf-8") as f:
        assert f.read() == CHATML_TEMPLATE
    assert "chat_template" not in read_config(folder)


@pytest.mark.parametrize("dialog", DIALOGS)
@pytest.mark.parametrize("source", ["jinja", "config"])
@pytest.mark.parametrize("template", TEMPLATES)
def test_render_gives_the_text_and_token_ids_of_transformers_apply_chat_template(folders, template, source, dialog):
    folder = folders[template, source]
    messages = DIALOGS[dialog]
    ours = load_chat_template(folder).render(messages, add_generation_prompt=True)
    hf = AutoTokenizer.from_pretrained(folder)
    assert ours == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = Tokenizer.from_file(os.path.join(folder, "tokenizer.json")).encode(ours, add_special_tokens=False).ids
    assert ids == input_ids(hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True))


@pytest.mark.parametrize("template", ["chatml", "llama3", "tojson"])
def test_without_generation_prompt_the_text_matches_transformers_and_lacks_the_assistant_header(folders, template):
    folder = folders[template, "jinja"]
    messages = DIALOGS["multi-turn"]
    ours = load_chat_template(folder).render(messages, add_generation_prompt=False)
    hf = AutoTokenizer.from_pretrained(folder)
    assert ours == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert ours != load_chat_template(folder).render(messages, add_generation_prompt=True)


def test_chatml_adds_the_default_system_message_and_the_assistant_header(folders):
    text = load_chat_template(folders["chatml", "jinja"]).render(DIALOGS["user-only"])
    assert text == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n"
    )


def test_llama3_starts_with_bos_and_trims_content(folders):
    text = load_chat_template(folders["llama3", "config"]).render([{"role": "user", "content": "  hi \n"}])
    assert text == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_tojson_does_not_escape_html_or_non_ascii_and_none_valued_keys_are_dropped(folders):
    folder = folders["tojson", "jinja"]
    ours = load_chat_template(folder).render(TOOL_CALL_DIALOG)
    assert ours == AutoTokenizer.from_pretrained(folder).apply_chat_template(
        TOOL_CALL_DIALOG, tokenize=False, add_generation_prompt=True
    )
    assert '<|assistant|>{"role": "assistant", "tool_calls": [{"name": "weather"' in ours  # content=None is gone
    assert '"arguments": {\n      "city": "Paris"' in ours  # tojson(indent=2)
    assert "never rendered" not in ours  # {% break %}
    unicode = load_chat_template(folder).render(DIALOGS["unicode"])
    assert "<b>\\\"quotes\\\" & 'apostrophes'</b>" in unicode and "👋" in unicode and "ありがとう" in unicode


def test_generation_tags_for_training_masks_render_their_body_as_in_transformers(folders, tmp_path):
    folder = copy_folder(folders["chatml", "jinja"], tmp_path)
    (tmp_path / "chat_template.jinja").write_text(
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}{% if m['role'] == 'assistant' %}"
        "{%- generation -%}\n  {{ m['content'] + '<|im_end|>' }}\n{%- endgeneration %}{% else %}"
        "{{ m['content'] + '<|im_end|>' }}{% endif %}{{ '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    hf = AutoTokenizer.from_pretrained(folder)
    for messages in DIALOGS.values():
        ours = load_chat_template(folder).render(messages)
        assert ours == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>assistant\n 7 \n<|im_end|>\n" in load_chat_template(folder).render(DIALOGS["multi-turn"])


def test_raise_exception_in_the_template_becomes_chat_template_error_with_its_message(folders):
    folder = folders["llama2-strict", "jinja"]
    messages = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(ChatTemplateError) as ours:
        load_chat_template(folder).render(messages)
    assert str(ours.value) == ALTERNATING_ROLES_MESSAGE
    with pytest.raises(jinja2.TemplateError, match=r"^Conversation roles must alternate user/assistant"):
        AutoTokenizer.from_pretrained(folder).apply_chat_template(messages, tokenize=False)


@pytest.mark.parametrize(
    "source", ["{% for m in messages %}{{ m }}", "{{ messages[0]['content'] }", "line one\n{% if %}{% endif %}"]
)
def test_a_template_syntax_error_is_chat_template_error_at_load_on_one_line(source):
    with pytest.raises(ChatTemplateError, match="syntax error on line") as e:
        ChatTemplate(source, {})
    assert "\n" not in str(e.value)


def test_load_reports_a_broken_chat_template_jinja_as_chat_template_error(tmp_path):
    (tmp_path / "chat_template.jinja").write_text("{% if messages %}unclosed")
    with pytest.raises(ChatTemplateError, match="syntax error on line 1: .*endif"):
        load_chat_template(str(tmp_path))


@pytest.mark.parametrize(
    "source",
    [
        "{{ messages.__class__.__mro__ }}",
        "{{ ''.__class__.__subclasses__() }}",
        "{{ messages[0].__class__.__base__.__subclasses__() }}",
        "{{ messages.append({'role': 'user'}) }}",  # the immutable sandbox: no mutating the caller's list
        "{{ raise_exception.__globals__['os'] }}",
    ],
)
def test_the_sandbox_refuses_unsafe_access_with_chat_template_error(source):
    messages = [{"role": "user", "content": "x"}]
    with pytest.raises(ChatTemplateError, match="unsafe") as e:
        ChatTemplate(source, {}).render(messages)
    assert isinstance(e.value.__cause__, jinja2.exceptions.SecurityError)
    assert messages == [{"role": "user", "content": "x"}]


def test_a_template_bug_at_render_is_chat_template_error():
    with pytest.raises(ChatTemplateError, match="TypeError"):
        ChatTemplate("{{ 1 + messages[0]['content'] }}", {}).render([{"role": "user", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="undefined"):
        ChatTemplate("{{ nothing.here }}", {}).render([])


def test_load_returns_none_for_a_folder_without_a_template(tmp_path):
    assert load_chat_template(str(tmp_path)) is None
    tokenizer = train_tokenizer(["<s>", "</s>"])
    tokenizer.bos_token, tokenizer.eos_token = "<s>", "</s>"
    tokenizer.save_pretrained(tmp_path)
    assert os.path.isfile(tmp_path / "tokenizer_config.json")
    assert load_chat_template(str(tmp_path)) is None


def test_a_list_of_named_templates_uses_the_one_named_default(folders, tmp_path):
    folder = copy_folder(folders["chatml", "config"], tmp_path)
    config = read_config(folder)
    config["chat_template"] = [
        {"name": "tool_use", "template": "TOOLS {{ messages | length }}"},
        {"name": "default", "template": CHATML_TEMPLATE},
        {"name": "rag", "template": "RAG"},
    ]
    write_config(folder, config)
    messages = DIALOGS["with-system"]
    ours = load_chat_template(folder).render(messages)
    assert ours.startswith("<|im_start|>system\nYou answer in one sentence.<|im_end|>\n")
    assert ours == AutoTokenizer.from_pretrained(folder).apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    config["chat_template"] = [{"name": "tool_use", "template": "TOOLS"}]
    write_config(folder, config)
    with pytest.raises(ChatTemplateError, match="'default'"):
        load_chat_template(folder)


def test_chat_template_jinja_wins_over_tokenizer_config_as_in_transformers(folders, tmp_path):
    folder = copy_folder(folders["chatml", "config"], tmp_path)
    (tmp_path / "chat_template.jinja").write_text("FILE {{ messages[0]['content'] }}")
    messages = DIALOGS["user-only"]
    assert load_chat_template(folder).render(messages) == "FILE Hello!"
    assert AutoTokenizer.from_pretrained(folder).apply_chat_template(messages, tokenize=False) == "FILE Hello!"


def test_templates_see_every_special_token_the_config_names_as_transformers_does(folders, tmp_path):
    folder = copy_folder(folders["tojson", "config"], tmp_path)
    config = read_config(folder)
    config["image_token"] = "<|unk|>"  # model-specific tokens, like a vision model's, named either way
    config["extra_special_tokens"] = {"audio_token": "<|user|>"}
    config["pad_token"] = None
    config["chat_template"] = (
        "{{ bos_token }}|{{ eos_token }}|{{ unk_token }}|{{ mask_token }}|{{ cls_token }}|{{ image_token }}"
        "|{{ audio_token }}|{{ pad_token is defined }}|{{ tools }}|{{ documents }}"
    )
    write_config(folder, config)
    ours = load_chat_template(folder).render([])
    assert ours == "<|system|>|<|sep|>|<|unk|>|<|user|>|<|assistant|>|<|unk|>|<|user|>|False|None|None"
    hf = AutoTokenizer.from_pretrained(folder)
    assert ours == hf.apply_chat_template([{"role": "user", "content": ""}], tokenize=False)


def test_special_tokens_map_json_fills_tokens_the_config_lacks(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ bos_token }}{{ eos_token }}"}))
    (tmp_path / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": {"content": "<s>", "lstrip": False}, "eos_token": "</s>"})
    )
    assert load_chat_template(str(tmp_path)).render([]) == "<s></s>"


def test_strftime_now_gives_the_current_time_in_the_given_format():
    before = datetime.now().strftime("%d %b %Y")
    text = ChatTemplate("{{ strftime_now('%d %b %Y') }}", {}).render([])
    assert text in {before, datetime.now().strftime("%d %b %Y")}
