"""
loaders.py under fire: collate and batch_indices against hand-computed answers, the truncation
policy on hand cases and on random ones, and read_jsonl fed malformed files for every schema.
Every malformed file must give a DataError naming `path:LINE:` and the problem, or be accepted
with the right values; any other exception type fails the test.
"""
import json
import random
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import loaders  # noqa: E402
from common import encode_prompt, encode_response, get_tokenizer, render_prompt  # noqa: E402
from loaders import DataError, batch_indices, collate, read_jsonl, spread, truncate  # noqa: E402


@pytest.fixture(scope='module')
def enc():
    return get_tokenizer()

# -----------------------------------------------------------------------------
# collate


def test_collate_hand_example():
    EOT, PAD = 9, 0
    examples = [([1, 2, 3], [4, 5, EOT]), ([7], [8, EOT])]
    seq, targets, lengths = collate(examples, pad_id=PAD)
    assert seq.tolist() == [[1, 2, 3, 4, 5, EOT],
                            [7, 8, EOT, PAD, PAD, PAD]]
    # targets[t] = seq[t+1] where seq[t+1] is a response token (the final eot included), else -1
    assert targets.tolist() == [[-1, -1, 4, 5, EOT],
                                [8, EOT, -1, -1, -1]]
    assert lengths.tolist() == [6, 3]
    assert seq.dtype == targets.dtype == lengths.dtype == torch.long


def test_collate_mask_on_real_batch(enc):
    records = [{'prompt': 'What is 2+2?', 'response': 'Four.'},
               {'prompt': '\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Tell me a fact.\n\nAssistant:',
                'response': 'Honey never spoils.'},
               {'prompt': 'x', 'response': 'y ' * 30}]
    examples = loaders.tokenize_sft(records, enc, block_size=1024)
    seq, targets, lengths = collate(examples, pad_id=enc.eot_token)
    assert seq.shape == (3, max(len(p) + len(r) for p, r in examples)) and targets.shape == (3, seq.shape[1] - 1)
    for i, (p, r) in enumerate(examples):
        assert r[-1] == enc.eot_token
        assert seq[i, :lengths[i]].tolist() == p + r
        assert targets[i][targets[i] != -1].tolist() == r  # exactly the response, eot included
        assert (targets[i, :len(p) - 1] == -1).all() and (targets[i, len(p) + len(r) - 1:] == -1).all()
        supervised = (targets[i] != -1).nonzero().flatten()
        assert torch.equal(targets[i, supervised], seq[i, supervised + 1])  # targets are next tokens
        assert enc.decode(p) == render_prompt(records[i]['prompt'])

# -----------------------------------------------------------------------------
# batch_indices


def test_batch_indices_deterministic_and_a_permutation_per_epoch():
    n, bs, seed = 24, 4, 1337
    per_epoch = n // bs
    assert batch_indices(n, bs, 5, seed) == batch_indices(n, bs, 5, seed)
    epochs = []
    for epoch in range(3):
        order = [i for s in range(epoch * per_epoch, (epoch + 1) * per_epoch) for i in batch_indices(n, bs, s, seed)]
        assert sorted(order) == list(range(n)), f"epoch {epoch} must see each example once"
        epochs.append(order)
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2]
    assert batch_indices(n, bs, 0, seed) != batch_indices(n, bs, 0, seed + 1)
    assert all(len(batch_indices(n, bs, s, seed)) == bs for s in range(10))


def test_batch_indices_draws_one_permutation_per_epoch():
    # HH-RLHF's 160k pairs take 8 ms a draw: once per epoch, not once per step; the same order as drawing it afresh
    loaders.epoch_order.cache_clear()
    n, bs, seed = 1000, 10, 3
    steps = [batch_indices(n, bs, s, seed) for s in range(250)]  # 2.5 epochs
    assert loaders.epoch_order.cache_info().misses == 3
    for s in (0, 99, 100, 249):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + s // 100)).tolist()
        assert steps[s] == perm[s % 100 * bs:(s % 100 + 1) * bs]


def test_batch_indices_drops_the_remainder_without_repeats():
    n, bs = 10, 4  # 2 batches per epoch, 2 examples unused each epoch
    order = batch_indices(n, bs, 0, 0) + batch_indices(n, bs, 1, 0)
    assert len(set(order)) == 8 and all(0 <= i < n for i in order)


