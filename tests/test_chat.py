"""qwenjax.chat: transformers' chat-template ids, assistant masks against transformers' own, records, DPO as TRL."""

import json
import os

import jinja2
import numpy as np
import pytest
import transformers

import hf_utils
from qwenjax import chat
from qwenjax import tokenizer

# Qwen2-Instruct's chat template, as its tokenizer_config.json holds it.
QWEN2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\n"
    "You are a helpful assistant.<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>"
    "assistant\\n' }}{% endif %}")

# Qwen2.5-Instruct's chat template: the system-prompt default, tools, tool calls and tool responses.
_QWEN25_HEAD = ('''{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n'''
                '''You are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within '''
                '''<tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": '''
                '''<args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
''')
_QWEN25_TURNS = ('''    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or '''
                 '''(message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
''')
_QWEN25_TAIL = '''    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
'''
QWEN25_TEMPLATE = _QWEN25_HEAD + _QWEN25_TURNS + _QWEN25_TAIL

# The same templates with what the mask must cover (the assistant's content and tool calls, and the <|im_end|> that
# closes its turn) marked for transformers' return_assistant_tokens_mask: the independent reference of the masks.
QWEN2_TAGGED = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\n"
    "You are a helpful assistant.<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n'}}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}"
    "{% endgeneration %}{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
_QWEN25_TAGGED_TURNS = '''    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" and not message.tool_calls %}
        {{- '<|im_start|>' + message.role + '\\n' }}
        {%- generation %}{{- message.content + '<|im_end|>' }}{%- endgeneration %}
        {{- '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role + '\\n' }}
        {%- generation %}
        {%- if message.content %}
            {{- message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {%- if message.content or not loop.first %}
                {{- '\\n' }}
            {%- endif %}
            {{- '<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>' }}
        {%- endgeneration %}
        {{- '\\n' }}
'''
QWEN25_TAGGED = _QWEN25_HEAD + _QWEN25_TAGGED_TURNS + _QWEN25_TAIL

# Refuses roles other than system, user and assistant, as many templates do.
STRICT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('Conversation roles must be system, user or assistant, not ' + message['role']) }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")

# Rewrites the assistant's content as Qwen3's template does: a <think> block moves out of the content and is written
# for the last turn only; the rest is trimmed.
REWRITING_TEMPLATE = (
    "{% for message in messages %}{% set content = message['content'] %}{% if message['role'] == 'assistant' %}"
    "{% set reasoning = '' %}{% if '</think>' in content %}"
    "{% set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\\n') %}"
    "{% set content = content.split('</think>')[-1].lstrip('\\n') %}{% endif %}{{ '<|im_start|>assistant\\n' }}"
    "{% if loop.last %}{{ '<think>\\n' + reasoning + '\\n</think>\\n\\n' }}{% endif %}"
    "{{ content | trim }}{{ '<|im_end|>\\n' }}{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")

WEATHER_TOOL = {'type': 'function', 'function': {
    'name': 'get_weather', 'description': 'The weather in a city.',
    'parameters': {'type': 'object', 'properties': {'city': {'type': 'string'}}, 'required': ['city']}}}


def user(text):
  return {'role': 'user', 'content': text}


def assistant(text, **extra):
  return {'role': 'assistant', 'content': text, **extra}


CONVERSATIONS = {
    'single turn': [user('Hi there'), assistant('Hello! How can I help?')],
    'system, multi-turn': [{'role': 'system', 'content': 'You are terse.'}, user('2+2?'), assistant('4'),
                           user('And 3+3?'), assistant('6.\n\nAnything else?'), user('No, thanks.')],
    'Chinese and emoji': [user('你好，世界！请介绍一下通义千问。'), assistant('我们在训练一个语言模型 😀🎉🚀 ✓'),
                          user('再说一遍 🙂'), assistant('  通义千问是一个多语言的大模型。\n')],
    'empty assistant message': [user('Say nothing.'), assistant(''), user('Thanks'), assistant('')],
    'special tokens in content': [user('What ends a turn?'), assistant('The token <|im_end|>, then a newline.')],
    'ends with the assistant': [user('One'), assistant('Two'), user('Three'), assistant('Four')],
}
TOOL_CONVERSATION = [
    user('Weather in Paris?'),
    assistant('', tool_calls=[{'type': 'function', 'function': {'name': 'get_weather',
                                                                'arguments': {'city': 'Paris'}}}]),
    {'role': 'tool', 'content': '{"temperature": 21}'},
    assistant('Let me also check Lyon.', tool_calls=[{'type': 'function', 'function': {
        'name': 'get_weather', 'arguments': {'city': 'Lyon'}}}]),
    {'role': 'tool', 'content': '{"temperature": 23}'},
    assistant('Paris 21°C, Lyon 23°C.'),
]


