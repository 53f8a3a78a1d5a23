"""
The offline GPT-2 tokenizer of common.py and the chat template. tiktoken.get_encoding('gpt2')
would need a download, so the full tokenizer is checked against GPT-2 ids known by heart.
"""
import shutil

import pytest

import common
from common import decode_response, encode_prompt, encode_response, get_tokenizer, render_prompt, render_response

TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog. It's 3:14 pm; we've got 2,718 reasons!",
    "  leading and trailing spaces  \n\n\ttabs\r\nand CRLF\n",
    "café naïve façade Ångström Straße",
    "日本語のテキストと中文字符，한국어",
    "emoji 🤖👍🏽 and a family 👨‍👩‍👧‍👦 and a flag 🇫🇷",
    "\n\nHuman: What is 2+2?\n\nAssistant: 4.",
    "",
]


def test_known_gpt2_ids():
    enc = get_tokenizer()
    assert enc.encode_ordinary("Hello world") == [15496, 995]
    assert enc.encode_ordinary("hello world") == [31373, 995]
    for text, token in [(" the", 262), ("\n\n", 628), ("Human", 20490), ("\n", 198), (" ", 220),
                        ("!", 0), ('"', 1), (",", 11), (".", 13), (" a", 257), ("the", 1169)]:
        assert enc.encode_ordinary(text) == [token], text
    assert enc.eot_token == 50256 and enc.n_vocab == 50257
    assert enc.encode("<|endoftext|>", allowed_special='all') == [50256]
    assert enc.decode([50256]) == "<|endoftext|>"


@pytest.mark.parametrize('text', TEXTS)
def test_round_trip(text):
    enc = get_tokenizer()
    ids = enc.encode_ordinary(text)
    assert enc.decode(ids) == text
    assert all(0 <= i < 50256 for i in ids)


def test_byte_fallback_of_rare_characters():
    enc = get_tokenizer()
    ids = enc.encode_ordinary("🤖")  # 4 UTF-8 bytes, no single token: byte-level pieces
    assert len(ids) > 1 and b"".join(enc.decode_single_token_bytes(i) for i in ids) == "🤖".encode()


def test_truncated_vocabulary():
    full, small = get_tokenizer(), get_tokenizer(8192)
    assert small.eot_token == 8191 and small.n_vocab == 8192
    # ids 0..8190 are GPT-2's first 8191 tokens, and 8191 is the end-of-text token only
    assert all(small.decode_single_token_bytes(i) == full.decode_single_token_bytes(i) for i in range(8191))
    assert small.decode_single_token_bytes(8191) == b'<|endoftext|>'
    dropped = full.decode_single_token_bytes(8191).decode()  # GPT-2's token 8191 is no longer one token
    assert len(small.encode_ordinary(dropped)) > 1 and small.decode(small.encode_ordinary(dropped)) == dropped
    for text in TEXTS:
        ids = small.encode_ordinary(text)
        assert all(0 <= i < 8191 for i in ids)
        assert small.decode(ids) == text
    # a text made of common words only: the same ids as GPT-2's
    text = " the cat sat on the mat. It was a good day, and we are all here."
    ids = full.encode_ordinary(text)
    assert max(ids) < 8191
    assert small.encode_ordinary(text) == ids
    # rarer words fall apart into kept pieces, each with GPT-2's id for that piece
    assert max(full.encode_ordinary("Hello")) >= 8191
    ids = small.encode_ordinary("Hello")
    assert len(ids) > 1 and all(full.decode_single_token_bytes(i) == small.decode_single_token_bytes(i) for i in ids)
    assert small.encode("<|endoftext|>", allowed_special='all') == [8191]


def test_vocab_size_out_of_range():
    with pytest.raises(ValueError, match='vocab_size'):
        get_tokenizer(100)
    with pytest.raises(ValueError, match='vocab_size'):
        get_tokenizer(50258)


@pytest.fixture
def fresh_tokenizer_cache():
    get_tokenizer.cache_clear()
    yield
    get_tokenizer.cache_clear()  # the next caller rebuilds from the real merges file


def test_tampered_merges_file_is_refused(tmp_path, monkeypatch, fresh_tokenizer_cache):
    pristine, copy = common.BPE_PATH, tmp_path / 'gpt2_vocab.bpe'
    raw = bytearray(open(pristine, 'rb').read())
    i = raw.index(b'\n', 100) + 1  # swap two characters of one merge rule
    raw[i], raw[i + 1] = raw[i + 1], raw[i]
    copy.write_bytes(bytes(raw))
    monkeypatch.setattr(common, 'BPE_PATH', str(copy))
    with pytest.raises(RuntimeError, match='sha256'):
        get_tokenizer()
    with pytest.raises(RuntimeError, match='sha256'):
        get_tokenizer(8192)
    # an untouched copy at the same path is accepted: it is the checksum that failed above
    shutil.copy(pristine, copy)
    get_tokenizer.cache_clear()
    assert get_tokenizer().encode_ordinary("Hello world") == [15496, 995]


def test_chat_template():
    enc = get_tokenizer()
    assert render_prompt('Hi') == '\n\nHuman: Hi\n\nAssistant:'
    assert render_prompt('  Hi there \n') == '\n\nHuman: Hi there\n\nAssistant:'
    hh = '\n\nHuman: Hi\n\nAssistant: Hello! How can I help?\n\nHuman: Tell me a joke.\n\nAssistant:'
    assert render_prompt(hh) == hh
    # an HH conversation with stray whitespace at its ends is still one, not a Human turn quoting it
    for near in (hh + ' ', hh + '\n', hh.lstrip('\n'), '  ' + hh.lstrip('\n') + ' \n'):
        assert render_prompt(near) == hh, repr(near)
    assert render_response('Sure.') == ' Sure.' and render_response('  Sure.') == ' Sure.'
    prompt = encode_prompt(enc, 'Hi')
    assert enc.decode(prompt) == '\n\nHuman: Hi\n\nAssistant:'
    assert prompt[:3] == [198, 198, 20490]  # GPT-2's pre-tokenizer splits '\n\nHuman' as '\n', '\n', 'Human'
    response = encode_response(enc, 'Hello there.')
    assert response[-1] == enc.eot_token == 50256 and enc.eot_token not in response[:-1]
    assert enc.decode(response[:-1]) == ' Hello there.'
    assert enc.decode(prompt + response[:-1]) == '\n\nHuman: Hi\n\nAssistant: Hello there.'
    # a response that contains the eot text is encoded as ordinary text, never as the eot token
    assert enc.eot_token not in encode_response(enc, 'a <|endoftext|> b')[:-1]
    assert decode_response(enc, response + [1, 2, 3]) == 'Hello there.'
    assert decode_response(enc, response[:-1]) == 'Hello there.'
    # cut at the FIRST eot: whatever a batch's generation appended after it (another answer, pads) is no part of it
    assert decode_response(enc, response + encode_response(enc, 'More.') + [enc.eot_token]) == 'Hello there.'


def test_chat_template_only_a_whole_conversation_is_kept_as_it_is():
    # a message that starts like a Human turn but does not end on 'Assistant:' is a message: the model must
    # still be asked to answer
    assert render_prompt('Human: what does "Human:" mean?') == '\n\nHuman: Human: what does "Human:" mean?\n\nAssistant:'
    # only spaces go before the one space after 'Assistant:'; a reply's own first newline or tab is kept
    assert render_response('\n1. flour\n2. water') == ' \n1. flour\n2. water'
    assert render_response('\tcode') == ' \tcode'
