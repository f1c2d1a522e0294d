"""The chat template of Baichuan-13B-Chat (`build_chat_input` of its generation_utils.py, final version).

A conversation becomes one token sequence:

    encode(system) + [195] + encode(user) + [196] + encode(assistant) + [195] + encode(user) + ... + [196]

195 (`<reserved_102>`) opens a user turn, 196 (`<reserved_103>`) an assistant turn; there is no eos after an
assistant turn. When the conversation is too long, the oldest rounds go first, and the result is cut to its
last `model_max_length - max_new_tokens` tokens so the reply has room.
"""

ROLES = ("system", "user", "assistant")


class PromptTooLong(ValueError):
    pass


def check_messages(messages):
    """A non-empty list of {'role': 'system' | 'user' | 'assistant', 'content': str}; system only first."""
    if not isinstance(messages, (list, tuple)) or len(messages) == 0:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts, "
                         f"got {type(messages).__name__} {messages!r:.80}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content', got {type(message).__name__}")
        role = message.get("role")
        if role not in ROLES:
            raise ValueError(f"messages[{i}]['role'] must be one of {', '.join(ROLES)}; got {role!r}")
        if not isinstance(message.get("content"), str):
            raise ValueError(f"messages[{i}]['content'] must be a str, got {type(message.get('content')).__name__}")
        if role == "system" and i != 0:
            raise ValueError(f"messages[{i}]: a system message may only come first")


def split_rounds(messages):
    """(system prompt, rounds): a new round starts at each user message."""
    system = messages[0]["content"] if messages[0]["role"] == "system" else ""
    rounds = []
    for message in messages[1:] if messages[0]["role"] == "system" else messages:
        if message["role"] == "user" or not rounds:
            rounds.append([])
        rounds[-1].append(message)
    return system, rounds


def content_tokens(tokenizer, text, role_ids):
    """encode(text), refusing text that encodes to a role token: Baichuan's tokenizer matches its reserved pieces
    inside text ("<reserved_102>" is the user token 195), so content could forge a turn. Roles come only from
    the messages' roles."""
    ids = tokenizer.encode(text)
    forged = set(role_ids).intersection(ids)
    if forged:
        raise ValueError(f"message content contains {tokenizer.id_to_piece(min(forged))}, which the tokenizer reads "
                         "as a chat role token; role tokens come only from the messages' roles")
    return ids


def round_tokens(tokenizer, round, user_token_id, assistant_token_id):
    tokens = []
    for message in round:
        tokens.append(user_token_id if message["role"] == "user" else assistant_token_id)
        tokens.extend(content_tokens(tokenizer, message["content"], (user_token_id, assistant_token_id)))
    return tokens


def build_chat_input(tokenizer, messages, *, model_max_length, max_new_tokens, user_token_id=195,
                     assistant_token_id=196, generation_max_new_tokens=2048):
    """Token ids for the model to continue with the assistant's reply.

    max_new_tokens = 0 or None means generation_config's value (`generation_max_new_tokens`)."""
    check_messages(messages)
    if not isinstance(model_max_length, int) or model_max_length <= 0:
        raise ValueError(f"model_max_length must be a positive integer, got {model_max_length!r}")
    if max_new_tokens is not None and (not isinstance(max_new_tokens, int) or max_new_tokens < 0):
        raise ValueError(f"max_new_tokens must be an integer >= 0 (0 = generation_config's), got {max_new_tokens!r}")
    max_new_tokens = max_new_tokens or generation_max_new_tokens
    max_input_tokens = model_max_length - max_new_tokens
    if max_input_tokens <= 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for the prompt in a context of "
                         f"{model_max_length} tokens")

    system, rounds = split_rounds(messages)
    system_tokens = content_tokens(tokenizer, system, (user_token_id, assistant_token_id))
    max_history_tokens = max_input_tokens - len(system_tokens)

    # Newest round first: the newest always goes in; an older one only while it fits, and not once full.
    history = []
    for round in reversed(rounds):
        tokens = round_tokens(tokenizer, round, user_token_id, assistant_token_id)
        if history and len(history) + len(tokens) > max_history_tokens:
            break
        history = tokens + history
        if len(history) >= max_history_tokens:
            break

    input_tokens = system_tokens + history
    if messages[-1]["role"] != "assistant":
        input_tokens.append(assistant_token_id)
    return input_tokens[-max_input_tokens:]


def chat_prompt(tokenizer, messages, *, context, max_new_tokens=None, generation_max_new_tokens=2048,
                user_token_id=195, assistant_token_id=196):
    """(token ids, reply budget) for `messages`: the one policy of `model(messages)`, the chat command line and
    the server.

    The reply's room is `max_new_tokens` when given, else generation_config's default but at most half the
    context (the released default of 2048 assumes the real 4096-token context). Older rounds are dropped to make
    that room; the newest message is never cut: when it does not fit with room for one new token, PromptTooLong.
    The budget is then that room, or what is left after the prompt when that is less."""
    check_messages(messages)
    room = min(generation_max_new_tokens, context // 2) if max_new_tokens is None else max_new_tokens
    role_ids = (user_token_id, assistant_token_id)
    system = messages[0]["content"] if messages[0]["role"] == "system" else ""
    newest = (len(content_tokens(tokenizer, system, role_ids)) + 1
              + len(content_tokens(tokenizer, messages[-1]["content"], role_ids)) + 1)
    if newest >= context:
        raise PromptTooLong(f"the prompt is {newest} tokens with the chat template; the model's context holds "
                            f"{context} tokens, prompt and reply together")
    ids = build_chat_input(tokenizer, messages, model_max_length=context, max_new_tokens=min(room, context - newest),
                           user_token_id=user_token_id, assistant_token_id=assistant_token_id)
    return ids, min(room, context - len(ids))