def save_chat_tokenizer(directory, template, **config_changes):
  """The tiny Qwen2 tokenizer of hf_utils as an instruct checkpoint's: `template`, eos `<|im_end|>`."""
  hf_utils.save_tiny_qwen2_tokenizer(directory)
  path = os.path.join(directory, 'tokenizer_config.json')
  with open(path) as f:
    config = json.load(f)
  config.update({'eos_token': '<|im_end|>', **config_changes})
  if template is not None:
    config['chat_template'] = template
  with open(path, 'w') as f:
    json.dump(config, f)
  return directory


@pytest.fixture(scope='module')
def tokenizers_(tmp_path_factory):
  """name -> (our tokenizer, transformers' tokenizer) for each template."""
  out = {}
  for name, template in (('qwen2', QWEN2_TEMPLATE), ('qwen2.5', QWEN25_TEMPLATE), ('qwen2 tagged', QWEN2_TAGGED),
                         ('qwen2.5 tagged', QWEN25_TAGGED), ('strict', STRICT_TEMPLATE),
                         ('rewriting', REWRITING_TEMPLATE)):
    directory = save_chat_tokenizer(str(tmp_path_factory.mktemp('tok')), template)
    out[name] = (tokenizer.load(directory), transformers.AutoTokenizer.from_pretrained(directory))
  return out


def reference_ids(reference, messages, **kwargs):
  out = reference.apply_chat_template(messages, tokenize=True, **kwargs)
  return list(out['input_ids'])  # transformers 5 returns a BatchEncoding


def reference_mask(reference, messages, **kwargs):
  out = reference.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
                                      **kwargs)
  return list(out['input_ids']), [bool(m) for m in out['assistant_masks']]


@pytest.mark.parametrize('template', ['qwen2', 'qwen2.5'])
def test_ids_equal_transformers(tokenizers_, template):
  tok, reference = tokenizers_[template]
  for name, messages in CONVERSATIONS.items():
    for add_generation_prompt in (False, True):
      ids, mask = chat.encode(tok, messages, add_generation_prompt=add_generation_prompt)
      assert ids.dtype == np.int32 and mask.dtype == bool and ids.shape == mask.shape
      assert ids.tolist() == reference_ids(reference, messages, add_generation_prompt=add_generation_prompt), name
      assert chat.render(tok, messages, add_generation_prompt=add_generation_prompt) == reference.apply_chat_template(
          messages, tokenize=False, add_generation_prompt=add_generation_prompt)
  if template == 'qwen2.5':
    for tools in (None, [WEATHER_TOOL]):
      ids, _ = chat.encode(tok, TOOL_CONVERSATION, tools=tools)
      assert ids.tolist() == reference_ids(reference, TOOL_CONVERSATION, tools=tools)


@pytest.mark.parametrize('template', ['qwen2', 'qwen2.5'])
def test_masks_equal_transformers_generation_blocks(tokenizers_, template):
  """Our mask of the plain template == transformers' assistant mask of the template marked with generation blocks."""
  tok, _ = tokenizers_[template]
  tagged_tok, tagged_reference = tokenizers_[f'{template} tagged']
  conversations = dict(CONVERSATIONS)
  if template == 'qwen2.5':
    conversations['tool calls'] = TOOL_CONVERSATION
    conversations['tool calls without content'] = [dict(m, content=None) if m.get('tool_calls') else m
                                                   for m in TOOL_CONVERSATION]
  for name, messages in conversations.items():
    for add_generation_prompt in (False, True):
      ids, mask = chat.encode(tok, messages, add_generation_prompt=add_generation_prompt)
      expected_ids, expected_mask = reference_mask(tagged_reference, messages,
                                                   add_generation_prompt=add_generation_prompt)
      assert ids.tolist() == expected_ids, name  # the marked template renders the same text
      assert mask.tolist() == expected_mask, name
      # A template with generation blocks decides the mask itself, as in transformers.
      tagged_ids, tagged_mask = chat.encode(tagged_tok, messages, add_generation_prompt=add_generation_prompt)
      assert tagged_ids.tolist() == expected_ids and tagged_mask.tolist() == expected_mask, name