def test_batch_indices_ranks_split_the_global_batch():
    n, bs, seed = 32, 8, 7
    for step in range(10):
        full = batch_indices(n, bs, step, seed)
        r0 = batch_indices(n, bs, step, seed, rank=0, world_size=2)
        r1 = batch_indices(n, bs, step, seed, rank=1, world_size=2)
        assert len(r0) == len(r1) == bs // 2
        assert not set(r0) & set(r1)
        assert r0 + r1 == full


def test_batch_indices_too_few_examples():
    with pytest.raises(AssertionError, match='cannot fill one batch'):
        batch_indices(3, 4, 0, 0)

# -----------------------------------------------------------------------------
# truncation policy: the prompt keeps its end, the response its start; never below block // 2


P20, R20 = list(range(20)), list(range(100, 120))


@pytest.mark.parametrize('prompt, responses, block, want_prompt, want_responses, cut', [
    (P20[:5], [R20[:3]], 8, P20[:5], [R20[:3]], False),  # fits exactly
    (P20, [R20[:3]], 10, P20[13:], [R20[:3]], True),  # long prompt: cut only as far as needed
    (P20[:3], [R20], 10, P20[:3], [R20[:7]], True),  # long response: prompt whole, response start
    (P20, [R20], 10, P20[15:], [R20[:5]], True),  # both long: half and half
    (P20, [R20[:2], R20[:8]], 12, P20[14:], [R20[:2], R20[:6]], True),  # a pair: the longer side decides
    (P20, [R20], 2, P20[19:], [R20[:1]], True),  # tiny block: one token each
    (P20, [R20], 11, P20[15:], [R20[:6]], True),  # odd block: prompt gets block // 2
])
def test_truncate_hand_cases(prompt, responses, block, want_prompt, want_responses, cut):
    assert truncate(prompt, responses, block) == (want_prompt, want_responses, cut)


