"""The Mixtral-Instruct chat template, written into tokenizer_config.json (hf) and tokenizer.chat_template (GGUF)
by --instruct."""

# The Mixtral instruction format (docs/formats.md, "The instruction format"):
#   BOS + tok("[INST]") + tok(user_1) + tok("[/INST]") + tok(answer_1) + EOS + ... + tok("[INST]") + tok(user_N)
#   + tok("[/INST]"),
# where tok is SentencePiece's encode, which prefixes each call's text with a space. The rendered string joins the
# parts with single spaces, so that the space tokenizer.json's normalizer turns into "▁" stands where each tok call
# would put its prefix. Empty content gets no space (tok("") is empty). The text after a special token starts a new
# segment that gets its own prefix, so nothing is written between </s> and [INST], or between <s> and [INST].
# apply_chat_template tokenizes with add_special_tokens=False, so the template writes BOS itself.
CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['role'] not in ['user', 'assistant'] %}"
    "{{- raise_exception('Unsupported role ' ~ message['role'] ~ ': the Mixtral instruction format has only user "
    "and assistant messages') }}"
    "{%- endif %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/... starting with user') }}"
    "{%- endif %}"
    "{%- if message['content'] is not string %}"
    "{{- raise_exception('Message content must be a string') }}"
    "{%- endif %}"
    "{%- if message['role'] == 'user' %}"
    "{{- '[INST]' }}"
    "{%- if message['content'] %}{{- ' ' + message['content'] }}{%- endif %}"
    "{{- ' [/INST]' }}"
    "{%- else %}"
    "{%- if message['content'] %}{{- ' ' + message['content'] }}{%- endif %}"
    "{{- eos_token }}"
    "{%- endif %}"
    "{%- endfor %}"
)