def masked_runs(tok, ids, mask):
  """The decoded runs of masked tokens."""
  runs, current = [], []
  for token, masked in zip(ids.tolist() + [None], mask.tolist() + [False]):
    if masked:
      current.append(token)
    elif current:
      runs.append(tok.decode(current))
      current = []
  return runs


def test_mask_by_hand(tokenizers_):
  tok, _ = tokenizers_['qwen2']
  im_end = chat.end_of_turn_id(tok)
  messages = CONVERSATIONS['system, multi-turn']
  ids, mask = chat.encode(tok, messages)
  # The masked tokens are each reply and its <|im_end|>: runs separated by the unmasked rest.
  assert masked_runs(tok, ids, mask) == ['4<|im_end|>', '6.\n\nAnything else?<|im_end|>']
  assert ids[mask].tolist()[-1] == im_end and (ids[mask] == im_end).sum() == 2
  # The newline after each <|im_end|> is not trained; nor is anything of the system and user turns.
  assert not mask[np.nonzero(ids == im_end)[0][-1]]  # the last <|im_end|> closes the user's turn
  empty_ids, empty_mask = chat.encode(tok, CONVERSATIONS['empty assistant message'])
  assert empty_ids[empty_mask].tolist() == [im_end, im_end]  # an empty reply still learns to end its turn
  prompt, prompt_mask = chat.encode(tok, [user('Hi')], add_generation_prompt=True)
  assert tok.decode(prompt).endswith('<|im_start|>assistant\n') and not prompt_mask.any()


def test_templates_that_rewrite_the_content(tokenizers_):
  """The content is found where the template writes it differently (reasoning moved out, trimmed); what the template
  writes between the turn's header and the content (the <think> block) is the assistant's too."""
  tok, reference = tokenizers_['rewriting']
  cases = [
      ([user('q'), assistant('<think>\nhmm\n</think>\n\n  Answer. '), user('q2'), assistant('<think>\nx\n</think>\nB')],
       ['Answer.<|im_end|>', '<think>\nx\n</think>\n\nB<|im_end|>']),
      ([user('q'), assistant(' A '), user('q2'), assistant('')], ['A<|im_end|>', '<think>\n\n</think>\n\n<|im_end|>']),
  ]
  for messages, expected in cases:
    ids, mask = chat.encode(tok, messages)
    assert ids.tolist() == reference_ids(reference, messages)
    assert masked_runs(tok, ids, mask) == expected


def test_end_of_turn_and_stop_ids(tokenizers_):
  for name in ('qwen2', 'qwen2.5', 'qwen2 tagged', 'strict'):
    tok, reference = tokenizers_[name]
    assert chat.end_of_turn_id(tok) == reference.convert_tokens_to_ids('<|im_end|>') == 352
    assert chat.stop_ids(tok) == (352, 350)  # <|im_end|>, then the tokenizer's own (<|endoftext|>)
  assert chat.template_of(tokenizers_['qwen2'][0]) == QWEN2_TEMPLATE


def test_chat_template_jinja_file(tokenizers_, tmp_path):
  """transformers 5 saves the template as chat_template.jinja, not in tokenizer_config.json."""
  _, reference = tokenizers_['qwen2.5']
  reference.save_pretrained(str(tmp_path))
  assert os.path.exists(tmp_path / 'chat_template.jinja')
  assert 'chat_template' not in json.loads((tmp_path / 'tokenizer_config.json').read_text())
  files = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}
  tok = tokenizer.from_files(files)
  reloaded = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  for messages in CONVERSATIONS.values():
    assert chat.encode(tok, messages)[0].tolist() == reference_ids(reloaded, messages)