def test_truncate_invariants_random():
    rng = random.Random(0)
    for _ in range(2000):
        block = rng.randint(2, 64)
        prompt = list(range(rng.randint(1, 100)))
        responses = [list(range(1000, 1000 + rng.randint(1, 100))) for _ in range(rng.randint(1, 2))]
        p, rs, cut = truncate(prompt, responses, block)
        assert cut == (len(prompt) + max(map(len, responses)) > block)
        assert p == prompt[len(prompt) - len(p):]  # the prompt keeps its end
        for r, orig in zip(rs, responses):
            assert r == orig[:len(r)] and len(r) >= 1  # the response keeps its start, at least one token
            assert len(p) + len(r) <= block
        if cut:
            assert len(p) >= min(len(prompt), block // 2)  # never below half the block
            assert block - len(p) >= min(max(map(len, responses)), block // 2)  # room for responses
            room = block - len(p)
            assert len(p) == len(prompt) or max(map(len, rs)) == room  # cut only as far as needed


def test_tokenize_sft_truncates_and_reports(enc, capsys):
    long_prompt = 'word ' * 500
    records = [{'prompt': 'short question', 'response': 'short answer'},
               {'prompt': long_prompt, 'response': 'the answer'},
               {'prompt': 'q', 'response': 'long ' * 500}]
    out = loaders.tokenize_sft(records, enc, block_size=32)
    assert ('sft: 2 of 3 examples truncated to 32 tokens (prompt end and response start kept; 1 with a response cut '
            'before its <|endoftext|>)') in capsys.readouterr().out
    full = [(encode_prompt(enc, r['prompt']), encode_response(enc, r['response'])) for r in records]
    assert out[0] == full[0]  # untouched
    p, r = out[1]
    assert r == full[1][1] and len(p) == 32 - len(r) and p == full[1][0][-len(p):]
    assert enc.decode(p).endswith('\n\nAssistant:')  # the end of the prompt survives
    p, r = out[2]
    assert p == full[2][0] and len(r) == 32 - len(p) and r == full[2][1][:len(r)]
    assert r[-1] != enc.eot_token  # a cut response has lost its end


def test_tokenize_prefs_same_prompt_both_sides(enc, capsys):
    records = [{'prompt': 'word ' * 100, 'chosen': 'yes', 'rejected': 'no ' * 100},
               {'prompt': 'a', 'chosen': 'b', 'rejected': 'c'}]
    out = loaders.tokenize_prefs(records, enc, block_size=40)
    assert ('prefs: 1 of 2 examples truncated to 40 tokens (prompt end and response start kept; 1 with a response '
            'cut before its <|endoftext|>)') in capsys.readouterr().out
    p, c, r = out[0]
    assert len(p) == 20  # the long rejected side holds the prompt to half the block
    assert p == encode_prompt(enc, records[0]['prompt'])[-20:]
    assert c == encode_response(enc, 'yes') and len(r) == 20
    assert len(p) + len(c) <= 40 and len(p) + len(r) <= 40
    assert out[1] == (encode_prompt(enc, 'a'), encode_response(enc, 'b'), encode_response(enc, 'c'))


def test_tokenize_prefs_reports_pairs_that_truncation_makes_identical(enc, capsys):
    same_start = 'They are kind and they are good and they are '
    records = [{'prompt': 'a', 'chosen': 'b', 'rejected': 'c'},
               {'prompt': 'Tell me about people.', 'chosen': same_start + 'kind.', 'rejected': same_start + 'evil.'}]
    out = loaders.tokenize_prefs(records, enc, block_size=16, name='pairs.jsonl')
    assert out[1][1] == out[1][2]  # kept (nothing is dropped), but identical within the block
    printed = capsys.readouterr().out
    assert 'pairs.jsonl: 1 of 2 pairs identical after truncation to 16 tokens (lines 2)' in printed
    loaders.tokenize_prefs(records, enc, block_size=64, name='pairs.jsonl')
    assert 'identical' not in capsys.readouterr().out


def test_tokenize_prompts_keeps_the_end(enc, capsys):
    out = loaders.tokenize_prompts([{'prompt': 'word ' * 100}, {'prompt': 'hi'}], enc, max_prompt_len=16)
    assert 'prompts: 1 of 2 prompts truncated to 16 tokens (the end kept)' in capsys.readouterr().out
    assert out[0] == encode_prompt(enc, 'word ' * 100)[-16:] and out[1] == encode_prompt(enc, 'hi')


def test_no_report_when_nothing_is_cut(enc, capsys):
    loaders.tokenize_sft([{'prompt': 'a', 'response': 'b'}], enc, block_size=64)
    assert capsys.readouterr().out == ''

# -----------------------------------------------------------------------------
# read_jsonl fuzz: malformed files for every schema. A case builds (content, expect) for a
# schema: expect is ('error', line or None, word) or ('ok', records).

SCHEMAS = ('sft', 'prefs', 'rl')


def rec(schema, i=0, **over):
    """A valid record of the schema, with fields overridden."""
    r = {'prompt': f'question {i}', 'response': f'answer {i}', 'chosen': f'good {i}', 'rejected': f'bad {i}'}
    return {**{k: r[k] for k in loaders.SCHEMAS[schema]}, **over}


def dumps(r):
    return json.dumps(r).encode()


def around(schema, bad):
    """The bad line as line 2 of 3, between two good records."""
    return dumps(rec(schema, 1)) + b'\n' + bad + b'\n' + dumps(rec(schema, 3)) + b'\n'


def err(line, word):
    return 'error', line, word


def ok(*records):
    return 'ok', list(records)


def good_file(schema, n=2):
    return b''.join(dumps(rec(schema, i)) + b'\n' for i in range(n))


def big_string():
    return 'x' * 3_000_000


GENERIC = {
    # syntax
    'truncated-json': lambda s: (around(s, dumps(rec(s))[:-5]), err(2, 'invalid JSON')),
    'truncated-last-line-no-newline': lambda s: (dumps(rec(s, 1)) + b'\n' + dumps(rec(s))[:12], err(2, 'invalid JSON')),
    'trailing-comma': lambda s: (around(s, dumps(rec(s))[:-1] + b', }'), err(2, 'invalid JSON')),
    'single-quotes': lambda s: (around(s, str(rec(s)).encode()), err(2, 'invalid JSON')),
    'comment-line': lambda s: (around(s, b'// a comment'), err(2, 'invalid JSON')),
    'two-objects-one-line': lambda s: (around(s, dumps(rec(s)) + dumps(rec(s))), err(2, 'invalid JSON')),
    'old-mac-cr-separators': lambda s: (dumps(rec(s, 1)) + b'\r' + dumps(rec(s, 2)) + b'\r', err(1, 'invalid JSON')),
    'raw-tab-in-string': lambda s: (around(s, dumps(rec(s)).replace(b'question', b'ques\ttion')), err(2, 'invalid JSON')),
    'nul-byte': lambda s: (around(s, b'\x00' + dumps(rec(s))), err(2, 'invalid JSON')),
    'deep-nesting': lambda s: (around(s, b'[' * 100_000), err(2, 'invalid JSON')),
    'int-over-4300-digits': lambda s: (around(s, dumps(rec(s))[:-1] + b', "n": 1' + b'0' * 5000 + b'}'), err(2, 'invalid JSON')),
    'huge-line-truncated': lambda s: (dumps(rec(s, prompt=big_string()))[:-3] + b'\n', err(1, 'invalid JSON')),
    # not an object
    'json-array': lambda s: (around(s, json.dumps(list(rec(s).values())).encode()), err(2, 'expected a JSON object')),
    'bare-string': lambda s: (around(s, b'"just a string"'), err(2, 'expected a JSON object')),
    'bare-number': lambda s: (around(s, b'42'), err(2, 'expected a JSON object')),
    'bare-null': lambda s: (around(s, b'null'), err(2, 'expected a JSON object')),
    'bare-nan': lambda s: (around(s, b'NaN'), err(2, 'expected a JSON object')),
    'empty-object': lambda s: (around(s, b'{}'), err(2, 'missing key')),
    'key-wrong-case': lambda s: (around(s, dumps({k.capitalize(): v for k, v in rec(s).items()})), err(2, 'missing key')),
    'key-trailing-space': lambda s: (around(s, dumps({k + ' ': v for k, v in rec(s).items()})), err(2, 'missing key')),
    # lines and encodings
    'blank-line-middle': lambda s: (around(s, b''), err(2, 'empty line')),
    'whitespace-line-middle': lambda s: (around(s, b' \t '), err(2, 'empty line')),
    'crlf-blank-line-middle': lambda s: (around(s, b'').replace(b'\n', b'\r\n'), err(2, 'empty line')),
    'two-trailing-newlines': lambda s: (good_file(s) + b'\n', err(3, 'empty line')),  # strict: a blank line is an error
    'only-a-newline': lambda s: (b'\n', err(1, 'empty line')),
    'empty-file': lambda s: (b'', err(None, 'no records')),
    'only-a-bom': lambda s: (b'\xef\xbb\xbf', err(None, 'no records')),
    'invalid-utf8-in-value': lambda s: (around(s, dumps(rec(s)).replace(b'question', b'qu\xffestion')), err(2, 'invalid UTF-8')),
    'invalid-utf8-lone-continuation': lambda s: (around(s, b'\x80' + dumps(rec(s))), err(2, 'invalid UTF-8')),
    'utf16-file': lambda s: ('\ufeff'.encode('utf-16-le') + good_file(s).decode().encode('utf-16-le'), err(1, 'invalid UTF-8')),
    'bom-on-line-2': lambda s: (around(s, b'\xef\xbb\xbf' + dumps(rec(s))), err(2, 'invalid JSON')),
    'error-on-last-line': lambda s: (good_file(s, 4) + b'[]\n', err(5, 'expected a JSON object')),
    # accepted
    'bom-at-start': lambda s: (b'\xef\xbb\xbf' + good_file(s), ok(rec(s, 0), rec(s, 1))),
    'crlf-line-endings': lambda s: (good_file(s).replace(b'\n', b'\r\n'), ok(rec(s, 0), rec(s, 1))),  # no \r in values
    'no-final-newline': lambda s: (good_file(s)[:-1], ok(rec(s, 0), rec(s, 1))),
    'whitespace-after-final-newline': lambda s: (good_file(s) + b'  ', ok(rec(s, 0), rec(s, 1))),
    'huge-line': lambda s: (dumps(rec(s, prompt=big_string())) + b'\n', ok(rec(s, prompt=big_string()))),
    'duplicate-keys-last-wins': lambda s: (dumps(rec(s))[:-1] + b', "prompt": "second"}\n', ok(rec(s, prompt='second'))),
    'duplicate-keys-last-is-int': lambda s: (around(s, dumps(rec(s))[:-1] + b', "prompt": 5}'), err(2, 'must be a string')),
    'extra-fields-with-nan': lambda s: (dumps({**rec(s), 'score': float('nan'), 'meta': {'a': [1]}}) + b'\n', 'ok-extra'),
    'unicode-and-escapes': lambda s: (dumps(rec(s, prompt='caf\u00e9 \U0001F600 \u2028 "q" \\ \n\tend')) + b'\n',
                                      ok(rec(s, prompt='caf\u00e9 \U0001F600 \u2028 "q" \\ \n\tend'))),
    'raw-utf8-non-ascii': lambda s: (json.dumps(rec(s, prompt='Grüße, 世界'), ensure_ascii=False).encode() + b'\n', ok(rec(s, prompt='Grüße, 世界'))),
    # valid JSON, but no character: tiktoken would turn it into U+FFFD without a word
    'lone-surrogate-escape': lambda s: (around(s, dumps(rec(s, prompt='@')).replace(b'@', b'a\\ud800b')), err(2, 'surrogate')),
    'prompt-longer-than-block': lambda s: (dumps(rec(s, prompt='word ' * 5000)) + b'\n', ok(rec(s, prompt='word ' * 5000))),
}

FIELD = {  # applied to each field of the schema, on line 2 of 3
    'missing': (lambda r, k: {f: v for f, v in r.items() if f != k}, 'missing key'),
    'int': (lambda r, k: {**r, k: 3}, 'must be a string'),
    'float': (lambda r, k: {**r, k: 1.5}, 'must be a string'),
    'bool': (lambda r, k: {**r, k: True}, 'must be a string'),
    'null': (lambda r, k: {**r, k: None}, 'must be a string'),
    'list': (lambda r, k: {**r, k: ['a', 'b']}, 'must be a string'),
    'dict': (lambda r, k: {**r, k: {'text': 'a'}}, 'must be a string'),
    'nan': (lambda r, k: {**r, k: float('nan')}, 'must be a string'),
    'infinity': (lambda r, k: {**r, k: float('-inf')}, 'must be a string'),
    'empty': (lambda r, k: {**r, k: ''}, 'is empty'),
    'whitespace': (lambda r, k: {**r, k: ' \t\n '}, 'is empty'),
}

PREFS_ONLY = {
    'chosen-equals-rejected': lambda s: (around(s, dumps(rec(s, chosen='same', rejected='same'))), err(2, 'identical')),
    'chosen-equals-rejected-up-to-whitespace': lambda s: (around(s, dumps(rec(s, chosen='same', rejected=' same\n'))), err(2, 'identical')),
}


def build(schema, name):
    if name in GENERIC:
        return GENERIC[name](schema)
    if name in PREFS_ONLY:
        return PREFS_ONLY[name](schema)
    field, variant = name.split(':')
    make, word = FIELD[variant]
    return around(schema, dumps(make(rec(schema), field))), err(2, word)


CASES = [(s, n) for s in SCHEMAS for n in GENERIC] + \
        [(s, f'{k}:{v}') for s in SCHEMAS for k in loaders.SCHEMAS[s] for v in FIELD] + \
        [('prefs', n) for n in PREFS_ONLY]


def test_at_least_30_cases_per_schema():
    for s in SCHEMAS:
        assert sum(schema == s for schema, _ in CASES) >= 30


@pytest.mark.parametrize('schema, name', CASES, ids=[f'{s}-{n}' for s, n in CASES])
def test_read_jsonl_fuzz(tmp_path, schema, name):
    content, expect = build(schema, name)
    path = tmp_path / 'data.jsonl'
    path.write_bytes(content)
    if expect == 'ok-extra':  # other fields are kept as they are, not checked
        (r,) = read_jsonl(str(path), schema)
        assert {k: r[k] for k in loaders.SCHEMAS[schema]} == rec(schema)
        assert r['score'] != r['score'] and r['meta'] == {'a': [1]}  # NaN
    elif expect[0] == 'ok':
        records = read_jsonl(str(path), schema)
        assert records == expect[1]
        assert not any(v.endswith('\r') for r in records for v in r.values() if isinstance(v, str))
    else:
        _, line, word = expect
        with pytest.raises(DataError) as e:  # any other exception type fails the test
            read_jsonl(str(path), schema)
        msg = str(e.value)
        assert msg.startswith(f'{path}:{line}: ' if line else f'{path}: '), msg[:200]
        assert word.lower() in msg.lower(), msg[:200]
        assert len(msg) < 500  # a message, not the offending 3 MB line


@pytest.mark.parametrize('schema', SCHEMAS)
def test_read_jsonl_unreadable_paths(tmp_path, schema):
    for path in (tmp_path / 'missing.jsonl', tmp_path):  # no file; a directory
        with pytest.raises(DataError, match='cannot read the file') as e:
            read_jsonl(str(path), schema)
        assert str(e.value).startswith(f'{path}: ')


def test_long_prompt_accepted_then_truncated(tmp_path, enc, capsys):
    path = tmp_path / 'sft.jsonl'
    path.write_text(json.dumps({'prompt': 'word ' * 5000, 'response': 'ok'}) + '\n')
    (p, r), = loaders.tokenize_sft(read_jsonl(str(path), 'sft'), enc, block_size=64)
    assert len(p) + len(r) == 64 and r == encode_response(enc, 'ok')
    assert 'sft: 1 of 1 examples truncated to 64 tokens (prompt end and response start kept)\n' in capsys.readouterr().out


def test_spread_takes_every_kind_in_order():
    kinds = ['helpful'] * 200 + ['harmful'] * 200 + ['unknowable'] * 200  # eval_prompts.jsonl's order
    for n in (3, 30, 599):
        picked = spread(list(enumerate(kinds)), n)
        assert len(picked) == n and [i for i, _ in picked] == sorted({i for i, _ in picked})  # distinct, in order
        counts = [sum(k == kind for _, k in picked) for kind in ('helpful', 'harmful', 'unknowable')]
        assert max(counts) - min(counts) <= 1, (n, counts)
    assert spread(kinds, 0) == kinds and spread(kinds, 1000) == kinds and spread([], 5) == []


def test_batch_indices_seeds_and_epochs_do_not_collide():
    # each (seed, epoch) has its own permutation: seed 1337's second epoch is not seed 1338's first
    n, batch_size, seed = 24, 4, 1337
    assert batch_indices(n, batch_size, n // batch_size, seed) != batch_indices(n, batch_size, 0, seed + 1)


def test_spread_keeps_every_kind_when_n_does_not_divide_the_list():
    kinds = ['helpful'] * 200 + ['harmful'] * 200 + ['unknowable'] * 200
    for n, want in ((400, [134, 133, 133]), (450, [150, 150, 150])):  # a step of 600 // n = 1 would take the first n
        picked = spread(kinds, n)
        assert [picked.count(k) for k in ('helpful', 'harmful', 'unknowable')] == want, n


def test_collate_pads_with_pad_id():
    seq, targets, lengths = collate([([1, 2], [3, 4, 5]), ([6], [7])], pad_id=99)
    assert seq.tolist() == [[1, 2, 3, 4, 5], [6, 7, 99, 99, 99]]
    assert targets.tolist() == [[-1, 3, 4, 5], [7, -1, -1, -1]] and lengths.tolist() == [5, 2]


def test_tokenize_prompts_counts_only_prompts_that_lose_tokens(enc, capsys):
    n = len(encode_prompt(enc, 'word ' * 10))
    out = loaders.tokenize_prompts([{'prompt': 'word ' * 10}, {'prompt': 'word ' * 11}], enc, max_prompt_len=n)
    assert out[0] == encode_prompt(enc, 'word ' * 10) and len(out[1]) == n
    assert f'prompts: 1 of 2 prompts truncated to {n} tokens' in capsys.readouterr().out  # the one at n is whole


def test_read_jsonl_suggests_prepare_only_for_a_missing_file(tmp_path):
    (tmp_path / 'prepare.py').write_text('')
    with pytest.raises(DataError, match=f'; make it with python {tmp_path / "prepare.py"}$'):
        read_jsonl(str(tmp_path / 'missing.jsonl'), 'sft')
    (tmp_path / 'there.jsonl').mkdir()  # exists, cannot be read: running prepare.py would not help
    with pytest.raises(DataError, match='cannot read the file') as e:
        read_jsonl(str(tmp_path / 'there.jsonl'), 'sft')
    assert 'prepare' not in str(e.value)


def test_tokenize_prefs_pairs_that_differ_at_the_last_kept_token_are_not_reported(enc, capsys):
    same_start = 'They are kind and they are good and they are '
    rec = {'prompt': 'Hi', 'chosen': same_start + 'kind.', 'rejected': same_start + 'evil.'}
    c, r = encode_response(enc, rec['chosen']), encode_response(enc, rec['rejected'])
    first = next(i for i, (a, b) in enumerate(zip(c, r)) if a != b)
    block = len(encode_prompt(enc, rec['prompt'])) + first + 1  # the responses keep their first difference, no more
    ((p, c, r),) = loaders.tokenize_prefs([rec], enc, block_size=block)
    assert p == encode_prompt(enc, 'Hi') and len(c) == len(r) == first + 1 and c[:-1] == r[:-1] and c[-1] != r[-1]
    assert 'identical' not in capsys.readouterr().out