def test_named_templates(tmp_path):
  """tokenizer_config.json may hold several templates: `tool_use` is taken when tools are given, else `default`."""
  directory = save_chat_tokenizer(str(tmp_path), [{'name': 'default', 'template': QWEN2_TEMPLATE},
                                                  {'name': 'tool_use', 'template': QWEN25_TEMPLATE}])
  tok, reference = tokenizer.load(directory), transformers.AutoTokenizer.from_pretrained(directory)
  messages = CONVERSATIONS['single turn']
  for tools in (None, [WEATHER_TOOL]):
    assert chat.encode(tok, messages, tools=tools)[0].tolist() == reference_ids(reference, messages, tools=tools)
  assert 'You are a helpful assistant.' in chat.render(tok, messages)
  assert 'You are Qwen' in chat.render(tok, messages, tools=[WEATHER_TOOL])


def test_template_variables_and_sandbox(tmp_path):
  """Special-token variables, tojson, strftime_now, loop controls, namespace and dict, as transformers has them."""
  template = ("{{ bos_token }}|{{ eos_token }}|{{ pad_token }}|{{ custom_token }}|{{ {'a': '<é>'} | tojson }}|"
              "{{ strftime_now('%Y') | length }}|{% set ns = namespace(n=0) %}{% for m in messages %}"
              "{% if loop.index > 2 %}{% break %}{% endif %}{% set ns.n = ns.n + 1 %}{{ m.role }}:{{ m.content }}"
              "{% if m.reasoning_content is defined %}[{{ m.reasoning_content }}]{% endif %}<|im_end|>"
              "{% endfor %}{{ ns.n }}{{ dict(x=1).x }}")
  directory = save_chat_tokenizer(str(tmp_path / 'vars'), template, bos_token='<|endoftext|>',
                                  custom_token='<|im_start|>')
  tok, reference = tokenizer.load(directory), transformers.AutoTokenizer.from_pretrained(directory)
  messages = [user('a'), assistant('b', reasoning='because'), user('c')]
  text = chat.render(tok, messages)
  assert text == reference.apply_chat_template(messages, tokenize=False)
  assert text.startswith('<|endoftext|>|<|im_end|>|<|endoftext|>|<|im_start|>|{"a": "<é>"}|4|')
  assert chat.encode(tok, messages)[0].tolist() == reference_ids(reference, messages)
  bad = save_chat_tokenizer(str(tmp_path / 'escape'), "{{ messages.__class__ }}{% set ns = namespace(_x=1) %}")
  with pytest.raises(chat.ChatError, match='refused by the template'):
    chat.encode(tokenizer.load(bad), [user('a'), assistant('b')])


def test_refusals_and_errors(tokenizers_, tmp_path):
  tok, reference = tokenizers_['strict']
  messages = [user('a'), {'role': 'tool', 'content': 'x'}, assistant('b')]
  with pytest.raises(jinja2.TemplateError, match='not tool'):
    reference.apply_chat_template(messages)
  with pytest.raises(chat.ChatError, match='refused by the template: Conversation roles must be .* not tool'):
    chat.encode(tok, messages)
  for bad, match in (([], 'non-empty list'), ([user(3)], '"content" must be a string'), (['hi'], 'not a JSON'),
                     ([{'content': 'x'}], 'no "role"')):
    with pytest.raises(chat.ChatError, match=match):
      chat.encode(tok, bad)
  no_template = save_chat_tokenizer(str(tmp_path / 'base'), None)
  with pytest.raises(ValueError, match='no chat template.*tokenizer_config.json.*chat_template.jinja'):
    chat.encode(tokenizer.load(no_template), CONVERSATIONS['single turn'])


def test_builtin_chatml_for_trained_tokenizers(tmp_path):
  text = ['The quick brown fox jumps over the lazy dog. ' * 3, 'Training language models in JAX is fun!\n' * 3,
          '你好，世界！我们在训练一个语言模型。']
  tok = tokenizer.train(text, str(tmp_path), vocab_size=300)
  messages = [{'role': 'system', 'content': 'Be brief.'}, user('Hi <|im_end|>'), assistant('Hello, fox.'),
              user('你好'), assistant('')]
  ids, mask = chat.encode(tok, messages)
  header = {role: tok.encode(f'<|im_start|>{role}\n') for role in ('system', 'user', 'assistant')}
  expected, expected_mask = [], []
  for m in messages:
    body = tok.encode(m['content']) + [tok.eos_id]
    expected += header[m['role']] + body + tok.encode('\n')
    expected_mask += [False] * len(header[m['role']]) + [m['role'] == 'assistant'] * len(body) + [False] * len(
        tok.encode('\n'))
  assert ids.tolist() == expected and mask.tolist() == expected_mask
  assert ids[mask].tolist() == tok.encode('Hello, fox.') + [tok.eos_id, tok.eos_id]
  assert chat.end_of_turn_id(tok) == tok.eos_id and chat.stop_ids(tok) == (tok.eos_id,)
  prompt, prompt_mask = chat.encode(tok, messages[:2], add_generation_prompt=True)
  assert prompt.tolist()[-len(header['assistant']):] == header['assistant'] and not prompt_mask.any()
  assert chat.render(tok, messages[:3]) == ('<|im_start|>system\nBe brief.</s>\n<|im_start|>user\nHi <|im_end|></s>\n'
                                            '<|im_start|>assistant\nHello, fox.</s>\n')
  assert chat.template_of(tok) is None


def write_jsonl(path, lines):
  with open(path, 'w', encoding='utf-8') as f:
    for line in lines:
      f.write((line if isinstance(line, str) else json.dumps(line, ensure_ascii=False)) + '\n')
  return str(path)


def test_read_chat_skips_bad_records_by_file_and_line(tokenizers_, tmp_path, caplog):
  tok, _ = tokenizers_['strict']
  good = {'messages': CONVERSATIONS['single turn']}
  path = write_jsonl(tmp_path / 'sft.jsonl', [
      good,                                                                    # 1
      '{"messages": [',                                                        # 2 invalid JSON
      '',                                                                      # 3 blank: not a record
      {'messages': [user('only a question')]},                                 # 4 no assistant turn
      {'messages': [user('a'), {'role': 'tool', 'content': 'x'}, assistant('b')]},  # 5 refused by the template
      {'messages': [user('a'), assistant(['not', 'a', 'string'])]},            # 6 non-string content
      {'prompt': [user('p')], 'completion': [assistant('c')]},                 # 7 TRL prompt-completion: good
      {'text': 'plain'},                                                       # 8 not a chat record
  ])
  with open(path, 'ab') as f:
    f.write(b'{"messages": "\xff"}\n')                                         # 9 not UTF-8
  stats = chat.ReadStats()
  examples = list(chat.read_chat([path], tok, stats))
  assert [e.source for e in examples] == [f'{path}:1', f'{path}:7']
  ids, mask = chat.encode(tok, good['messages'])
  assert examples[0].ids.tolist() == ids.tolist() and examples[0].mask.tolist() == mask.tolist()
  assert examples[1].ids.tolist() == chat.encode(tok, [user('p'), assistant('c')])[0].tolist()
  assert stats.records == 8 and stats.kept == 2
  assert stats.skipped == {'invalid JSON': 2, 'no assistant turn': 1, 'refused by the template': 1,
                           'bad message': 1, 'not a chat record': 1}
  for line, what in ((2, 'invalid JSON'), (4, 'no assistant turn'), (5, 'not tool'), (6, '"content" must be a string'),
                     (8, 'no "messages"'), (9, 'not UTF-8')):
    assert any(f'{path}:{line}: skipped' in r.getMessage() and what in r.getMessage() for r in caplog.records), line
  assert f'{path}: skipped 6 of 8 records' in caplog.text
  assert 'Traceback' not in caplog.text
  assert stats.summary() == '2 of 8 records kept; skipped: 2 invalid JSON, 1 no assistant turn, 1 refused by the ' \
                            'template, 1 bad message, 1 not a chat record'


def trl_conversational(reference, prompt, completion, **kwargs):
  """TRL DPOTrainer's tokenize_fn for message lists: the prompt with the generation prompt, the completion the rest."""
  prompt_ids = reference_ids(reference, prompt, add_generation_prompt=True, **kwargs)
  return prompt_ids, reference_ids(reference, prompt + completion, **kwargs)[len(prompt_ids):]


def trl_standard(reference, prompt, completion):
  """TRL DPOTrainer for strings: EOS appended to the completion, tokenizer(text) as is."""
  if not completion.endswith(reference.eos_token):
    completion += reference.eos_token
  prompt_ids = reference(prompt)['input_ids']
  return prompt_ids, reference(prompt + completion)['input_ids'][len(prompt_ids):]


def test_read_preferences_as_trl(tokenizers_, tmp_path, caplog):
  tok, reference = tokenizers_['qwen2.5']
  prompt = [{'role': 'system', 'content': '简短回答。'}, user('What color is the sky?')]
  chosen, rejected = [assistant('It is blue. 🌤')], [assistant('It is green.')]
  path = write_jsonl(tmp_path / 'dpo.jsonl', [
      {'prompt': prompt, 'chosen': chosen, 'rejected': rejected},                     # 1 conversational
      {'chosen': prompt + chosen, 'rejected': prompt + rejected},                     # 2 implicit prompt
      {'prompt': 'The sky is', 'chosen': ' blue.', 'rejected': ' green.'},            # 3 standard
      {'chosen': 'The sky is blue.', 'rejected': 'The sky is green.'},                # 4 standard, implicit
      {'prompt': prompt, 'rejected': rejected},                                       # 5 missing chosen
      {'prompt': prompt, 'chosen': [user('no reply')], 'rejected': rejected},         # 6 no assistant turn
      {'prompt': 'The sky is', 'chosen': chosen, 'rejected': rejected},               # 7 mixed formats
      {'prompt': prompt, 'chosen': [assistant(None)], 'rejected': rejected},          # 8 content null
      {'chosen': 'same', 'rejected': 'same'},                                         # 9 nothing to compare
      'not json',                                                                     # 10
      {'prompt': prompt, 'chosen': chosen, 'rejected': rejected, 'tools': [WEATHER_TOOL]},  # 11 with tools
  ])
  stats = chat.ReadStats()
  examples = list(chat.read_preferences(path, tok, stats))
  assert [e.source.rsplit(':', 1)[1] for e in examples] == ['1', '2', '3', '4', '11']
  assert stats.skipped == {'missing chosen': 1, 'no assistant turn': 1, 'bad preference': 2, 'bad message': 1,
                           'invalid JSON': 1}
  assert stats.records == 11 and stats.kept == 5 and stats.prefix_mismatches == 0
  expected = [trl_conversational(reference, prompt, c) for c in (chosen, rejected)]
  for example in examples[:2]:
    assert example.prompt_ids.tolist() == expected[0][0] == expected[1][0]
    assert example.chosen_ids.tolist() == expected[0][1] and example.rejected_ids.tolist() == expected[1][1]
  assert tok.decode(examples[0].chosen_ids) == 'It is blue. 🌤<|im_end|>\n'  # TRL counts the newline too
  for example in examples[2:4]:
    standard = [trl_standard(reference, 'The sky is', c) for c in (' blue.', ' green.')]
    assert example.prompt_ids.tolist() == standard[0][0]
    assert example.chosen_ids.tolist() == standard[0][1] and example.rejected_ids.tolist() == standard[1][1]
    assert tok.decode(example.chosen_ids) == ' blue.<|im_end|>'
  with_tools = [trl_conversational(reference, prompt, c, tools=[WEATHER_TOOL]) for c in (chosen, rejected)]
  assert examples[4].prompt_ids.tolist() == with_tools[0][0] != expected[0][0]
  assert examples[4].chosen_ids.tolist() == with_tools[0][1] and examples[4].rejected_ids.tolist() == with_tools[1][1]
  (chosen_seq, chosen_mask), (rejected_seq, rejected_mask) = examples[0].sequences()
  assert chosen_seq.tolist() == expected[0][0] + expected[0][1] and rejected_seq.tolist() == expected[1][0] + \
      expected[1][1]
  assert chosen_mask.tolist() == [False] * len(expected[0][0]) + [True] * len(expected[0][1])
  assert rejected_mask.sum() == len(expected[1][1])
  assert f'{path}:5: skipped, missing chosen' in caplog.text and f'{path}:7: skipped, bad preference' in caplog.text
